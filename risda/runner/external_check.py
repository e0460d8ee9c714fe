"""The external check: each published number beside our cells of the same method, and first the cell
trained on the published number's own protocol (the spec its `[[paper.*]]` row names as `protocol`).

A published number is only comparable with a cell trained the way its source trained: batch, weight
decay, Nesterov and the subset move long-tailed CIFAR results by points. So every cell of the method is
listed with its settings, and the one on the source's own protocol is marked; a published row without a
protocol was trained on its source's own settings, which no cell here ran. Column (c), the best-test
epoch, is what the literature reports; Δ is ours − published there.
"""
from __future__ import annotations

import json

import pandas as pd

from .ablation.spec import published_now, published_rows
from .evidence import cell_label, cell_of
from .table_writers import markdown_lines

CHECK_INTRO = ("Each published number beside every cell of ours of the same method, with the cell's settings; the cell "
               "on the source's own protocol (the spec its published row names) first. Column (c), the best-test "
               "epoch, is what the literature reports; Δ is ours − published there. A published row with no "
               "protocol was trained on its source's own settings, which no cell here ran.")
TOLERANCE = 1.5   # points in column (c): the bar for "the pipeline reproduces this number"
SETTINGS = (("batch_size", "batch {}"), ("weight_decay", "wd {:g}"), ("nesterov", None), ("pad_mode", "{} padding"),
            ("warmup_epochs", "warm-up {}"), ("epochs", "{} epochs"), ("precision", "{}"), ("subset_seed", "subset seed {}"))


def settings_text(cfg: dict, subset: bool = True) -> str:
    """`batch 100, wd 0.0005, Nesterov, zeros padding, warm-up 5, 200 epochs, subset seed 0` (without the
    subset seed when `subset` is false)."""
    out = []
    for key, fmt in SETTINGS:
        if key in cfg and (subset or key != "subset_seed"):
            out.append(("Nesterov" if cfg[key] else "no Nesterov") if fmt is None else fmt.format(cfg[key]))
    return ", ".join(out)


def settings_differences(cfg: dict, base: dict, keys=tuple(k for k, _ in SETTINGS)) -> str:
    """The settings among `keys` in which `cfg` differs from `base`, as `key value (here base value)`; empty
    when none."""
    return ", ".join(f"{k} {cfg.get(k)} (here {base.get(k)})" for k in keys if cfg.get(k) != base.get(k))


def our_cells(runs: pd.DataFrame, arm: str, lam: float) -> pd.DataFrame:
    """One row per (spec, variant, settings: precision among them, so that cells of two precisions are
    never averaged) of the finished cells of `arm` at `lam` on the paper's graph: seeds,
    settings, mean (a) and (c)."""
    ok = runs[runs.status == "ok"].assign(cell_id=lambda r: [cell_of(x) for x in r.to_dict("records")])
    cfgs = [json.loads(c) for c in ok.config]
    ok = ok.assign(settings=[settings_text(c, subset=False) for c in cfgs], subset=[c.get("subset_seed") for c in cfgs])
    ok = ok[(ok.arm == arm) & (ok.imbalance.astype(float) == lam) & ok.cell_id.map(lambda c: c[2] == "confusion")]
    ok = ok.drop_duplicates(["spec", "cell_id", "settings", "subset", "seed"], keep="last")   # a cell collated twice counts once
    rows = []
    for (spec, cell, settings), g in ok.groupby([ok.spec, ok.cell_id, ok.settings], sort=False):
        subsets = ", ".join(str(v) for v in sorted(g.subset.dropna().unique()))
        rows.append(dict(spec=spec, cell=cell_label(cell), variant=cell[1], settings=f"{settings}, subset seed {subsets}", seeds=len(g),
                         last=g.test_error.mean(), best=g.best_test_error.mean()))
    return pd.DataFrame(rows)


def check_rows(plans: list[dict], runs: pd.DataFrame) -> pd.DataFrame:
    """Every (published number, our cell of its method) of the studies' specs, deduplicated by method and
    source; the cell on the source's own protocol first."""
    dataset = plans[0]["cells"][0]["config"]["dataset"]
    seen, out = set(), []
    lams = sorted({float(v) for v in runs.imbalance.dropna()}, reverse=True)
    for plan in plans:
        for row in published_rows({"paper_numbers": published_now(plan)}, dataset):
            if (row["method"], row["source"]) in seen or row["arm"] is None:
                continue
            seen.add((row["method"], row["source"]))
            for lam in (l for l in lams if l in row["errors"]):
                cells = our_cells(runs, row["arm"], lam)
                if not len(cells):
                    out.append(dict(row, lam=lam, published=row["errors"][lam], own=False, cell="not run here"))
                    continue
                cells["own"] = cells.spec == row["protocol"]
                for c in cells.sort_values("own", ascending=False, kind="stable").to_dict("records"):
                    out.append(dict(row, lam=lam, published=row["errors"][lam], **c))
    return pd.DataFrame(out)


def external_check_lines(plans: list[dict], runs: pd.DataFrame) -> list[str]:
    """The section's table and one sentence per published number on its own protocol."""
    rows = check_rows(plans, runs)
    if not len(rows):
        return []
    f = lambda v: "–" if pd.isna(v) else f"{v:.2f}"
    table = pd.DataFrame({
        "published": [f"{r.method} ({r.published:.2f}, λ={r.lam:g})" for r in rows.itertuples()],
        "source": rows.source,
        "our cell": [c if c == "not run here" else f"{c} ({s})" for c, s in zip(rows.cell, rows.get("spec", rows.cell))],
        "its settings": rows.get("settings", pd.Series("", index=rows.index)).fillna(""),
        "source's own protocol?": ["yes" if o else ("its own, not run here" if pd.isna(p) else "no") for o, p in zip(rows.own, rows.protocol)],
        "seeds": [("–" if pd.isna(s) else f"{int(s)}") for s in rows.get("seeds", pd.Series(float("nan"), index=rows.index))],
        "ours (a) last": [f(v) for v in rows.get("last", pd.Series(float("nan"), index=rows.index))],
        "ours (c) best-test": [f(v) for v in rows.get("best", pd.Series(float("nan"), index=rows.index))],
        "Δ (c)": [("–" if pd.isna(v) else f"{v - p:+.2f}") for v, p in zip(rows.get("best", pd.Series(float("nan"), index=rows.index)), rows.published)],
    })
    words = []
    for r in rows[rows.own].itertuples():
        d = r.best - r.published
        words.append(f"- {r.method} ({r.source}): {r.published:.2f} published, ours {r.best:.2f} (c) / {r.last:.2f} (a) on its "
                     f"own protocol ({r.cell}, {int(r.seeds)} seed{'s' * (r.seeds != 1)}): Δ {d:+.2f}, "
                     + (f"within {TOLERANCE:g} points." if abs(d) <= TOLERANCE else f"**more than {TOLERANCE:g} points away**."))
    for r in rows.drop_duplicates(["method", "source"]).itertuples():
        if pd.isna(r.protocol):
            words.append(f"- {r.method} ({r.source}): trained on its source's own protocol, which no cell here ran; "
                         "the rows above are our cells of the same method on other settings.")
    return markdown_lines(table, "lllllrrrr") + ["", *words]
