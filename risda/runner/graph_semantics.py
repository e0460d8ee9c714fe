"""Does the knowledge graph lend from semantically close classes? (CIFAR-100 only; ours, not the paper's.)

The paper's argument for reasoning is that a tail class borrows from its neighbours in meaning. On
CIFAR-100 "close" has an outside definition: the 20 superclasses of 5 classes each
(risda.trainer.data.CIFAR100_SUPERCLASSES). For each tail row c of ε (the classes the diagnostics call
tail: all but the head) we read its largest off-diagonal entry and ask whether that class shares c's
superclass, and what share of the row's off-diagonal mass stays inside the superclass. Chance is 4 of the
99 other classes (4.0%) for a row that lends uniformly.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from ..trainer.data import CIFAR100_SUPERCLASSES
from .table_writers import markdown_lines

SUPER = {c: s for s, members in CIFAR100_SUPERCLASSES.items() for c in members}
CHANCE = 4 / 99
SHOWN = 5   # tail classes whose neighbours are named: the rarest


def row_semantics(eps: np.ndarray, classes: list[str], tail: list[str]) -> dict:
    """Over the tail rows: how many lend at all, how many of those have their top neighbour in the same
    superclass, and the mean share of off-diagonal mass inside the superclass."""
    index = {c: i for i, c in enumerate(classes)}
    top_same, share, lending = 0, [], 0
    for c in tail:
        i = index[c]
        row = eps[i].astype(float).copy()
        row[i] = 0.0
        if row.sum() <= 0:
            continue
        lending += 1
        same = np.array([SUPER.get(k) == SUPER.get(c) for k in classes])
        top_same += bool(same[int(row.argmax())])
        share.append(row[same].sum() / row.sum())
    return dict(tail=len(tail), lending=lending, top_same=top_same, share=float(np.mean(share)) if share else float("nan"))


def semantics_table(ok: pd.DataFrame, label) -> list[str]:
    """One row per reasoning cell and seed whose graph names CIFAR-100's classes; [] otherwise.
    `label(cell_id)`: the cell's name in the report."""
    rows = []
    for r in ok.sort_values("seed").to_dict("records"):
        graph, nb = r.get("graph"), r.get("graph_neighbours")
        if not isinstance(graph, str) or not isinstance(nb, str):
            continue
        g = json.loads(graph)
        classes = g.get("classes") if isinstance(g, dict) else None
        if not classes or not set(classes) <= set(SUPER):
            continue
        s = row_semantics(np.asarray(g["eps"]), classes, list(json.loads(nb)))
        rows.append([label(r["cell_id"]), str(r["seed"]), f"{s['lending']} of {s['tail']}",
                     f"{s['top_same']} ({100 * s['top_same'] / max(s['lending'], 1):.0f}%)", f"{100 * s['share']:.1f}%"])
    if not rows:
        return []
    head = ["cell", "seed", "tail rows that lend", "top neighbour in the same superclass", "off-diagonal mass inside the superclass"]
    return markdown_lines(pd.DataFrame(rows, columns=head), "lrrrr") + [
        "", f"Chance, for a row that lends uniformly: {100 * CHANCE:.1f}% (4 of the 99 other classes)."]


def rarest(neighbours: dict, many: int = 10) -> dict:
    """All tail rows when there are few; else the `SHOWN` rarest (the neighbour lists run from the most to
    the fewest images: the long-tail subset orders classes by size)."""
    return neighbours if len(neighbours) <= many else dict(list(neighbours.items())[-SHOWN:])


def plot_superclass_graph(eps: np.ndarray, classes: list[str], path, title: str) -> None:
    """ε with its classes ordered by superclass, the diagonal blanked and a box around each superclass:
    borrowing from a semantically close class is colour inside a box."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    order = [classes.index(c) for members in CIFAR100_SUPERCLASSES.values() for c in members]
    e = np.asarray(eps, dtype=float)[np.ix_(order, order)]
    np.fill_diagonal(e, np.nan)
    fig, ax = plt.subplots(figsize=(13, 12), layout="constrained")
    im = ax.imshow(e, cmap="viridis", vmin=0, vmax=np.nanmax(e))
    for k in range(len(CIFAR100_SUPERCLASSES)):
        ax.add_patch(Rectangle((5 * k - 0.5, 5 * k - 0.5), 5, 5, fill=False, ec="white", lw=0.8))
    names = [classes[i] for i in order]
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5)
    ax.set_yticks(range(len(names)), names, fontsize=5)
    ax.set_xlabel("borrows from (class i), grouped by superclass")
    ax.set_ylabel("class c")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04, label="ε[c, i], off-diagonal")
    fig.savefig(path, dpi=100)
    plt.close(fig)
