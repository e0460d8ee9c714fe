"""One PNG per study, drawn from the same panels as the printed table: `lines` (error
against the column axis, one line per row, ± std bars), `bars` (grouped bars), `heatmap`
(rows × columns, e.g. α × β). Cells that are not fully ok are marked, never left blank.
Published rows of the spec (lines and bars against λ) are dashed lines labelled with their
method and source."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pandas as pd

from .spec import axis_label, value_label
from .tables import FAILED, METRIC_LABELS, NOT_RUN, OK, PARTIAL, panel_published, panels, row_label, table_title

MARKS = {FAILED: "failed", NOT_RUN: "not run", PARTIAL: "partial"}


def plot_study(plan: dict, runs: pd.DataFrame, summary: pd.DataFrame, metric: str, path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = plan["spec"]
    kind = spec["figure"]
    ps = panels(summary, plan)
    n = max(1, len(ps))
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n if kind != "heatmap" else 5.0 * n, 4.2), squeeze=False)
    for ax, panel in zip(axes[0], ps):
        xs = list(range(len(panel.cols)))
        xlabels = [value_label(spec["cols"], c) for c in panel.cols]
        if kind == "heatmap":
            _heatmap(ax, plan, panel, metric, fig)
        else:
            rows = [rk for rk in panel.row_keys if any((rk, c) in panel.cells for c in panel.cols)]
            width = 0.8 / max(1, len(rows))
            not_ok = {}  # x -> statuses of the rows there that are not fully ok
            for i, rk in enumerate(rows):
                stats = [panel.cells.get((rk, c)) for c in panel.cols]
                mean = [_val(r, metric, "mean") for r in stats]
                std = [0.0 if math.isnan(s) else s for s in (_val(r, metric, "std") for r in stats)]
                label = row_label(plan, rk, named=True)
                if kind == "bars":
                    pos = [x - 0.4 + width * (i + 0.5) for x in xs]
                    ax.bar(pos, [0 if math.isnan(m) else m for m in mean], width, yerr=std, label=label, capsize=2)
                else:
                    ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=label)
                for x, r in zip(xs, stats):
                    if r is not None and r["status"] != OK:
                        not_ok.setdefault(x, []).append(r["status"])
            for label, vals in panel_published(plan, panel, metric):  # dashed, labelled with method and source
                pts = [(x, v) for x, v in zip(xs, vals) if v is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="--", marker="x", alpha=0.6,
                        label=textwrap.fill(label, 60))
            for x, statuses in not_ok.items():  # under the tick: "2 failed, 1 partial", in red
                xlabels[x] += "\n" + ", ".join(f"{statuses.count(s)} {MARKS[s]}" for s in (FAILED, PARTIAL, NOT_RUN) if s in statuses)
            ax.set_xticks(xs, xlabels)
            for x, tick in enumerate(ax.get_xticklabels()):
                if x in not_ok:
                    tick.set_color("red")
            ax.set_xlabel(axis_label(spec["cols"]))
            ax.set_ylabel(METRIC_LABELS.get(metric, metric))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        if panel.key:
            ax.set_title(panel.title, fontsize=9)
    fig.suptitle(textwrap.fill(table_title(plan, runs, metric), 70 * n), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _val(r, metric, what):
    return math.nan if r is None else float(r[f"{metric}_{what}"])


def _heatmap(ax, plan, panel, metric, fig):
    import numpy as np
    spec = plan["spec"]
    grid = np.full((len(panel.row_keys), len(panel.cols)), np.nan)
    for i, rk in enumerate(panel.row_keys):
        for j, c in enumerate(panel.cols):
            r = panel.cells.get((rk, c))
            grid[i, j] = _val(r, metric, "mean")
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    fig.colorbar(im, ax=ax, label=METRIC_LABELS.get(metric, metric))
    for i, rk in enumerate(panel.row_keys):
        for j, c in enumerate(panel.cols):
            r = panel.cells.get((rk, c))
            if r is None:
                continue
            text = f"{grid[i, j]:.1f}" if r["status"] == OK else MARKS[r["status"]]
            if r["status"] == PARTIAL:
                text = f"{grid[i, j]:.1f}\n(partial)"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if r["status"] == OK else "red")
    ax.set_xticks(range(len(panel.cols)), [value_label(spec["cols"], c) for c in panel.cols])
    ax.set_yticks(range(len(panel.row_keys)), [row_label(plan, rk) for rk in panel.row_keys])
    ax.set_xlabel(axis_label(spec["cols"]))
    ax.set_ylabel(" / ".join(axis_label(a) for a in spec["rows"]))
