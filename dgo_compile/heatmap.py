"""The schedule heatmap: which blocks each denoiser call computes, optionally under a pruner's P(reuse).
Drawn for report.md (`compile --config`) and by `dgo-compile schedule`."""

from __future__ import annotations

from pathlib import Path

import torch

from .files import write_atomic
from .schedule import Schedule


def save_heatmap(scores: torch.Tensor | None, schedule: Schedule, path: str | Path, title: str) -> Path:
    """One PNG (elements x denoiser calls): the pruner's P(reuse) above the chosen schedule, or the
    schedule alone without `scores`. Call ticks are whole calls (0-based)."""
    from matplotlib import pyplot as plt

    fig = heatmap_figure(scores, schedule, title)
    try:
        return write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=110))
    finally:
        plt.close(fig)


def heatmap_figure(scores: torch.Tensor | None, schedule: Schedule, title: str):
    """`save_heatmap`'s matplotlib figure (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    compute = torch.tensor([[float(c) for c in row] for row in schedule.compute])
    calls, columns = compute.shape
    panels = [(compute.T.numpy(), "schedule: dark = compute, light = reuse cached output", "Greys")]
    if scores is not None:
        panels.insert(0, (scores.T.numpy(), "P(reuse) from the pruner", "viridis"))
    height = 1.2 + 0.22 * columns
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 0.16 * calls + 3), len(panels) * height + 0.6),
                             constrained_layout=True, squeeze=False)
    for ax, (data, label, cmap) in zip(axes[:, 0], panels):
        image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(columns), schedule.elements, fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("denoiser call")
        ax.set_title(label, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.02)
    fig.suptitle(title, fontsize=10)
    return fig
