"""The report's evidence across studies of one protocol: paired differences per seed, the
knowledge graph's diagnostics, and the compute (risda.runner.report appends these sections).

Every arm at one seed trains on the same images and forks the same stage I, so the honest
comparison of two arms is paired: their difference per seed, then its mean ± std over the seeds
where both finished. A difference "keeps its sign" when it has the same sign at every such seed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from ..trainer.arms import ARMS
from .graph_semantics import SHOWN, SUPER, plot_superclass_graph, rarest, semantics_table
from .table_writers import markdown_lines

METRICS = (("test_error", "(a) last"), ("test_error_at_best_val", "(b) best-val"), ("best_test_error", "(c) best-test"),
           ("few_error", "few (last)"))
RISDA = ("risda", "paper", "confusion")
BASELINES = ("ce", "ce_drw", "ce_posthoc_la", "la_loss", "la_deferred", "ldam_drw")


def cell_of(row) -> tuple:
    source = row.get("graph_source") if isinstance(row.get("graph_source"), str) else "confusion"
    arm = row["arm"]
    return arm, row.get("variant") or "paper", source if ARMS.get(arm) and ARMS[arm].reasons else "confusion"


def cell_label(cell: tuple) -> str:
    arm, variant, source = cell
    label = ARMS[arm].label if arm in ARMS else arm
    if variant == "reference":
        label += " (reference)"
    if source != "confusion":
        label += f", {source} graph"
    return label


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished cells, with their cell id and precision, one row per (cell, imbalance factor, seed):
    a cell collated twice counts once, and a cell at another λ is another cell. Two studies at different
    precisions trained different stage Is: a table never pairs or mixes them (the last precision is kept)."""
    ok = runs[runs.status == "ok"].copy()
    ok["cell_id"] = [cell_of(r) for r in ok.to_dict("records")]
    ok["precision_run"] = [json.loads(c).get("precision") if isinstance(c, str) else None for c in ok.get("config", [None] * len(ok))]
    if ok.precision_run.nunique() > 1:
        ok = ok[ok.precision_run == ok.precision_run.iloc[-1]]
    lam = ok.imbalance.astype(float) if "imbalance" in ok else 0.0
    return ok[~ok.assign(lam=lam).duplicated(["cell_id", "lam", "seed"], keep="last")]


def pairs(ok: pd.DataFrame) -> list[tuple[tuple, tuple]]:
    """The comparisons the report makes, where both sides ran: RISDA − its ablations and CE-DRW,
    each graph source − confusion, the reference variant − the paper's, RISDA − each baseline."""
    have = set(ok.cell_id)
    wanted = [(RISDA, (a, "paper", "confusion")) for a in ("no_reasoning", "cov_only", "ce_drw")]
    wanted += [(("risda", "paper", s), RISDA) for s in sorted({c[2] for c in have if c[0] == "risda"} - {"confusion"})]
    wanted += [(("risda", "reference", "confusion"), RISDA)]  # the authors' released code against the paper's text
    wanted += [(RISDA, (b, "paper", "confusion")) for b in BASELINES if b != "ce_drw"]
    return [(a, b) for a, b in wanted if a in have and b in have]


