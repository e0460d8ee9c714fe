"""One PNG per study, drawn from the same panels as the printed table, showing the data itself.

Side by side, the errors of the metric's epoch selection: all, many, medium, few. In each, every
seed is a point and each row of the table (an arm, a variant, a λ) its mean ± std over the seeds.
With several values of the column axis (λ, head count) the rows are lines over it; with one, the
rows lie along the y axis. Published values (overall top-1 error, in the `all` panel) are ticks of
their own colours, named in a legend outside the axes; a published row matched to an arm sits on
that arm's row, the others on a row of their own. A cell that is not fully ok says so in red.
The heatmap kind (α × β) draws one heat map per group.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from ...trainer.evaluate import GROUPS, SELECTIONS
from .spec import axis_label, coerce, published_label, value_label
from .tables import FAILED, METRIC_LABELS, NOT_RUN, OK, PARTIAL, published_for, panels, row_label, table_title

MARKS = {FAILED: "failed", NOT_RUN: "not run", PARTIAL: "partial"}
PUBLISHED_COLOURS = ("black", "#b8860b", "#008b8b", "#8b008b", "#8b4513", "#6b8e23", "#dc143c", "#708090")
OURS = "C0"


def group_metrics(metric: str) -> list[tuple[str, str]]:
    """(group, column) of the metric's selection: all, many, medium, few; the metric alone if it has no groups."""
    for names in SELECTIONS.values():
        if metric in names:
            return list(zip(("all", *GROUPS), names))
    return [("all", metric)]


def seed_values(runs: pd.DataFrame, key: dict, metric: str) -> pd.Series:
    """The metric of the ok runs of one cell (axis -> value), indexed by seed."""
    mask = runs.status == OK
    for axis, value in key.items():
        mask &= runs[axis].map(lambda v: _same(coerce(axis, v), value))
    return runs[mask].set_index("seed")[metric].dropna().sort_index()


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b))


def present_rows(panel) -> list[tuple]:
    return [rk for rk in panel.row_keys if any((rk, c) in panel.cells for c in panel.cols)]


def published_row_of(plan: dict, rows: list[tuple], arm: str | None) -> int | None:
    """The table row a published row belongs on: its arm's (the paper's variant), if the table has it."""
    axes = plan["spec"]["rows"]
    for i, rk in enumerate(rows):
        key = dict(zip(axes, rk))
        if arm is not None and key.get("arm") == arm and key.get("variant", "paper") == "paper":
            return i
    return None


def status_note(r: dict | None) -> str:
    if r is None or r["status"] == OK:
        return ""
    parts = [f"{int(r['n_failed'])} failed"] * bool(r["n_failed"]) + [f"{int(r['n_not_run'])} not run"] * bool(r["n_not_run"])
    return f"{int(r['n_ok'])}/{int(r['n_runs'])} seeds; " + ", ".join(parts)


# --- one λ: the rows along the y axis ------------------------------------------------------
def draw_along_y(ax, plan, panel, runs, metric, published, extra: bool):
    """Seeds as points, mean ± std per row; `published`: (colour, label, row index or None, value);
    `extra`: a last row for the published methods that are none of the rows."""
    col, rows = panel.cols[0], present_rows(panel)
    labels = [textwrap.fill(row_label(plan, rk), 30) for rk in rows] + (["published: other methods"] if extra else [])
    for y, rk in enumerate(rows):
        key = {**panel.key, **dict(zip(plan["spec"]["rows"], rk)), plan["spec"]["cols"]: col}
        pts = seed_values(runs, key, metric)
        ax.scatter(pts.values, y + np.linspace(-0.15, 0.15, len(pts)) if len(pts) > 1 else [y] * len(pts), s=22,
                   facecolors="none", edgecolors=OURS, linewidths=1, zorder=3, label="one seed")
        r = panel.cells.get((rk, col))
        mean, std = _stat(r, metric, "mean"), _stat(r, metric, "std")
        if not math.isnan(mean):
            ax.errorbar(mean, y, xerr=None if math.isnan(std) else std, fmt="D", color=OURS, mec="black", ms=6, capsize=4,
                        zorder=4, label="mean ± std over seeds")
        if status_note(r):
            labels[y] += f"\n({status_note(r)})"
    for colour, label, i, value in published:
        ax.plot([value], [len(rows) if i is None else i], ls="none", marker="|", ms=18, mew=3, color=colour, label=label, zorder=5)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for y, tick in enumerate(ax.get_yticklabels()):
        if y < len(rows) and status_note(panel.cells.get((rows[y], col))):
            tick.set_color("red")
    ax.set_ylim(len(labels) - 0.5, -0.5)  # the table's order, top to bottom
    ax.grid(axis="x", alpha=0.3)


