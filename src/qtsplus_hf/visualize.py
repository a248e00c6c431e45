"""A picture of what QTSplus kept: the frames that matter with the kept patches lit and the evidence outlined, and
relevance over time.

The frames shown are the temporal patches that hold kept tokens and those that hold the evidence (when known), in
time order (`frames_to_show`); a kept cell is drawn at full brightness, a dropped one dimmed, an evidence cell
outlined.
"""

import os
import tempfile
from collections.abc import Sequence

import numpy as np
import torch


MAX_FRAMES_SHOWN = 12
EVIDENCE_COLOUR = "white"  # the synthetic palette has no white, and the backgrounds are dark


def frames_to_show(kept: np.ndarray, evidence: np.ndarray | None = None,
                   max_frames_shown: int = MAX_FRAMES_SHOWN) -> np.ndarray:
    """The temporal patches to draw, ascending: those with a kept token and those with an evidence token.

    Args:
        kept: bool `[T, ...]`, the kept tokens per temporal patch; evidence: bool of the same shape, or None.
        max_frames_shown: the most patches drawn. When more qualify, the evidence patches come first (those with
            more kept evidence tokens first, should they alone be too many), then the patches with the most kept
            tokens (earlier ones on ties).
    When no patch qualifies (nothing kept, no evidence), up to `max_frames_shown` evenly spaced patches.
    """
    if max_frames_shown < 1:
        raise ValueError(f"max_frames_shown must be at least 1, got {max_frames_shown}")
    kept = np.asarray(kept, dtype=bool).reshape(len(kept), -1)
    evidence = (np.zeros_like(kept) if evidence is None
                else np.asarray(evidence, dtype=bool).reshape(len(kept), -1))
    kept_count, is_evidence = kept.sum(-1), evidence.any(-1)
    qualifying = np.flatnonzero((kept_count > 0) | is_evidence)
    if len(qualifying) == 0:
        count = min(max_frames_shown, len(kept))
        return np.unique(np.linspace(0, len(kept) - 1, count).round().astype(int))
    if len(qualifying) > max_frames_shown:
        kept_evidence = (kept & evidence).sum(-1)
        # lexsort sorts by the last key first; negated keys put the larger first, the index breaks ties (earlier)
        order = np.lexsort((qualifying, -kept_count[qualifying], -kept_evidence[qualifying],
                            -is_evidence[qualifying].astype(int)))
        qualifying = np.sort(qualifying[order[:max_frames_shown]])
    return qualifying


def selection_figure_data(
    frames: np.ndarray, grid_thw: tuple[int, int, int], kept_indices: torch.Tensor, scores: torch.Tensor,
    merge_size: int, temporal_patch_size: int, second_per_grid: float | Sequence[float],
    evidence: torch.Tensor | None = None, max_frames_shown: int = MAX_FRAMES_SHOWN,
) -> dict:
    """Per temporal patch: its first frame, a kept mask over merged patches `[h, w]`, the evidence mask (same shape,
    or None), the max score and its start time; and `shown`, the patches the picture draws (`frames_to_show`).

    `second_per_grid`: seconds per temporal patch, or each patch's start (`qtsplus_hf.evidence.patch_start_seconds`);
    `evidence`: bool `[M]` over the video's tokens (`qtsplus_hf.evidence.evidence_token_mask`), or None.
    """
    grid_t, grid_h, grid_w = (int(v) for v in grid_thw)
    rows, cols = grid_h // merge_size, grid_w // merge_size
    kept = torch.zeros(grid_t * rows * cols, dtype=torch.bool)
    kept[torch.as_tensor(kept_indices).long().cpu()] = True
    kept = kept.view(grid_t, rows, cols).numpy()
    if evidence is not None:
        evidence = torch.as_tensor(evidence).bool().cpu()
        if evidence.numel() != kept.size:
            raise ValueError(f"the evidence mask has {evidence.numel()} entries, the video {kept.size} tokens")
        evidence = evidence.view(grid_t, rows, cols).numpy()
    return {
        "frames": frames[::temporal_patch_size][:grid_t],
        "kept": kept,
        "evidence": evidence,
        "max_score": scores.float().cpu().view(grid_t, -1).amax(-1).numpy(),
        "seconds": (np.arange(grid_t) * second_per_grid if isinstance(second_per_grid, (int, float))
                    else np.asarray(second_per_grid, dtype=float)),
        "shown": frames_to_show(kept, evidence, max_frames_shown),
    }


