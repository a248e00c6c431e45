# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""Qwen2.5-VL processor that also marks the question tokens (`qtsplus_query_mask`).

Remote-code file: it imports only `torch`, `transformers` and its sibling `selector_qtsplus`.
"""

from transformers import Qwen2_5_VLProcessor

from .selector_qtsplus import MULTIPLE_CHOICE_INSTRUCTION, QTSplusProcessorMixin, chat_turn_settings


class QTSplusProcessor(QTSplusProcessorMixin, Qwen2_5_VLProcessor):
    r"""
    A [`Qwen2_5_VLProcessor`] whose outputs carry `qtsplus_query_mask` (bool `[batch, seq]`): the text content of the
    user messages, the question QTSplus scores the video by (see [`QTSplusProcessorMixin`]).
    """


__all__ = ["MULTIPLE_CHOICE_INSTRUCTION", "QTSplusProcessor", "chat_turn_settings"]
