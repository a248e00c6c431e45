# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""The bundled default model: a tiny QTSplus trained from scratch on `qtsplus_hf.synthetic` videos.

`default_model_path()` is the folder of the committed checkpoint (loads with `AutoModel` / `AutoProcessor` and
`trust_remote_code=True`); `python -m qtsplus_hf.default_model.train --output DIR` retrains it.
"""

import os


# Training videos use seeds below this; held-out evaluation (tests, `qtsplus eval --synthetic`, the benchmark report)
# uses seeds from here on, so no held-out video was ever seen in training.
HELD_OUT_SEED_START = 10_000_000
# The videos the default model was trained for (the `qtsplus_hf.synthetic.generate_sample` arguments).
VIDEO_SECONDS = 32
FRAME_SIZE = 32
CHECKPOINT_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint")


def default_model_path() -> str:
    """The folder holding the bundled checkpoint; ValueError when it is missing (a broken install)."""
    if not os.path.isfile(os.path.join(CHECKPOINT_FOLDER, "config.json")):
        raise ValueError(f"the bundled default model is missing from {CHECKPOINT_FOLDER} (reinstall qtsplus-hf)")
    return CHECKPOINT_FOLDER


def synthetic_options() -> dict:
    """`generate_sample` keyword arguments for videos like the default model's training videos."""
    return {"seconds": VIDEO_SECONDS, "frame_size": FRAME_SIZE}


__all__ = ["CHECKPOINT_FOLDER", "HELD_OUT_SEED_START", "default_model_path", "synthetic_options"]