def _cell_index(pixels: int, cells: int) -> np.ndarray:
    """For each of `pixels` pixel rows (or columns), the cell of a `cells`-long grid it falls in."""
    return np.minimum(np.arange(pixels) * cells // pixels, cells - 1)


def save_selection_png(path: str, data: dict, title: str, max_frames_shown: int | None = None) -> tuple[int, int]:
    """Write the picture to `path` atomically (a temporary file renamed into place); returns its (width, height).

    Draws `data["shown"]` (2 inches per patch at 100 dpi, above the relevance over time), or, with
    `max_frames_shown`, `frames_to_show` at that limit.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    evidence = data.get("evidence")
    shown = data.get("shown")
    if shown is None or max_frames_shown is not None:
        shown = frames_to_show(data["kept"], evidence, max_frames_shown or MAX_FRAMES_SHOWN)
    shown = np.asarray(shown, dtype=int)
    figure = plt.figure(figsize=(2 * len(shown), 4.5), dpi=100)
    try:
        for column, patch in enumerate(shown):
            axis = figure.add_subplot(2, len(shown), column + 1)
            frame = data["frames"][min(patch, len(data["frames"]) - 1)].astype(np.float32) / 255
            mask = data["kept"][patch]
            rows, cols = _cell_index(frame.shape[0], mask.shape[0]), _cell_index(frame.shape[1], mask.shape[1])
            lit = mask[rows][:, cols][..., None]
            axis.imshow(frame * (0.25 + 0.75 * lit))  # dropped patches dimmed to a quarter
            label = f"{data['seconds'][patch]:.1f}s: {int(mask.sum())}/{mask.size}"
            if evidence is not None and evidence[patch].any():
                cell_h, cell_w = frame.shape[0] / mask.shape[0], frame.shape[1] / mask.shape[1]
                for row, col in zip(*np.nonzero(evidence[patch])):
                    axis.add_patch(Rectangle((col * cell_w - 0.5, row * cell_h - 0.5), cell_w, cell_h, fill=False,
                                             edgecolor=EVIDENCE_COLOUR, linewidth=1.5))
                label += f", evidence {int((mask & evidence[patch]).sum())}/{int(evidence[patch].sum())}"
            axis.set_title(label, fontsize=7)
            axis.axis("off")
        axis = figure.add_subplot(2, 1, 2)
        if evidence is not None:
            per_patch = evidence.reshape(len(evidence), -1).any(-1)
            step = float(data["seconds"][1] - data["seconds"][0]) if len(data["seconds"]) > 1 else 1.0
            for index, second in enumerate(data["seconds"][per_patch]):  # centred on the patch's point
                axis.axvspan(second - step / 2, second + step / 2, color="tab:green", alpha=0.2,
                             label="evidence" if index == 0 else None)
        axis.plot(data["seconds"], data["max_score"], color="tab:blue", label="max relevance")
        kept_any = data["kept"].reshape(len(data["kept"]), -1).any(-1)
        axis.scatter(data["seconds"][kept_any], data["max_score"][kept_any], color="tab:red", zorder=3,
                     label="kept")
        axis.set_xlabel("seconds")
        axis.set_ylabel("relevance r")
        axis.legend(fontsize=8)
        caption = "lit: kept tokens" + (", outlined: evidence" if evidence is not None and evidence.any() else "")
        figure.suptitle(f"{title}\n{caption}", fontsize=9)
        figure.tight_layout()
        directory = os.path.dirname(os.path.abspath(path))
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".png", delete=False) as handle:
            temporary = handle.name
        try:
            figure.savefig(temporary, format="png")
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        width, height = figure.get_size_inches() * figure.dpi
    finally:
        plt.close(figure)
    return int(round(width)), int(round(height))


__all__ = ["MAX_FRAMES_SHOWN", "frames_to_show", "save_selection_png", "selection_figure_data"]
