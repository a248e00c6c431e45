# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""Configuration of Qwen2.5-VL with a QTSplus query-aware visual token selector.

Remote-code file: it imports only `transformers` and its sibling `selector_qtsplus`, which defines the fields.
"""

from transformers import Qwen2_5_VLConfig

from .selector_qtsplus import (
    POSITION_MODES,
    QWEN_TURN_END_ID,
    QWEN_USER_TURN_IDS,
    RECIPES,
    SCORE_AGGREGATIONS,
    QTSplusConfigMixin,
)


class QTSplusConfig(QTSplusConfigMixin, Qwen2_5_VLConfig):
    r"""
    A [`Qwen2_5_VLConfig`] plus the flat `qtsplus_*` settings of the QTSplus selector (arXiv 2511.11910), documented
    on [`QTSplusConfigMixin`]. Both position modes: `"mrope"` and the released checkpoints' `"sequential"`.
    """

    model_type = "qtsplus_qwen2_5_vl"


__all__ = ["POSITION_MODES", "QTSplusConfig", "QWEN_TURN_END_ID", "QWEN_USER_TURN_IDS", "RECIPES",
           "SCORE_AGGREGATIONS"]