# --- several λ: lines over the column axis -------------------------------------------------
def x_positions(cols: list) -> tuple[list[float], bool]:
    """(x of each column value, log scale?): the values themselves where numeric, else 0, 1, 2..."""
    if all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in cols):
        xs = [float(c) for c in cols]
        return xs, min(xs) > 0 and max(xs) / min(xs) >= 10
    return [float(i) for i in range(len(cols))], False


def draw_over_x(ax, plan, panel, runs, metric, published):
    """One line per row (mean ± std), its seeds as points; `published`: (colour, label, {col: value})."""
    spec = plan["spec"]
    xs, log = x_positions(panel.cols)
    not_ok, rows = {}, present_rows(panel)
    for i, rk in enumerate(rows):
        colour, at = f"C{i % 10}", dodge(xs, log, i, len(rows))
        stats = [panel.cells.get((rk, c)) for c in panel.cols]
        mean = [_stat(r, metric, "mean") for r in stats]
        std = [0.0 if math.isnan(s) else s for s in (_stat(r, metric, "std") for r in stats)]
        ax.errorbar(at, mean, yerr=std, marker="o", ms=5, capsize=3, color=colour, label=row_label(plan, rk, named=True), zorder=4)
        for x, a, c, r in zip(xs, at, panel.cols, stats):
            pts = seed_values(runs, {**panel.key, **dict(zip(spec["rows"], rk)), spec["cols"]: c}, metric)
            ax.scatter([a] * len(pts), pts.values, s=14, facecolors="none", edgecolors=colour, linewidths=0.8, zorder=3)
            if status_note(r):
                not_ok.setdefault(x, []).append(r["status"])
    ax.scatter([], [], s=14, facecolors="none", edgecolors="grey", linewidths=0.8, label="one seed")
    for colour, label, values in published:
        pts = [(x, values[c]) for x, c in zip(xs, panel.cols) if values.get(c) is not None]
        ax.plot(*zip(*pts), ls="none", marker="_", ms=20, mew=3, color=colour, label=label, zorder=5)
    if log:
        ax.set_xscale("log")
    ax.set_xticks(xs, [value_label(spec["cols"], c) + ("\n" + ", ".join(f"{st.count(s)} {MARKS[s]}" for s in MARKS if s in st)
                                                      if (st := not_ok.get(x)) else "") for x, c in zip(xs, panel.cols)])
    ax.minorticks_off()
    for x, tick in zip(xs, ax.get_xticklabels()):
        tick.set_color("red" if x in not_ok else "black")
    ax.set_xlabel(axis_label(spec["cols"]))
    ax.grid(alpha=0.3)


def dodge(xs: list[float], log: bool, i: int, n: int) -> list[float]:
    """Row i's x positions, shifted a little from the others' so that their bars do not overlap."""
    step = (i - (n - 1) / 2) * 0.25 / max(n, 1)  # a quarter of the gap between neighbouring columns, over all rows
    if log:
        return [x * (min(b / a for a, b in zip(sorted(xs), sorted(xs)[1:])) if len(xs) > 1 else 2) ** step for x in xs]
    gap = min(b - a for a, b in zip(sorted(xs), sorted(xs)[1:])) if len(xs) > 1 else 1
    return [x + step * gap for x in xs]


def _stat(r, metric, what) -> float:
    return math.nan if r is None else float(r[f"{metric}_{what}"])


