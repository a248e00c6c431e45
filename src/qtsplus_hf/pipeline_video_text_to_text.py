# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""`pipeline("video-text-to-text")`: a video and a question in, the answer and what QTSplus kept out.

transformers has no task of this name; the class is registered by `qtsplus_hf` and saved into checkpoints
(`custom_pipelines` in config.json), so `pipeline("video-text-to-text", model=DIR, trust_remote_code=True)` finds it.
Remote-code file: it imports `torch`, `transformers` and its siblings (PyAV only when a file is decoded).
"""

from collections.abc import Sized
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Pipeline
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

from .video_qtsplus import load_video_for_processor


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


# Per-token inputs of the processor: padded on the left when videos are batched; the rest is concatenated.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "qtsplus_query_mask", "mm_token_type_ids")


def left_padded_batch(items: list[dict], pad_token_id: int) -> dict:
    """One model input from the processor outputs of single samples: per-token tensors `[1, S_i]` left-padded to
    `[B, max S]` (generation continues from the right end), video tensors concatenated in sample order.

    transformers' `pad_collate_fn` pads on the tokenizer's side and needs a tokenizer or feature extractor on the
    pipeline; a multimodal processor's batch needs the left side whatever the tokenizer says, hence this collate.
    """
    keys = set(items[0])
    if any(set(item) != keys for item in items):
        raise ValueError("the samples of a batch carry different inputs; run them with batch_size=1")
    length = max(item["input_ids"].shape[1] for item in items)
    batch = {}
    for key in keys:
        values = [item[key] for item in items]
        if key in SEQUENCE_KEYS:
            fill = pad_token_id if key == "input_ids" else 0
            batch[key] = torch.cat([
                torch.nn.functional.pad(value, (length - value.shape[1], 0), value=fill) for value in values
            ])
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.cat(values)
        else:  # e.g. second_per_grid_ts as a list
            batch[key] = [entry for value in values for entry in value]
    return batch


class QTSplusVideoTextToTextPipeline(Pipeline):
    """Answer a question about a video with a QTSplus model.

    Call with `video=` (a file path, a list of frames or an array `[T, H, W, C]`) and `text=` (the question), or
    with a dict `{"video": ..., "text": ...}` or `{"video": ..., "messages": [...]}` (chat messages whose user
    turn holds one `{"type": "video"}` entry), or a list of those (one result each). `batch_size=N` runs N videos
    through the model at once, left-padded: the same answers and selections as one at a time, in fewer, larger
    calls.

    Keyword arguments: `fps`, `min_frames`, `max_frames` (frame sampling), `qtsplus_keep_ratio`, and generation
    arguments (`max_new_tokens`, `do_sample`, ...), which pass through to `model.generate`.

    Each result (a list of them with `num_return_sequences > 1`): `{"generated_text": str, "qtsplus": {"kept": n,
    "total": M, "ratio": n / M, "rho": ρ, "kept_seconds": [...]}}`; `kept_seconds` are the distinct times
    (seconds) of the kept tokens' temporal patches: their start for Qwen2.5-VL, their middle for Qwen3-VL (the time
    its prompt writes before the patch).
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __call__(self, inputs: Any = None, video: Any = None, text: str | None = None, **kwargs):
        if inputs is None:
            if video is None:
                raise ValueError("pass video= (a path, frames or an array) and text= (the question)")
            inputs = {"video": video, "text": text}
        return super().__call__(inputs, **kwargs)

    def get_iterator(self, inputs, num_workers: int, batch_size: int, preprocess_params, forward_params,
                     postprocess_params):
        """`Pipeline.get_iterator`, batching with `left_padded_batch` (the parent's collate needs a tokenizer or a
        feature extractor on the pipeline and pads on the tokenizer's side)."""
        if batch_size == 1:
            return super().get_iterator(inputs, num_workers, batch_size, preprocess_params, forward_params,
                                        postprocess_params)
        if isinstance(inputs, Sized):
            dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        else:
            dataset = PipelineIterator(inputs, self.preprocess, preprocess_params)
        collate = partial(left_padded_batch, pad_token_id=self.processor.tokenizer.pad_token_id or 0)
        dataloader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=collate)
        model_iterator = PipelineIterator(dataloader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

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
        model_inputs, _, _ = video_question_inputs(
            self.processor, inputs["video"], inputs.get("text"), inputs.get("messages"), fps, min_frames, max_frames
        )
        return dict(model_inputs)

    def _forward(self, model_inputs: dict, **generate_kwargs) -> dict:
        """Generate for `B` samples (one video each); returns `new_tokens [B, sequences per sample, T]` and one
        selection summary per sample (the shapes transformers' batch iterator splits back into samples)."""
        input_ids = model_inputs["input_ids"]
        outputs = self.model.generate(**model_inputs, **generate_kwargs, return_dict_in_generate=True)
        new_tokens = outputs.sequences[:, input_ids.shape[1]:]
        return {
            "new_tokens": new_tokens.reshape(len(input_ids), -1, new_tokens.shape[-1]),
            "qtsplus": self._selection_summaries(outputs.get("qtsplus"), input_ids),
        }

    def _selection_summaries(self, selection, input_ids: torch.Tensor) -> list[dict]:
        """One `{"kept", "total", "ratio", "rho", "kept_seconds"}` per sample; video v belongs to sample v."""
        totals = (input_ids == self.model.config.video_token_id).sum(-1).tolist()
        if selection is None:  # QTSplus disabled: every token went to the language model
            return [{"kept": total, "total": total, "ratio": 1.0, "rho": 1.0, "kept_seconds": []} for total in totals]
        return [
            {"kept": kept, "total": total, "ratio": kept / max(total, 1), "rho": float(rho),
             "kept_seconds": seconds.unique().tolist()}
            for kept, total, rho, seconds in zip(selection.num_kept, totals, selection.rho, selection.timestamps)
        ]

    def postprocess(self, model_outputs: dict) -> dict | list[dict]:
        # One sample: `new_tokens [1, sequences, T]`; its summary comes as a one-item list when the pipeline ran
        # unbatched, and as the item itself when transformers split a batch.
        summary = model_outputs["qtsplus"]
        summary = summary[0] if isinstance(summary, list) else summary
        texts = self.processor.batch_decode(model_outputs["new_tokens"][0], skip_special_tokens=True)
        results = [{"generated_text": text, "qtsplus": summary} for text in texts]
        return results[0] if len(results) == 1 else results  # several with num_return_sequences > 1


__all__ = ["PIPELINE_TASK", "QTSplusVideoTextToTextPipeline", "video_question_inputs"]
