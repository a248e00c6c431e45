# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""Where the evidence of a question is, in vision tokens, and how much of it a selection kept.

Rows may carry ground-truth evidence: `evidence_seconds` (the seconds that show it) and, finer, `evidence_boxes`
(`[second, x0, y0, x1, y1]`, the box in fractions of the frame's width and height). A video token is evidence when
its temporal patch starts in an evidence second and, with boxes, when its merged patch overlaps a box of that
second. Synthetic rows carry both (`qtsplus_hf.synthetic`): there the evidence is the asked object's token(s).
"""

import bisect
import math
from collections.abc import Sequence

import torch


def _box_cells(box: Sequence[float], rows: int, cols: int) -> list[int]:
    """Row-major indices of the `rows x cols` merged-patch cells a fractional box `[x0, y0, x1, y1]` overlaps."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"an evidence box must be [second, x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 and "
                         f"0 <= y0 < y1 <= 1, got {list(box)}")
    first_col, last_col = int(x0 * cols), min(math.ceil(x1 * cols), cols)
    first_row, last_row = int(y0 * rows), min(math.ceil(y1 * rows), rows)
    return [row * cols + col for row in range(first_row, last_row) for col in range(first_col, last_col)]


def patch_start_seconds(inputs: dict, video_index: int, temporal_patch_size: int = 2) -> float | list[float]:
    """When each temporal patch of video `video_index` begins, from a processor's outputs.

    Qwen2.5-VL: its uniform `second_per_grid_ts` (a float: patch t spans `[t·s, (t+1)·s)`). Qwen3-VL: from
    `qtsplus_patch_seconds`, each patch's time as its prompt writes it, the mean of its first and last frame's time
    (`Qwen3VLProcessor._calculate_timestamps`): with frames Δ apart and P frames a patch, patches are PΔ apart and a
    patch starts (P - 1)Δ / 2 before its time. 1.0 (a second per patch) without either.
    """
    intervals = inputs.get("second_per_grid_ts")
    if intervals is not None:
        return float(intervals[video_index])
    middles = inputs.get("qtsplus_patch_seconds")
    if middles is None:
        return 1.0
    counts = [int(t) for t in inputs["video_grid_thw"][:, 0].tolist()]
    first = sum(counts[:video_index])
    middles = [float(second) for second in middles[first : first + counts[video_index]]]
    if len(middles) == 1:  # no spacing to read the frame step from
        return [0.0]
    spacings = [after - before for before, after in zip(middles, middles[1:])]
    lead = (temporal_patch_size - 1) / (2 * temporal_patch_size)
    return [max(0.0, middle - lead * spacing) for middle, spacing in zip(middles, spacings + spacings[-1:])]


def evidence_token_mask(
    grid_thw: Sequence[int], second_per_grid: float | Sequence[float], merge_size: int,
    seconds: Sequence[float] | None = None, boxes: Sequence[Sequence[float]] | None = None,
) -> torch.Tensor:
    """Bool `[M]` over one video's LM tokens (`grid_thw` = its `video_grid_thw` row): True at evidence tokens.

    `second_per_grid`: a float, patch t spanning `[t·s, (t+1)·s)`, or each patch's start second
    (`patch_start_seconds`; the last patch spans as long as the one before it). `seconds`: evidence seconds, every
    token of the temporal patch whose span holds one; `boxes`: `[second, x0, y0, x1, y1]` each, only the overlapped
    merged patches of the patch holding that second (boxes take precedence for the seconds they name).
    """
    grid_t, grid_h, grid_w = (int(v) for v in grid_thw)
    rows, cols = grid_h // merge_size, grid_w // merge_size
    mask = torch.zeros(grid_t, rows * cols, dtype=torch.bool)
    if isinstance(second_per_grid, (int, float)):
        starts = [t * float(second_per_grid) for t in range(grid_t + 1)]
    else:
        starts = [float(second) for second in second_per_grid]
        if len(starts) != grid_t:
            raise ValueError(f"one start second per temporal patch ({grid_t}) expected, got {len(starts)}")
        starts.append(starts[-1] + (starts[-1] - starts[-2] if grid_t > 1 else 1.0))

    def patch_of(second: float) -> int | None:
        index = bisect.bisect_right(starts, float(second) + 1e-6) - 1
        return index if 0 <= index < grid_t else None

    boxed = set()
    for box in boxes or []:
        if len(box) != 5:
            raise ValueError(f"an evidence box must be [second, x0, y0, x1, y1], got {list(box)}")
        patch = patch_of(box[0])
        if patch is not None:
            mask[patch, _box_cells(box[1:], rows, cols)] = True
            boxed.add(patch)
    for second in seconds or []:
        patch = patch_of(second)
        if patch is not None and patch not in boxed:
            mask[patch] = True
    return mask.flatten()


def evidence_figures(
    scores: torch.Tensor, kept_indices: torch.Tensor, evidence: torch.Tensor, tokens_per_patch: int
) -> dict[str, float] | None:
    """How one selection treated one video's evidence (None when the video has no evidence tokens).

    Args:
        scores: `[M]` relevance; kept_indices: `[n]`; evidence: bool `[M]`; tokens_per_patch: LM tokens per
            temporal patch (to group tokens by time).
    Returns:
        `token_recall`: share of evidence tokens kept; `second_recall`: share of evidence temporal patches with
        at least one kept evidence token; `top_scored`: 1.0 when the k highest-scored tokens are exactly the k
        evidence tokens, else 0.0.
    """
    evidence = evidence.bool().cpu()
    count = int(evidence.sum())
    if count == 0:
        return None
    kept = torch.zeros_like(evidence)
    kept[kept_indices.cpu()] = True
    per_patch = evidence.view(-1, tokens_per_patch)
    kept_per_patch = (kept & evidence).view(-1, tokens_per_patch)
    patches = per_patch.any(-1)
    top = scores.float().cpu().topk(count).indices
    return {
        "token_recall": float((kept & evidence).sum()) / count,
        "second_recall": float(kept_per_patch.any(-1)[patches].float().mean()),
        "top_scored": float(bool(evidence[top].all())),
    }


__all__ = ["evidence_figures", "evidence_token_mask", "patch_start_seconds"]
