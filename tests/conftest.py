import inspect

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from qtsplus_hf import QTSplusQwen2_5_VLForConditionalGeneration
from qtsplus_hf.tiny import tiny_config_dict, tiny_qtsplus_config, video_prompt_batch


STOCK_INPUT_NAMES = (
    "input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
)
# transformers renamed `past_key_values` to `cache` in 5.2x; tests that drive the cache by hand use the current name.
CACHE_KWARG = "cache" if "cache" in inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters else (
    "past_key_values"
)


def stock_inputs(batch: dict) -> dict:
    """What a stock Qwen2.5-VL processor would return (no qtsplus_query_mask)."""
    return {name: batch[name] for name in STOCK_INPUT_NAMES if name in batch}


@pytest.fixture(scope="session")
def stock_model() -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(**tiny_config_dict())
    config._attn_implementation = "eager"
    return Qwen2_5_VLForConditionalGeneration(config).eval()


@pytest.fixture(scope="session")
def converted_model(stock_model) -> QTSplusQwen2_5_VLForConditionalGeneration:
    torch.manual_seed(1)
    return QTSplusQwen2_5_VLForConditionalGeneration.from_qwen2_5_vl(stock_model)


@pytest.fixture
def config():
    return tiny_qtsplus_config()


@pytest.fixture
def two_sample_batch(config):
    """Left-padded batch of 2: sample 0 has one 4x4x4 video (16 tokens), sample 1 a 2x4x6 video (12 tokens)."""
    return video_prompt_batch([[(4, 4, 4)], [(2, 4, 6)]], [5, 3], config)


@pytest.fixture
def two_video_batch(config):
    """Sample 0 holds two videos (16 and 8 tokens), sample 1 one video (12 tokens)."""
    return video_prompt_batch([[(4, 4, 4), (2, 4, 4)], [(2, 4, 6)]], [4, 6], config, seed=3)


def write_mp4(path, num_frames: int, fps: float, width: int = 64, height: int = 48, seed: int = 0,
              lossless: bool = False) -> str:
    """Encode a real H.264 mp4 with PyAV: random frames whose red channel carries the frame index. `lossless`:
    4:4:4 at qp 0 (the default 4:2:0 file moves a frame's mean red by up to 3 levels, neighbours differ by 1)."""
    import av
    import numpy as np

    generator = np.random.default_rng(seed)
    options = {"preset": "ultrafast", **({"qp": "0"} if lossless else {})}
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p" if lossless else "yuv420p"
        for index in range(num_frames):
            frame = generator.integers(0, 255, (height, width, 3), dtype=np.uint8)
            frame[..., 0] = index % 256
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random QTSplus model and processor saved the way a transformers user saves them: the model's and the
    processor's `save_pretrained` into one folder (which must then serve the Auto classes and the pipeline)."""
    from qtsplus_hf.tiny import tiny_processor

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("checkpoint")
    QTSplusQwen2_5_VLForConditionalGeneration(tiny_qtsplus_config()).eval().save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return str(folder)
