"""The paired differences as a figure: for each comparison the report makes (risda.runner.evidence:
RISDA − its ablations and CE-DRW, each graph source − confusion, the reference variant − the paper's,
RISDA − each baseline), A − B at each seed as a point (one colour per seed), the mean ± a 95%
t-interval over the seeds where both finished, and the zero line; one panel per error of the
paired table. An interval that does not cross zero is a difference the seeds agree on.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from .evidence import METRICS, cell_label, finished, pairs


def differences(ok: pd.DataFrame) -> pd.DataFrame:
    """One row per comparison, error and seed: A − B (points of error), in the report's order."""
    rows = []
    for a, b in pairs(ok):
        name = f"{cell_label(a)} − {cell_label(b)}"
        for metric, label in METRICS:
            d = (ok[ok.cell_id == a].set_index("seed")[metric] - ok[ok.cell_id == b].set_index("seed")[metric]).dropna()
            rows += [dict(comparison=name, error=label, seed=int(s), difference=float(v)) for s, v in d.items()]
    return pd.DataFrame(rows, columns=["comparison", "error", "seed", "difference"])


def interval(d: pd.Series) -> tuple[float, float]:
    """(mean, half-width of its 95% t-interval); the half-width is NaN with fewer than two seeds."""
    from scipy import stats
    n = len(d)
    half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan
    return float(d.mean()), float(half)


def plot_paired(runs: pd.DataFrame, path: str | Path) -> Path | None:
    """The figure of the finished runs' paired differences; None when no comparison has both sides."""
    fig = paired_figure(runs)
    if fig is None:
        return None
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def paired_figure(runs: pd.DataFrame):
    """The matplotlib Figure, or None when no comparison has both sides."""
    diffs = differences(finished(runs))
    if not len(diffs):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(diffs.comparison))
    seeds = sorted(diffs.seed.unique())
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS) + 2.6, 0.45 * len(names) + 1.8),
                             sharey=True, squeeze=False, layout="constrained")
    for ax, (_, label) in zip(axes[0], METRICS):
        draw_panel(ax, diffs[diffs.error == label], names, seeds)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("A − B (points of error)", fontsize=8)
    counts = diffs.groupby("comparison").seed.nunique()
    axes[0][0].set_yticks(range(len(names)), [textwrap.fill(f"{n} (n={counts[n]})", 40) for n in names], fontsize=8)
    axes[0][0].set_ylim(len(names) - 0.5, -0.5)
    legend = dict(sorted(((label, h) for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels())),
                         key=lambda lh: (not lh[0].startswith("seed"), lh[0])))  # the seeds, then the mean
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=len(legend), fontsize=7, frameon=False)
    fig.suptitle("Paired differences A − B per seed (same images, same stage I; negative: A has the lower error), "
                 "mean ± 95% t-interval", fontsize=9)
    return fig


def draw_panel(ax, diffs: pd.DataFrame, names: list[str], seeds: list[int]) -> None:
    ax.axvline(0, color="grey", ls="--", lw=1, zorder=1)
    offsets = dict(zip(seeds, np.linspace(-0.3, -0.1, len(seeds)) if len(seeds) > 1 else [-0.2]))  # the seeds above the mean
    for y, name in enumerate(names):
        d = diffs[diffs.comparison == name].set_index("seed").difference
        for seed, v in d.items():
            ax.scatter(v, y + offsets[seed], s=18, color=f"C{seeds.index(seed) + 1}", zorder=3, label=f"seed {seed}")
        if not len(d):
            continue
        mean, half = interval(d)
        ax.errorbar(mean, y + 0.05, xerr=None if math.isnan(half) else half, fmt="D", color="black", ms=5, capsize=4, zorder=4,
                    label="mean ± 95% t-interval")
        ax.annotate(f"{mean:+.2f}" + ("" if math.isnan(half) else f" ± {half:.2f}"), (mean, y + 0.05), xytext=(0, -5),
                    textcoords="offset points", ha="center", va="top", fontsize=6)
    ax.grid(axis="x", alpha=0.3)
