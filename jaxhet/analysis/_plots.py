"""Pictures a user looks at: particle montages and central sections of maps (PNG)."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["save_particle_montage", "save_central_sections", "save_map_series_sections"]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_particle_montage(images: np.ndarray, path: str, n: int = 16, titles=None, title: str | None = None) -> str:
    """A grid of the first ``n`` images [n, D, D] (each contrast-stretched) saved as PNG."""
    plt = _plt()
    images = np.asarray(images)[:n]
    k = len(images)
    cols = int(np.ceil(np.sqrt(k)))
    rows = int(np.ceil(k / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, img in enumerate(images):
        ax = axes.ravel()[i]
        lo, hi = np.percentile(img, [1, 99])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save_central_sections(volume: np.ndarray, path: str, title: str | None = None,
                          projections: bool = True) -> str:
    """Central XY, XZ, YZ sections (and, optionally, projections) of a map [z, y, x] as PNG."""
    plt = _plt()
    v = np.asarray(volume)
    c = [s // 2 for s in v.shape]
    panels = [("XY section (z=c)", v[c[0]]), ("XZ section (y=c)", v[:, c[1], :]), ("YZ section (x=c)", v[:, :, c[2]])]
    if projections:
        panels += [("projection along z", v.sum(0)), ("projection along y", v.sum(1)), ("projection along x", v.sum(2))]
    cols = 3
    rows = len(panels) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, img) in zip(axes.ravel(), panels):
        ax.imshow(img, cmap="gray", origin="lower")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save_map_series_sections(volumes, path: str, labels=None, axis: int = 0, title: str | None = None) -> str:
    """Projections of a series of maps side by side (e.g. a movie along a latent path)."""
    plt = _plt()
    vols = [np.asarray(v) for v in volumes]
    k = len(vols)
    fig, axes = plt.subplots(1, k, figsize=(2.2 * k, 2.4), squeeze=False)
    for i, (ax, v) in enumerate(zip(axes[0], vols)):
        ax.imshow(v.sum(axis), cmap="gray", origin="lower")
        ax.axis("off")
        if labels is not None:
            ax.set_title(str(labels[i]), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=80)
    plt.close(fig)
    return path
