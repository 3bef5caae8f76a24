"""The project's pictures (matplotlib, Agg outside notebooks), each written atomically as a PNG.

* `fid_vs_w(curves, path)`: one line per snapshot (or setting), optional error bars;
* `fid_w_cfg(ws, cfgs, values, path)`: a heat map of a joint (w, cfg) sweep;
* `sample_grid(rows, path)`: rows of uint8 images (base vs Neon, same seeds) side by side;
* `scatter(sets, path)`: 2-D point sets (the toy's samples) in panels side by side on shared axes.

Every function returns the path it wrote; figure sizes are fixed so tests can check them
(`SIZE_FID`, `SIZE_HEATMAP`, `SIZE_SCATTER` in pixels; a sample grid is its images' size times the grid, plus
margins for the row titles).
"""

import math
import sys

import numpy as np

from neon.io import files

DPI = 100
SIZE_FID = (640, 400)
SIZE_HEATMAP = (640, 480)
SIZE_SCATTER = (640, 320)


def pyplot():
    """matplotlib.pyplot, on the Agg backend unless a notebook shows figures inline."""
    import matplotlib

    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fid_vs_w(curves: dict, path: str, ylabel: str = "FID", title: str | None = None,
             logy: bool = False) -> str:
    """curves: label -> (ws, values) or (ws, values, errors); errors (same length, ± one sd) are drawn
    as bars. A dotted line marks w = 0 (the base)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(SIZE_FID[0] / DPI, SIZE_FID[1] / DPI), dpi=DPI)
    for label, curve in curves.items():
        ws, values = curve[0], curve[1]
        errors = curve[2] if len(curve) > 2 else None
        if errors is not None:
            ax.errorbar(ws, values, yerr=errors, label=str(label), marker="o", markersize=3, capsize=2)
        else:
            ax.plot(ws, values, label=str(label), marker="o", markersize=3)
    ax.axvline(0.0, color="k", linestyle=":", linewidth=1)
    ax.set(xlabel="w", ylabel=ylabel, title=title or f"{ylabel} against w")
    if logy:
        ax.set_yscale("log")
    if curves:
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def fid_w_cfg(ws: list[float], cfgs: list[float], values, path: str, label: str = "FID",
              title: str | None = None) -> str:
    """values: [len(cfgs), len(ws)] (NaN where a point was not evaluated); the lowest is marked."""
    plt = pyplot()
    grid = np.asarray(values, dtype=np.float64).reshape(len(cfgs), len(ws))
    fig, ax = plt.subplots(figsize=(SIZE_HEATMAP[0] / DPI, SIZE_HEATMAP[1] / DPI), dpi=DPI)
    image = ax.imshow(np.ma.masked_invalid(grid), origin="lower", aspect="auto", cmap="viridis_r")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_xticks(range(len(ws)), [f"{w:g}" for w in ws], rotation=90, fontsize=7)
    ax.set_yticks(range(len(cfgs)), [f"{c:g}" for c in cfgs], fontsize=7)
    if np.isfinite(grid).any():
        row, col = np.unravel_index(np.nanargmin(grid), grid.shape)
        ax.plot([col], [row], "r*", markersize=10)
    ax.set(xlabel="w", ylabel="cfg", title=title or f"{label} over (w, cfg)")
    return _save(plt, fig, path)


def sample_grid(rows: dict, path: str, columns: int | None = None) -> str:
    """rows: title -> uint8 images [N, H, W, C] (C = 1 or 3), every row the same N, H, W; one figure
    row per entry (the titles on the left), `columns` images per row (default all N)."""
    plt = pyplot()
    titles = list(rows)
    arrays = [np.asarray(rows[t]) for t in titles]
    n = min(len(a) for a in arrays)
    columns = min(columns or n, n)
    height, width = arrays[0].shape[1:3]
    scale = max(1, math.ceil(48 / max(height, width)))  # tiny images are shown at ≥ 48 px
    fig_w = (columns * width * scale + 120) / DPI
    fig_h = (len(titles) * (height * scale + 8) + 16) / DPI
    fig, axes = plt.subplots(len(titles), 1, figsize=(fig_w, fig_h), dpi=DPI, squeeze=False)
    for ax, title, images in zip(axes[:, 0], titles, arrays):
        strip = np.concatenate(list(images[:columns]), axis=1)
        ax.imshow(strip.squeeze(-1) if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(str(title), rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=110 / (fig_w * DPI), right=0.99, top=0.98, bottom=0.02, hspace=0.1)
    with files.atomic(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)
    return path


def scatter(sets: dict, path: str, title: str | None = None) -> str:
    """sets: title -> points float [N, 2]; one panel per entry, side by side, with the same axis
    limits (those of all the points together), so spreads compare at a glance."""
    plt = pyplot()
    arrays = {str(t): np.asarray(points, dtype=np.float64).reshape(-1, 2) for t, points in sets.items()}
    every = np.concatenate(list(arrays.values()))
    low, high = every.min(axis=0), every.max(axis=0)
    pad = 0.05 * np.maximum(high - low, 1e-6)
    fig, axes = plt.subplots(1, len(arrays), figsize=(SIZE_SCATTER[0] / DPI, SIZE_SCATTER[1] / DPI), dpi=DPI,
                             squeeze=False, sharex=True, sharey=True)
    for ax, (label, points) in zip(axes[0], arrays.items()):
        ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5, linewidths=0)
        ax.set(
            xlim=(low[0] - pad[0], high[0] + pad[0]), ylim=(low[1] - pad[1], high[1] + pad[1]), title=label
        )
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(plt, fig, path)


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    with files.atomic(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)
    return path