def paired_table(ok: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(Markdown table lines, sentences on which differences keep their sign)."""
    seeds = sorted(ok.seed.unique())
    head = ["difference", *(f"{label}: per seed ({', '.join(map(str, seeds))}) → mean ± std" for _, label in METRICS)]
    rows, words, notes = [], [], []
    for a, b in pairs(ok):
        cells, kept = [], []
        for metric, label in METRICS:
            x = ok[ok.cell_id == a].set_index("seed")[metric]
            y = ok[ok.cell_id == b].set_index("seed")[metric]
            d = (x - y).dropna()
            if not len(d):
                cells.append("–")
                continue
            per = ", ".join(f"{v:+.2f}" for v in d)
            sd = f" ± {d.std():.2f}" if len(d) > 1 else ""
            cells.append(f"{per} → **{d.mean():+.2f}**{sd}")
            if len(d) > 1 and (all(d < 0) or all(d > 0)):
                kept.append(f"{label} ({'lower' if d.mean() < 0 else 'higher'} at all {len(d)} seeds)")
        name = f"{cell_label(a)} − {cell_label(b)}"
        rows.append([name, *cells])
        n = ok[ok.cell_id.isin([a, b])].groupby("seed").cell_id.nunique().eq(2).sum()
        if n > 1:
            words.append(f"- {name}: " + ("keeps its sign in " + "; ".join(kept) if kept else
                                          f"changes sign between seeds in every column ({n} seeds)") + ".")
        else:
            words.append(f"- {name}: one seed only; no sign can be said to hold.")
        notes += [w] if (w := unpaired_note(ok, a, b, name)) else []
    return markdown_lines(pd.DataFrame(rows, columns=head), "l" + "r" * len(METRICS)), words + notes


def unpaired_note(ok: pd.DataFrame, a: tuple, b: tuple, name: str) -> str:
    """What a row of the paired table does not share, read from its runs: other images (another subset seed:
    the reference variant) or another stage I (an arm that trains its own: LDAM-DRW, the LA loss); empty when
    both sides share both at every seed where both ran."""
    x, y = (ok[ok.cell_id == c].set_index("seed") for c in (a, b))
    seeds = x.index.intersection(y.index)
    differ = lambda col: col in ok and any(x.at[s, col] != y.at[s, col] for s in seeds
                                           if pd.notna(x.at[s, col]) and pd.notna(y.at[s, col]))
    if differ("subset_seed"):
        subsets = lambda t: ", ".join(str(v) for v in sorted(t.loc[seeds, "subset_seed"].unique()))
        return (f"- {name}: other images (subset seed {subsets(x)} against {subsets(y)}) and another stage I: a difference "
                "per seed, not a paired one.")
    if differ("stage1_key"):
        return f"- {name}: the same images, but each side on its own stage I (an arm that trains its own): paired by data and seed only."
    return ""


def reasoning_cells(ok: pd.DataFrame) -> pd.DataFrame:
    """The finished cells of arms that reason over the graph (their ε and terms are measured)."""
    return ok[[ARMS.get(c[0]) is not None and ARMS[c[0]].reasons for c in ok.cell_id]]


def graph_table(ok: pd.DataFrame) -> list[str]:
    reasoning = reasoning_cells(ok)
    if not len(reasoning) or "graph_offdiag_tail" not in reasoning:
        return []
    cols = ("graph_offdiag_tail", "graph_offdiag_all", "graph_empty_tail", "graph_train_error",
            "reason_cov_ratio_first", "reason_cov_ratio_last", "reason_mean_ratio_first", "reason_mean_ratio_last")
    head = ["cell", "seed", "1−ε_cc tail", "1−ε_cc all", "empty tail rows", "train error of ε's pass (%)",
            "tr Σʳ/tr Σ first", "last", "‖αμʳ‖/‖f‖ first", "last", "test error", "few"]
    fmt = lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.4g}" if isinstance(v, float) else str(v))
    rows = [[cell_label(r["cell_id"]), str(r["seed"]), *(fmt(r.get(c)) for c in (*cols, "test_error", "few_error"))]
            for r in reasoning.sort_values(["seed"]).to_dict("records")]
    return markdown_lines(pd.DataFrame(rows, columns=head), "l" + "r" * (len(head) - 1))


def neighbour_lines(ok: pd.DataFrame) -> list[str]:
    """Each tail class's top neighbours (the SHOWN rarest where there are more than ten), for the first
    seed, per reasoning cell of the paper variant: a heading and one line per cell, or nothing."""
    lists = [(r, json.loads(r["graph_neighbours"])) for r in ok.sort_values("seed").drop_duplicates("cell_id").to_dict("records")
             if isinstance(r.get("graph_neighbours"), str) and r["cell_id"][1] == "paper"]
    if not lists:
        return []
    many = any(len(nb) > 10 for _, nb in lists)
    return [f"Top-3 neighbours of {f'the {SHOWN} rarest tail classes' if many else 'each tail class'} (weight ε[c, i]):", "",
            *(f"- {cell_label(r['cell_id'])} (seed {r['seed']}): " + "; ".join(
                f"{c} ← " + (", ".join(f"{n} {w:.3f}" for n, w in v) or "nothing") for c, v in rarest(nb).items())
              for r, nb in lists), ""]


def verdict(ok: pd.DataFrame) -> list[str]:
    """Which of the three reasons (issue: ε ≈ I; ε rich but small terms; large terms that do not
    help) the numbers support, per source, stated from the measured values."""
    out = []
    for source in ("confusion", "soft", "prototype"):
        r = ok[ok.cell_id == ("risda", "paper", source)]
        if not len(r) or "graph_offdiag_tail" not in r:
            continue
        mass, cov, mean = r.graph_offdiag_tail.mean(), r.reason_cov_ratio_first.mean(), r.reason_mean_ratio_first.mean()
        empty = r.graph_empty_tail.mean()
        if math.isnan(mass):
            continue
        if mass < 0.01:
            why = f"reason 1: ε is nearly the identity at the switch (tail off-diagonal mass {mass:.4f}, {empty:.1f} empty tail rows)"
        elif cov < 0.1 and mean < 0.05:
            why = f"reason 2: ε lends (tail mass {mass:.3f}) but the reasoned terms are small (tr Σʳ/tr Σ {cov:.3f}, ‖αμʳ‖/‖f‖ {mean:.3f})"
        else:
            why = (f"not reasons 1–2: ε lends (tail mass {mass:.3f}) and the terms are large (tr Σʳ/tr Σ {cov:.3g}, "
                   f"‖αμʳ‖/‖f‖ {mean:.3g}); whether they help is the paired difference above (reason 3 if it does not)")
        out.append(f"- **{source}**: {why}.")
    return out


def compute_lines(results_dirs: list[Path], runs: pd.DataFrame) -> list[str]:
    stage1 = []
    for d in results_dirs:
        p = Path(d) / "stage1.parquet"
        if p.is_file():
            stage1.append(pd.read_parquet(p).assign(study=Path(d).name))
    s1 = pd.concat(stage1, ignore_index=True) if stage1 else pd.DataFrame(columns=["stage1_key", "trained_now", "wall_time_s", "epochs"])
    distinct = s1.drop_duplicates("stage1_key")
    ok = runs[runs.status == "ok"]
    cfgs = [json.loads(c) for c in ok.config]
    s1_epochs = pd.Series([c.get("stage1_epochs") or int(0.8 * c["epochs"]) if ARMS[c["arm"]].stage1 else 0 for c in cfgs],
                          index=ok.index)
    run = ok.epochs_run.fillna(0)
    stage2_epochs = int((run - s1_epochs).where(run > 0, 0).sum())
    derived = int((run == 0).sum())
    lines = [f"- Stage Is: {len(distinct)} distinct ({int(distinct.epochs.fillna(0).sum())} epochs, "
             f"{distinct.wall_time_s.fillna(0).sum() / 3600:.2f} h of training), used by {len(s1)} study-stage-I rows "
             f"({len(s1) - len(distinct)} reuses across studies).",
             f"- Stage-II cells: {len(ok)} finished, {stage2_epochs} epochs trained ({derived} read from another "
             f"cell's evaluation at no training cost), {ok.wall_time_s.fillna(0).sum() / 3600:.2f} h of trial wall time.",
             "- A cell that forks a stage I trains only its stage-II epochs; without the shared stage I every cell "
             f"would train its whole schedule: {int(ok.epochs.fillna(0).sum())} epochs instead of "
             f"{stage2_epochs + int(distinct.epochs.fillna(0).sum())}."]
    return lines


def tuned_tau_table(ok: pd.DataFrame) -> list[str]:
    """Post-hoc LA at τ = 1 beside its τ chosen on the validation split alone (risda.trainer.loop.tune_adjustment)."""
    rows = ok[ok.tuned_tau.notna()] if "tuned_tau" in ok else []
    if not len(rows):
        return []
    head = ["cell", "seed", "test error at τ = 1 (all / few)", "τ chosen on validation", "its validation error",
            "test error at that τ (all / many / medium / few)"]
    table = pd.DataFrame([[cell_label(r["cell_id"]), str(r["seed"]), f"{r['test_error']:.2f} / {r['few_error']:.2f}",
                           f"{r['tuned_tau']:g}", f"{r['tuned_val_error']:.2f}",
                           " / ".join(f"{r[f'tuned_test{g}error']:.2f}" for g in ("_", "_many_", "_medium_", "_few_"))]
                          for r in rows.sort_values("seed").to_dict("records")], columns=head)
    return markdown_lines(table, "l" + "r" * 5)


def evidence_sections(runs: pd.DataFrame, results_dirs: list[Path], paired_figure: str | None = None,
                      compute_runs: pd.DataFrame | None = None) -> list[str]:
    """The sections; `paired_figure`: the paired differences' figure (risda.runner.paired_figure), shown under their
    table; `compute_runs`: the runs the compute section counts (default `runs`: also those on another protocol)."""
    ok = finished(runs)
    if not len(ok):
        return []
    lams = sorted({float(v) for v in ok.imbalance.dropna()}) if "imbalance" in ok else []
    at = f" at λ = {lams[0]:g}" if len(lams) == 1 else ""
    md = ["## Paired differences", "",
          f"Each row is A − B per seed{at} (the same images and the same stage I, unless said below the table), then "
          "the mean ± sample std over the seeds where both finished. Negative: A has the lower error.", ""]
    table, words = paired_table(ok)
    md += table + ["", *words, ""]
    md += [f"![Paired differences per seed, mean ± 95% interval]({paired_figure})", ""] if paired_figure else []
    graph = graph_table(ok)
    if graph:
        md += ["## The knowledge graph", "",
               "Measured at the switch to stage II (first) and after the last epoch (last): the off-diagonal row mass of "
               "ε over the tail classes and all classes, the tail rows that borrow nothing, the training error of the "
               "pass that built ε, and the size of the reasoned terms: tr(Σʳ_c)/tr(Σ_c) and ‖α μʳ_c‖ over the class's "
               "mean feature norm, averaged over the tail classes (risda.method.diagnostics).", "", *graph, ""]
        md += ["Which of the three reasons the numbers support:", "", *verdict(ok), ""]
        md += neighbour_lines(ok)
        semantic = semantics_table(reasoning_cells(ok), cell_label)
        if semantic:
            md += ["Does a tail class borrow from a semantically close class? Close = the same CIFAR-100 superclass "
                   "(risda.runner.graph_semantics; ours, not the paper's): per tail row of ε at the switch, its largest "
                   "off-diagonal entry, and the share of its off-diagonal mass inside its superclass.", "", *semantic, ""]
    tuned = tuned_tau_table(ok)
    if tuned:
        md += ["## Post-hoc logit adjustment: τ tuned on validation", "",
               "The CE model's logits minus τ·log π at evaluation (no training of its own). τ is chosen over a small "
               "grid on the balanced validation split only (the smaller τ on ties); the test set never takes part.", "",
               *tuned, ""]
    md += ["## Compute", "", *compute_lines(results_dirs, runs if compute_runs is None else compute_runs), ""]
    return md


def write_figures(runs: pd.DataFrame, folder: Path) -> list[tuple[str, Path]]:
    """graph_sources.png (test error, overall and few, beside each source's tail off-diagonal
    mass, mean over seeds) and graph_heatmap.png (ε of RISDA's confusion cell, first seed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from ..trainer.graph_plot import plot_graph
    ok = finished(runs)
    made = []
    rows = ok[[c[0] == "risda" and c[1] == "paper" for c in ok.cell_id]]
    if len(rows) and "graph_offdiag_tail" in rows:
        by = rows.groupby(rows.cell_id.map(lambda c: c[2]))
        agg = by.agg(test=("test_error", "mean"), few=("few_error", "mean"), mass=("graph_offdiag_tail", "mean"),
                     n=("seed", "nunique"))
        control = ok[ok.cell_id == ("no_reasoning", "paper", "confusion")]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        x = range(len(agg))
        a.bar([i - 0.2 for i in x], agg.test, 0.4, label="test error (all)")
        a.bar([i + 0.2 for i in x], agg.few, 0.4, label="test error (few)")
        if len(control):
            a.axhline(control.test_error.mean(), color="C0", ls="--", lw=1, label="no reasoning (all)")
            a.axhline(control.few_error.mean(), color="C1", ls="--", lw=1, label="no reasoning (few)")
        a.set_xticks(list(x), [f"{s}\n(n={n})" for s, n in zip(agg.index, agg.n)])
        a.set_ylabel("top-1 error (%)")
        a.legend(fontsize=7)
        b.bar(list(x), agg.mass, color="C2")
        b.set_xticks(list(x), list(agg.index))
        b.set_ylabel("tail off-diagonal mass 1 − ε_cc")
        fig.suptitle("RISDA by knowledge-graph source: error and how much the graph lends")
        fig.tight_layout()
        path = folder / "graph_sources.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(("RISDA by graph source", path))
    heat = ok[[c == RISDA for c in ok.cell_id]].sort_values("seed")
    if len(heat) and isinstance(heat.iloc[0].get("graph"), str):
        r = heat.iloc[0]
        graph = json.loads(r["graph"])
        eps = torch.tensor(graph["eps"] if isinstance(graph, dict) else graph)
        labels = graph.get("classes") if isinstance(graph, dict) else None
        if labels is None:  # an older summary: the names its neighbour lists give, in ImageFolder (sorted) order
            nb = json.loads(r.get("graph_neighbours") or "{}")
            labels = sorted(set(nb) | {n for v in nb.values() for n, _ in v})
        labels = labels if len(labels) == len(eps) else [str(i) for i in range(len(eps))]
        path = folder / "graph_heatmap.png"
        plot_graph(eps, labels, path)
        made.append((f"ε of RISDA (confusion, seed {r['seed']})", path))
        if set(labels) <= set(SUPER) and len(labels) == len(SUPER):
            path = folder / "graph_superclasses.png"
            plot_superclass_graph(eps.numpy(), labels, path, f"ε of RISDA (confusion graph, seed {r['seed']}) at the switch, "
                                  "classes grouped by CIFAR-100 superclass (boxes); diagonal blank")
            made.append((f"ε by superclass (confusion, seed {r['seed']})", path))
    return made
