"""Shared pieces of the vLLM plugin tests: tiny checkpoints, videos, chat prompts, the HF model's reference run.

These tests run in the environment `scripts/setup_vllm_env.sh` builds (vLLM's CPU build), not the main one.
"""

import os

# One process: the engine's model is the object `LLM.apply_model` reaches, and start-up is faster.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import numpy as np
import pytest
import torch

NEW_TOKENS = 16
QUESTIONS = ("What colour is the circle?", "At which second does the square appear?", "Describe the video.")


def save_checkpoint(path, **overrides) -> str:
    """A tiny random QTSplus folder vLLM's CPU build can serve, with a re-encoder that is not the identity (so keep
    1.0 is not the stock model and a wrong timestamp or order changes the tokens), and 25 MRoPE time steps per
    second: a video's last temporal patch then holds the prompt's largest position, above the text after it, so the
    position decoding continues from depends on which tokens were kept."""
    from qtsplus_hf import QTSplusQwen2_5_VLForConditionalGeneration
    from qtsplus_hf.tiny import tiny_processor, tiny_vllm_config

    torch.manual_seed(0)
    config = tiny_vllm_config(**overrides)
    config.vision_config.tokens_per_second = 25
    model = QTSplusQwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for layer in model.qtsplus.reencode_layers:
            for linear in (layer.core.o_proj, layer.core.ffn.net[2]):
                linear.weight.normal_(0, 0.2)
        # Sharper LM attention: at the random init its logits are so small that moving a kept video token by a few
        # MRoPE positions changes no greedy token, and a wrong position would go unnoticed.
        for layer in model.model.language_model.layers:
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                linear.weight.mul_(6.0)
                linear.bias.mul_(6.0)
    model.save_pretrained(path)
    tiny_processor().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> str:
    return save_checkpoint(tmp_path_factory.mktemp("qtsplus_mrope"))


@pytest.fixture(scope="session")
def sequential_checkpoint(tmp_path_factory) -> str:
    return save_checkpoint(tmp_path_factory.mktemp("qtsplus_sequential"), qtsplus_position_mode="sequential")


def numpy_video(seed: int, num_frames: int = 8, size: int = 32) -> tuple[np.ndarray, dict]:
    """Random frames with the metadata vLLM needs for a numpy video (no resampling: every frame is used)."""
    frames = np.random.default_rng(seed).integers(0, 256, size=(num_frames, size, size, 3), dtype=np.uint8)
    metadata = {
        "total_num_frames": num_frames, "fps": 2.0, "duration": num_frames / 2.0,
        "frames_indices": list(range(num_frames)), "do_sample_frames": False, "video_backend": "numpy",
    }
    return frames, metadata


def chat_prompt(path: str, question: str, with_image: bool = False) -> str:
    from qtsplus_hf import QTSplusProcessor

    media = [{"type": "image"}] if with_image else []
    messages = [{"role": "user", "content": [*media, {"type": "video"}, {"type": "text", "text": question}]}]
    return QTSplusProcessor.from_pretrained(path).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )


def numpy_image(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(1000 + seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def hf_greedy(
    path: str, prompt: str, video: tuple[np.ndarray, dict], keep_ratio: float, image: np.ndarray | None = None
) -> dict:
    """The HF model's greedy tokens, prompt length and kept indices for one request."""
    from transformers.video_utils import VideoMetadata

    from qtsplus_hf import QTSplusProcessor, QTSplusQwen2_5_VLForConditionalGeneration

    frames, metadata = video
    processor = QTSplusProcessor.from_pretrained(path)
    inputs = processor(
        text=[prompt], videos=[frames], do_sample_frames=False, return_tensors="pt",
        video_metadata=[VideoMetadata(**{k: v for k, v in metadata.items() if k != "do_sample_frames"})],
        images=None if image is None else [image],
    )
    model = QTSplusQwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    out = model.generate(
        **inputs, qtsplus_keep_ratio=keep_ratio, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=False, return_dict_in_generate=True,
    )
    selection = out["qtsplus"]
    return {
        "tokens": out.sequences[0, inputs["input_ids"].shape[1] :].tolist(),
        "kept": selection.kept_indices[0].tolist(),
        "num_video_tokens": selection.num_tokens[0],
        "prompt_length": int(inputs["input_ids"].shape[1]),
    }


def serve(path: str, keep_ratio: float = 1.0, **engine_args):
    """`vllm.LLM` on `path` at `keep_ratio` (QTSplus's keep ratio is 1 - `video_pruning_rate`)."""
    from vllm import LLM

    settings = dict(
        enforce_eager=True, dtype="float32", max_model_len=1024, max_num_seqs=4, kv_cache_memory_bytes=128 << 20,
        limit_mm_per_prompt={"video": 1, "image": 1},
        video_pruning_rate=None if keep_ratio == 1.0 else 1.0 - keep_ratio,
    )
    return LLM(model=path, **{**settings, **engine_args})


def greedy(llm, requests: list[tuple], details: bool = False) -> list[dict]:
    """vLLM's greedy tokens and prompt length for (prompt, video[, image]) requests, submitted together."""
    from vllm import SamplingParams

    # min_tokens holds the end-of-turn token back as the HF side's min_new_tokens does (ignore_eos would not).
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    media = [dict(video=request[1], **({"image": request[2]} if len(request) > 2 else {})) for request in requests]
    outputs = llm.generate(
        [{"prompt": request[0], "multi_modal_data": data} for request, data in zip(requests, media)], params,
        use_tqdm=False,
    )
    served = [{"tokens": list(o.outputs[0].token_ids), "prompt_length": len(o.prompt_token_ids)} for o in outputs]
    if details:  # the prompt's ids and how many of its tokens came from the prefix cache
        for result, output in zip(served, outputs):
            result.update(prompt_ids=list(output.prompt_token_ids), cached=output.num_cached_tokens or 0)
    return served


class KeptIndexRecorder:
    """A forward hook on the engine model's selector, for a `with` block: the kept indices and token count of every
    video it selects, in call order."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.kept: list[list[int]] = []
        self.num_tokens: list[int] = []

    def __enter__(self) -> "KeptIndexRecorder":
        (self.handle,) = self.llm.apply_model(lambda model: model.qtsplus.register_forward_hook(self.record))
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.remove()

    def record(self, module, args, output) -> None:
        self.kept.append(output[0][0].nonzero().flatten().tolist())
        self.num_tokens.append(output[0].shape[1])
