"""A picture of what QTSplus kept: sampled frames with the kept patches lit, and relevance over time."""

import os
import tempfile

import numpy as np
import torch


def selection_figure_data(
    frames: np.ndarray, grid_thw: tuple[int, int, int], kept_indices: torch.Tensor, scores: torch.Tensor,
    merge_size: int, temporal_patch_size: int, second_per_grid: float,
) -> dict:
    """Per temporal patch: its first frame, a kept mask over merged patches `[h, w]`, the max score and time."""
    grid_t, grid_h, grid_w = grid_thw
    rows, cols = grid_h // merge_size, grid_w // merge_size
    kept = torch.zeros(grid_t * rows * cols, dtype=torch.bool)
    kept[kept_indices.cpu()] = True
    return {
        "frames": frames[::temporal_patch_size][:grid_t],
        "kept": kept.view(grid_t, rows, cols).numpy(),
        "max_score": scores.float().cpu().view(grid_t, -1).amax(-1).numpy(),
        "seconds": np.arange(grid_t) * second_per_grid,
    }


def save_selection_png(path: str, data: dict, title: str, max_frames_shown: int = 8) -> tuple[int, int]:
    """Write the picture to `path` atomically (a temporary file renamed into place); returns its (width, height)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = np.unique(np.linspace(0, len(data["frames"]) - 1, min(max_frames_shown, len(data["frames"]))).round())
    figure = plt.figure(figsize=(2 * len(shown), 4.5), dpi=100)
    for column, patch in enumerate(shown.astype(int)):
        axis = figure.add_subplot(2, len(shown), column + 1)
        frame = data["frames"][patch].astype(np.float32) / 255
        mask = data["kept"][patch]
        cell_h, cell_w = frame.shape[0] // mask.shape[0], frame.shape[1] // mask.shape[1]
        lit = np.kron(mask, np.ones((cell_h, cell_w)))[..., None]
        axis.imshow(frame * (0.25 + 0.75 * lit))  # dropped patches dimmed to a quarter
        axis.set_title(f"{data['seconds'][patch]:.1f}s: {int(mask.sum())}/{mask.size}", fontsize=8)
        axis.axis("off")
    axis = figure.add_subplot(2, 1, 2)
    axis.plot(data["seconds"], data["max_score"], color="tab:blue", label="max relevance")
    kept_any = data["kept"].reshape(len(data["kept"]), -1).any(-1)
    axis.scatter(data["seconds"][kept_any], data["max_score"][kept_any], color="tab:red", zorder=3, label="kept")
    axis.set_xlabel("seconds")
    axis.set_ylabel("relevance r")
    axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".png", delete=False) as handle:
        temporary = handle.name
    try:
        figure.savefig(temporary, format="png")
        os.replace(temporary, path)
    finally:
        plt.close(figure)
        if os.path.exists(temporary):
            os.remove(temporary)
    width, height = figure.get_size_inches() * figure.dpi
    return int(round(width)), int(round(height))
