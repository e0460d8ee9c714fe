"""<out>/graph.png: the knowledge graph ε of one run, for a person to read (ours; the paper shows none).

A heatmap with the class names for C ≤ 100 (the diagonal is drawn but the colour scale is set by
the off-diagonal entries, which are what reasoning borrows); beyond that a table of each class's
top neighbours, since a 1,000-class heatmap shows nothing. The one module outside risda/runner/
that imports matplotlib, lazily, so that a single `python -m risda.train` run draws its own graph.
"""
from __future__ import annotations

from pathlib import Path

import torch

HEATMAP_MAX_CLASSES = 100
TABLE_ROWS = 40
MAX_INCHES = 14.0  # a 100-class heatmap larger than this is read shrunk, and its labels vanish


def plot_graph(eps: torch.Tensor, class_names: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C = len(class_names)
    off = eps.clone()
    off.fill_diagonal_(0)
    if C <= HEATMAP_MAX_CLASSES:
        size = min(max(4.0, 0.28 * C + 2), MAX_INCHES)  # 100 classes: rows of 0.13 inch, labels of 5 points
        fontsize = 9 if C <= 20 else 5
        fig, ax = plt.subplots(figsize=(size + 1.5, size))
        vmax = max(float(off.max()), 1e-6)
        im = ax.imshow(eps.numpy(), cmap="viridis", vmin=0, vmax=vmax)
        ax.set_xticks(range(C), class_names, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(C), class_names, fontsize=fontsize)
        if C <= 20:
            for i in range(C):
                for j in range(C):
                    if eps[i, j] >= 0.005:
                        ax.text(j, i, f"{eps[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                color="black" if (i != j and eps[i, j] > 0.6 * vmax) else "white")
        ax.set_xlabel("borrows from (class i)")
        ax.set_ylabel("class c")
        ax.set_title(f"knowledge graph ε[c, i] (colour scale: off-diagonal, max {vmax:.3f}; mean 1-ε_cc "
                     f"{float(off.sum(1).mean()):.3f})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    else:
        mass = off.sum(1)
        rows = torch.argsort(mass, descending=True)[:TABLE_ROWS].tolist()
        text = []
        for c in rows:
            w, idx = torch.sort(off[c], descending=True)
            text.append([class_names[c], f"{float(mass[c]):.3f}",
                         ", ".join(f"{class_names[i]} {float(v):.3f}" for v, i in zip(w[:3], idx[:3]) if v > 0)])
        fig, ax = plt.subplots(figsize=(12, 0.3 * len(text) + 1))
        ax.axis("off")
        ax.table(cellText=text, colLabels=["class", "1-ε_cc", "top neighbours"], loc="center", cellLoc="left")
        ax.set_title(f"knowledge graph: the {len(text)} of {C} classes that borrow most")
    fig.tight_layout()
    fig.savefig(path, dpi=110 if C <= 20 else 160)
    plt.close(fig)