# --- α × β: heat maps ------------------------------------------------------------------------
def draw_heatmap(ax, plan, panel, metric, fig):
    spec = plan["spec"]
    grid = np.array([[_stat(panel.cells.get((rk, c)), metric, "mean") for c in panel.cols] for rk in panel.row_keys])
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    fig.colorbar(im, ax=ax, label=METRIC_LABELS.get(metric, metric))
    for i, rk in enumerate(panel.row_keys):
        for j, c in enumerate(panel.cols):
            r = panel.cells.get((rk, c))
            if r is not None:
                text = f"{grid[i, j]:.1f}" if r["status"] == OK else MARKS[r["status"]]
                text = f"{grid[i, j]:.1f}\n(partial)" if r["status"] == PARTIAL else text
                light = r["status"] == OK and im.norm(grid[i, j]) < 0.5  # viridis_r is light at the low end
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="red" if r["status"] != OK else "black" if light else "white")
    ax.set_xticks(range(len(panel.cols)), [value_label(spec["cols"], c) for c in panel.cols])
    ax.set_yticks(range(len(panel.row_keys)), [row_label(plan, rk) for rk in panel.row_keys])
    ax.set_xlabel(axis_label(spec["cols"]))
    ax.set_ylabel(" / ".join(axis_label(a) for a in spec["rows"]))


# --- the figure ------------------------------------------------------------------------------
def published_marks(plan: dict, panel, metric: str, along_y: bool) -> list[tuple]:
    rows = present_rows(panel)
    out = []
    for colour, p in zip(PUBLISHED_COLOURS * 4, published_for(plan, metric)):
        label = textwrap.fill(published_label(p), 70)
        if along_y and (value := p["errors"].get(float(panel.cols[0]))) is not None:
            out.append((colour, label, published_row_of(plan, rows, p["arm"]), value))
        elif not along_y and any(p["errors"].get(float(c)) is not None for c in panel.cols):
            out.append((colour, label, {c: p["errors"].get(float(c)) for c in panel.cols}))
    return out


def layout_kind(plan: dict, ps) -> str:
    if plan["spec"]["figure"] == "heatmap":
        return "heatmap"
    return "over_x" if any(len(p.cols) > 1 for p in ps) else "along_y"


def plot_study(plan: dict, runs: pd.DataFrame, summary: pd.DataFrame, metric: str, path: str | Path) -> Path:
    import matplotlib.pyplot as plt
    fig = study_figure(plan, runs, summary, metric)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def study_figure(plan: dict, runs: pd.DataFrame, summary: pd.DataFrame, metric: str):
    """The matplotlib Figure: a row of group panels per panel of the table."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = panels(summary, plan) or []
    groups = group_metrics(metric)
    kind = layout_kind(plan, ps)
    n_rows = max([len(present_rows(p)) + 1 for p in ps] or [1])
    height = (0.36 * n_rows + 1.3) if kind == "along_y" else 3.4
    fig, axes = plt.subplots(max(1, len(ps)), len(groups), figsize=(2.4 + 3.3 * len(groups), height * max(1, len(ps)) + 1.2),
                             squeeze=False, sharey="row" if kind == "along_y" else False, layout="constrained")
    for axrow, panel in zip(axes, ps):
        marks = published_marks(plan, panel, groups[0][1], kind == "along_y")
        for g, (ax, (group, m)) in enumerate(zip(axrow, groups)):
            if kind == "heatmap":
                draw_heatmap(ax, plan, panel, m, fig)
            elif kind == "along_y":
                draw_along_y(ax, plan, panel, runs, m, marks if g == 0 else [], any(i is None for _, _, i, _ in marks))
                ax.set_xlabel(METRIC_LABELS.get(m, m), fontsize=8)
                ax.set_ylabel(" / ".join(axis_label(a) for a in plan["spec"]["rows"]) if g == 0 else "")
            else:
                draw_over_x(ax, plan, panel, runs, m, marks if g == 0 else [])
                ax.set_ylabel(METRIC_LABELS.get(m, m), fontsize=8)
            ax.set_title(f"{group}" + (f" — {panel.title}" if panel.key else ""), fontsize=9)
    if kind != "heatmap":
        legend(fig, axes)
    fig.suptitle(textwrap.fill(table_title(plan, runs, metric), 140), fontsize=9)
    return fig


def legend(fig, axes) -> None:
    """One legend for the figure, below the panels: every label once."""
    seen = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    seen = dict(sorted(seen.items(), key=lambda kv: kv[0].startswith("published")))  # ours first (a stable sort)
    if seen:
        fig.legend(seen.values(), seen.keys(), loc="outside lower center", ncols=min(3, len(seen)), fontsize=7, frameon=False)
