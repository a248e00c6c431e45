# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""Qwen2.5-VL processor that also marks the question tokens (`qtsplus_query_mask`).

Remote-code file: it imports only `torch` and `transformers`.
"""

import torch
from transformers import Qwen2_5_VLProcessor
from transformers.feature_extraction_utils import BatchFeature


# The answer-format line of multiple-choice prompts (the common Qwen2.5-VL evaluation wording). It says nothing about
# which moments matter, so it is not part of the question the selector scores by.
MULTIPLE_CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def chat_turn_settings(tokenizer) -> dict:
    """The `QTSplusConfig` fields with which a model finds the user turns in `tokenizer`'s chat format when it gets
    no `qtsplus_query_mask`: `qtsplus_user_turn_ids` (the ids of `<|im_start|>user\n`) and `qtsplus_turn_end_id`."""
    return {
        "qtsplus_user_turn_ids": tokenizer.encode("<|im_start|>user\n", add_special_tokens=False),
        "qtsplus_turn_end_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
    }


class QTSplusProcessor(Qwen2_5_VLProcessor):
    r"""
    A [`Qwen2_5_VLProcessor`] whose outputs carry `qtsplus_query_mask` (bool `[batch, seq]`): the text content of the
    user messages, the question QTSplus scores the video by. The system prompt, role markers, vision tokens, the
    multiple-choice answer-format line (`MULTIPLE_CHOICE_INSTRUCTION`) and anything in an assistant turn are not part
    of it. Text without chat markers counts as one user message.

    `apply_chat_template(..., tokenize=True, return_dict=True)` calls the processor, so it carries the mask too.
    """

    def __call__(self, *args, **kwargs) -> BatchFeature:
        outputs = super().__call__(*args, **kwargs)
        input_ids = outputs["input_ids"]
        if isinstance(input_ids, torch.Tensor):
            mask = self.question_token_mask(input_ids.reshape(-1, input_ids.shape[-1])).reshape(input_ids.shape)
            if "attention_mask" in outputs:
                mask &= outputs["attention_mask"].bool()
        else:  # python lists, possibly ragged (no padding) or a single unbatched row
            rows = input_ids if input_ids and isinstance(input_ids[0], list) else [input_ids]
            mask = [self.question_token_mask(torch.tensor([row]))[0].tolist() for row in rows]
            mask = mask if rows is input_ids else mask[0]
        outputs["qtsplus_query_mask"] = mask
        return outputs

    def question_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool `[batch, seq]` from `input_ids [batch, seq]`: the tokens of user-message text (no vision tokens)."""
        tokenizer = self.tokenizer
        im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
        vision_ids = torch.tensor(
            tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
        )
        special_ids = torch.tensor(tokenizer.all_special_ids + [im_start, im_end])
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for row, ids in enumerate(input_ids):
            starts = (ids == im_start).nonzero().flatten().tolist()
            if not starts:  # plain text: all of it is the question
                mask[row] = ~torch.isin(ids, special_ids)
                continue
            for start in starts:
                role, content_start = self._role_header(ids, start)
                if role != "user":
                    continue
                ends = (ids[content_start:] == im_end).nonzero()
                content_end = content_start + int(ends[0]) if len(ends) else len(ids)
                mask[row, content_start:content_end] = True
        return mask & ~torch.isin(input_ids, vision_ids) & ~self._instruction_tokens(input_ids)

    def chat_turn_settings(self) -> dict:
        """`chat_turn_settings(self.tokenizer)`."""
        return chat_turn_settings(self.tokenizer)

    def _instruction_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool `[batch, seq]`: where `MULTIPLE_CHOICE_INSTRUCTION` occurs as a token sequence."""
        found = torch.zeros_like(input_ids, dtype=torch.bool)
        pattern = torch.tensor(self.tokenizer.encode(MULTIPLE_CHOICE_INSTRUCTION, add_special_tokens=False))
        if len(pattern) > input_ids.shape[1]:
            return found
        windows = input_ids.unfold(1, len(pattern), 1)  # [batch, seq - P + 1, P]
        for row, start in (windows == pattern.to(input_ids.device)).all(-1).nonzero().tolist():
            found[row, start : start + len(pattern)] = True
        return found

    def _role_header(self, ids: torch.Tensor, start: int) -> tuple[str, int]:
        """The role after `<|im_start|>` at `start` (it ends at the first newline) and where the content begins."""
        header = ""
        for position in range(start + 1, min(start + 9, len(ids))):
            header += self.tokenizer.decode(ids[position : position + 1])
            if "\n" in header:
                return header.split("\n")[0].strip(), position + 1
        return header.strip(), min(start + 9, len(ids))

    @property
    def model_input_names(self) -> list[str]:
        return super().model_input_names + ["qtsplus_query_mask"]


__all__ = ["MULTIPLE_CHOICE_INSTRUCTION", "QTSplusProcessor", "chat_turn_settings"]
