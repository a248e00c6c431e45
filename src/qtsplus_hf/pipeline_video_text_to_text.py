# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""`pipeline("video-text-to-text")`: a video and a question in, the answer and what QTSplus kept out.

transformers has no task of this name; the class is registered by `qtsplus_hf` and saved into checkpoints
(`custom_pipelines` in config.json), so `pipeline("video-text-to-text", model=DIR, trust_remote_code=True)` finds it.
Remote-code file: it imports `torch`, `transformers` and its siblings (PyAV only when a file is decoded).
"""

from typing import Any

import torch
from transformers import Pipeline

from .video_qtsplus import load_video_for_processor, video_duration


PIPELINE_TASK = "video-text-to-text"


def video_question_inputs(
    processor, video: Any, question: str | None = None, messages: list[dict] | None = None,
    fps: float | None = None, min_frames: int | None = None, max_frames: int | None = None,
):
    """Load `video` with the processor's sampling and pixel settings and build the model inputs for a question.

    Returns the processor's output (with `qtsplus_query_mask`), the sampled frames `[T, H, W, 3]` and their
    `VideoMetadata`. `messages` (chat messages with one `{"type": "video"}` entry) replace `question`.
    """
    if messages is None:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty")
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    frames, metadata = load_video_for_processor(processor, video, fps, min_frames, max_frames)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    model_inputs = processor(
        text=[prompt], videos=[frames], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt"
    )
    return model_inputs, frames, metadata


class QTSplusVideoTextToTextPipeline(Pipeline):
    """Answer a question about a video with a QTSplus model.

    Call with `video=` (a file path, a list of frames or an array `[T, H, W, C]`) and `text=` (the question), or
    with a dict `{"video": ..., "text": ...}` or `{"video": ..., "messages": [...]}` (chat messages whose user
    turn holds one `{"type": "video"}` entry), or a list of those (a batch, one result each).

    Keyword arguments: `fps`, `min_frames`, `max_frames` (frame sampling), `qtsplus_keep_ratio`, and generation
    arguments (`max_new_tokens`, `do_sample`, ...), which pass through to `model.generate`.

    Each result (a list of them with `num_return_sequences > 1`): `{"generated_text": str, "qtsplus": {"kept": n, "total": M, "ratio": n / M, "rho": ρ,
    "kept_seconds": [...]}}`; `kept_seconds` are the distinct start times (seconds) of the kept tokens' frames.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __call__(self, inputs: Any = None, video: Any = None, text: str | None = None, **kwargs):
        if (kwargs.get("batch_size") or self._batch_size or 1) > 1:
            raise ValueError("batch_size > 1 is not supported: videos differ in length; pass a list to run several")
        if inputs is None:
            if video is None:
                raise ValueError("pass video= (a path, frames or an array) and text= (the question)")
            inputs = {"video": video, "text": text}
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, fps=None, min_frames=None, max_frames=None, qtsplus_keep_ratio=None, **generate):
        preprocess = {key: value for key, value in
                      (("fps", fps), ("min_frames", min_frames), ("max_frames", max_frames)) if value is not None}
        forward = {key: value for key, value in generate.items() if key != "return_dict_in_generate"}
        if qtsplus_keep_ratio is not None:
            forward["qtsplus_keep_ratio"] = qtsplus_keep_ratio
        return preprocess, forward, {}

    def preprocess(self, inputs: dict, fps: float | None = None, min_frames: int | None = None,
                   max_frames: int | None = None) -> dict:
        if not isinstance(inputs, dict) or "video" not in inputs:
            raise ValueError("each input must be a dict with a 'video' and a 'text' (or 'messages')")
        model_inputs, _, metadata = video_question_inputs(
            self.processor, inputs["video"], inputs.get("text"), inputs.get("messages"), fps, min_frames, max_frames
        )
        model_inputs["duration"] = video_duration(metadata)
        return model_inputs

    def _forward(self, model_inputs: dict, **generate_kwargs) -> dict:
        duration = model_inputs.pop("duration")
        prompt_length = model_inputs["input_ids"].shape[1]
        outputs = self.model.generate(**model_inputs, **generate_kwargs, return_dict_in_generate=True)
        return {
            "new_tokens": outputs.sequences[:, prompt_length:],
            "selection": outputs.get("qtsplus"),
            "total": int((model_inputs["input_ids"] == self.model.config.video_token_id).sum()),
            "duration": duration,
        }

    def postprocess(self, model_outputs: dict) -> dict | list[dict]:
        texts = self.processor.batch_decode(model_outputs["new_tokens"], skip_special_tokens=True)
        selection, total = model_outputs["selection"], model_outputs["total"]
        if selection is None:  # QTSplus disabled: every token went to the language model
            summary = {"kept": total, "total": total, "ratio": 1.0, "rho": 1.0, "kept_seconds": []}
        else:
            kept = sum(selection.num_kept)
            seconds = torch.cat(selection.timestamps).unique().tolist()
            summary = {"kept": kept, "total": sum(selection.num_tokens), "ratio": kept / max(total, 1),
                       "rho": float(selection.rho.mean()), "kept_seconds": seconds}
        results = [{"generated_text": text, "qtsplus": summary} for text in texts]
        return results[0] if len(results) == 1 else results  # several with num_return_sequences > 1


__all__ = ["PIPELINE_TASK", "QTSplusVideoTextToTextPipeline", "video_question_inputs"]
