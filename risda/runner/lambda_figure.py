"""The paper's Table 5 across imbalance factors beside our cells: a table and a figure.

Table 5 reports RISDA, RISDA without reasoning and RISDA without re-weighting (and Table 1 plain CE)
at λ = 200, 100, 50, 20, 10. Ours are the finished cells of those arms on the report's main protocol,
column (c) (what the paper reports) and column (a); a λ no cell of ours ran is said so, not left out.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .ablation.spec import ARM_LABELS, published_now, published_rows
from .evidence import finished
from .table_writers import markdown_lines

ARMS = ("ce", "no_reweight", "no_reasoning", "risda")   # Table 5's rows and its CE baseline
DIFFS = (("risda", "no_reasoning"), ("risda", "no_reweight"))   # what Table 5 is there to show, per λ


def published_by_arm(plan: dict) -> dict[str, dict[float, float]]:
    """{arm: {λ: error}} from the spec's RISDA-paper rows of Table 5's arms (first row per arm)."""
    out = {}
    for row in published_rows({"paper_numbers": published_now(plan)}, plan["cells"][0]["config"]["dataset"]):
        if row["arm"] in ARMS and row["arm"] not in out and "RISDA paper" in row["source"] and len(row["errors"]) > 1:
            out[row["arm"]] = row["errors"]
    return out


def ours_by_arm(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean (a) and (c) and the number of seeds per (arm, λ), paper variant and confusion graph."""
    ok = finished(runs)
    ok = ok[ok.cell_id.map(lambda c: c[0] in ARMS and c[1:] == ("paper", "confusion"))]
    if not len(ok):
        return pd.DataFrame(columns=["arm", "imbalance", "last", "best", "seeds", "per_seed"])
    ok = ok.assign(imbalance=ok.imbalance.astype(float))
    groups = ok.groupby(["arm", "imbalance"])
    out = groups.agg(last=("test_error", "mean"), best=("best_test_error", "mean"), seeds=("seed", "nunique"))
    out["per_seed"] = [g.groupby("seed")[["test_error", "best_test_error"]].mean() for _, g in groups]
    return out.reset_index()


def difference(paper: dict, mine: dict, a: str, b: str, lam: float) -> str:
    """`paper / ours (c)` of arm a − arm b at λ; ours the mean of the per-seed differences over the seeds
    both arms ran (paired: same images, same stage I), with (a) and how many seeds."""
    p = paper.get(a, {}).get(lam), paper.get(b, {}).get(lam)
    o = mine.get((a, lam)), mine.get((b, lam))
    left = "–" if None in p else f"{p[0] - p[1]:+.2f}"
    d = None if None in o else (o[0].per_seed - o[1].per_seed).dropna()
    if d is None or not len(d):
        return f"{left} / not run"
    return f"{left} / {d.best_test_error.mean():+.2f} (a {d.test_error.mean():+.2f}, n={len(d)})"


def lambda_table(paper: dict, ours: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(Markdown table: one row per arm, per λ `paper / ours (c)`, then the differences DIFFS; the
    (arm, λ) pairs not run)."""
    lams = sorted({l for e in paper.values() for l in e}, reverse=True)
    mine = {(r.arm, r.imbalance): r for r in ours.itertuples()}
    rows, missing = [], []
    for arm in (a for a in ARMS if a in paper):
        cells = []
        for lam in lams:
            p = paper[arm].get(lam)
            o = mine.get((arm, lam))
            if o is None:
                missing.append(f"{ARM_LABELS.get(arm, arm)} at λ={lam:g}")
            cells.append(f"{'–' if p is None else f'{p:.2f}'} / " + ("not run" if o is None else f"{o.best:.2f} (a {o.last:.2f}, n={o.seeds})"))
        rows.append([ARM_LABELS.get(arm, arm), *cells])
    rows += [[f"{ARM_LABELS.get(a, a)} − {ARM_LABELS.get(b, b)}", *(difference(paper, mine, a, b, lam) for lam in lams)]
             for a, b in DIFFS if a in paper and b in paper]
    table = pd.DataFrame(rows, columns=["arm", *(f"λ={l:g}: paper / ours (c)" for l in lams)])
    return markdown_lines(table, "l" + "r" * len(lams)), missing


def plot_lambda(paper: dict, ours: pd.DataFrame, path: Path) -> Path:
    """Error against λ (log axis): the paper's lines dashed, ours as filled markers (column (c))."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for i, arm in enumerate(a for a in ARMS if a in paper):
        lams = sorted(paper[arm])
        ax.plot(lams, [paper[arm][l] for l in lams], ls="--", marker="o", mfc="none", color=f"C{i}",
                label=f"{ARM_LABELS.get(arm, arm)}: paper")
        mine = ours[ours.arm == arm].sort_values("imbalance")
        if len(mine):
            ax.plot(mine.imbalance, mine.best, ls="-", marker="s", color=f"C{i}", label=f"{ARM_LABELS.get(arm, arm)}: ours (c)")
    ax.set_xscale("log")
    ticks = sorted({l for e in paper.values() for l in e})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("imbalance factor λ")
    ax.set_ylabel("top-1 test error (%)")
    ax.set_title("Table 5 across λ: the paper (dashed) and our cells", fontsize=10)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def lambda_section(plan: dict, runs: pd.DataFrame, figures: Path | None, out_path: Path | None) -> list[str]:
    """The report's section, or nothing when the spec publishes no row across several λ."""
    paper = published_by_arm(plan)
    if not paper:
        return []
    ours = ours_by_arm(runs)
    table, missing = lambda_table(paper, ours)
    md = ["## Table 5 across λ", "", "The paper's Table 5 (and its Table 1 CE row) beside our cells on this protocol: "
          "paper / ours in column (c), with (a) and the number of seeds; the last rows are the differences Table 5 "
          "is there to show (negative: RISDA lower), ours the mean of the per-seed differences over the seeds both arms ran.", "", *table, ""]
    if missing:
        md += [f"Not run yet ({len(missing)}): {', '.join(missing)}.", ""]
    if figures is not None:
        path = plot_lambda(paper, ours, Path(figures) / "table5_lambda.png")
        rel = path.name if out_path is None else os.path.relpath(path, Path(out_path).parent)
        md += [f"![Table 5 across λ]({rel})", ""]
    return md
