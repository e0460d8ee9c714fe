"""The third edition's report pieces: the external check, the graph's semantics on CIFAR-100, Table 5
across λ, and a report of several parts declared in results/report.toml."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_report import flat, make_plan_, synthetic_trials, write_outputs

from risda.runner import report
from risda.runner.ablation.spec import check_spec, load_spec
from risda.trainer.config import ConfigError
from risda.runner.external_check import check_rows, external_check_lines, our_cells
from risda.runner.graph_semantics import SUPER, plot_superclass_graph, row_semantics, semantics_table
from risda.runner.lambda_figure import lambda_section, lambda_table, ours_by_arm, published_by_arm
from risda.trainer.data import CIFAR100_SUPERCLASSES

PAPER = dict(batch_size=100, weight_decay=5e-4, nesterov=True, subset_seed=0, pad_mode="zeros", warmup_epochs=5, epochs=200,
             precision="bf16")
LDAM = dict(PAPER, batch_size=128, weight_decay=2e-4, nesterov=False)


def run_row(spec, arm, seed, last, best, cfg=PAPER, variant="paper", lam=100.0):
    return dict(spec=spec, arm=arm, seed=seed, variant=variant, graph_source=None, imbalance=lam, status="ok",
                config=json.dumps(cfg), test_error=last, best_test_error=best, test_error_at_best_val=float("nan"),
                few_error=80.0)


def plan_of(spec_name):
    return {"spec": {"name": spec_name, "paper_numbers": {}}, "cells": [{"config": {"dataset": "cifar100lt"}}]}


def test_the_external_check_puts_the_cell_on_the_sources_own_protocol_first():
    rng = np.random.default_rng(1)
    ldam_best, paper_best = rng.uniform(59, 63, 2), rng.uniform(56, 59, 3)
    runs = pd.DataFrame([run_row("cifar100lt_ldam", "ce", s, b + 0.2, b, LDAM) for s, b in enumerate(ldam_best)]
                        + [run_row("cifar100lt_paper", "ce", s, b + 0.1, b) for s, b in enumerate(paper_best)]
                        + [run_row("cifar100lt_paper", "ce", 0, 99.0, 99.0) | dict(status="failed")])
    rows = check_rows([plan_of("cifar100lt_paper"), plan_of("cifar100lt_ldam")], runs)
    ldam_ce = rows[rows.source == "LDAM-DRW paper (Cao et al., NeurIPS 2019), Table 2 (ERM)"]
    assert len(ldam_ce) == 2, "one row per protocol our CE ran on, never the same published row twice"
    own, other = ldam_ce.iloc[0], ldam_ce.iloc[1]
    assert own.own and own.spec == "cifar100lt_ldam" and own.seeds == 2 and not other.own
    assert own.best == pytest.approx(ldam_best.mean()) and other.best == pytest.approx(paper_best.mean())
    assert "batch 128, wd 0.0002, no Nesterov" in own.settings
    lines = flat(external_check_lines([plan_of("cifar100lt_paper")], runs))
    d = ldam_best.mean() - 61.68
    assert f"61.68 published, ours {ldam_best.mean():.2f} (c)" in lines and f"Δ {d:+.2f}" in lines
    assert ("within 1.5 points" if abs(d) <= 1.5 else "more than 1.5 points away") in lines
    la = next(line for line in lines.splitlines() if line.startswith("| Logit-adjusted loss"))
    assert "not run here" in la and "its own, not run here" in la   # Menon et al.'s protocol: no row names it


def test_the_external_check_never_averages_two_precisions():
    fp32 = dict(LDAM, precision="fp32")
    runs = pd.DataFrame([run_row("cifar100lt_ldam", "ce", 0, 61.0, 60.0, LDAM), run_row("cifar100lt_ldam", "ce", 0, 63.0, 62.0, fp32)])
    rows = check_rows([plan_of("cifar100lt_ldam")], runs)
    ce = rows[rows.source == "LDAM-DRW paper (Cao et al., NeurIPS 2019), Table 2 (ERM)"]
    assert sorted(ce.best) == [60.0, 62.0] and list(ce.seeds) == [1, 1]   # two rows, not one mean of 61.0
    assert {"bf16" in s for s in ce.settings} == {True, False} and any("fp32" in s for s in ce.settings)


def test_a_published_row_names_a_bundled_spec_as_its_protocol():
    spec = load_spec("cifar100lt_ldam")
    spec.paper_numbers["cifar100lt"][0]["protocol"] = "ldam_settings"
    with pytest.raises(ConfigError, match="protocol 'ldam_settings' is not a bundled spec"):
        check_spec(spec)


def test_the_superclasses_cover_cifar100_once():
    names = [c for members in CIFAR100_SUPERCLASSES.values() for c in members]
    assert len(CIFAR100_SUPERCLASSES) == 20 and all(len(m) == 5 for m in CIFAR100_SUPERCLASSES.values())
    assert len(set(names)) == 100 and "aquarium_fish" in names and "willow_tree" in names


def test_row_semantics_against_a_superclass_matrix(tmp_path):
    """Top neighbour and in-superclass mass of each tail row, against one-hot superclass products."""
    rng = np.random.default_rng(0)
    classes = sorted(SUPER)
    eps = rng.dirichlet(np.full(100, 0.3), size=100)
    eps[7] = np.eye(100)[7]                                 # a row that lends nothing is not counted
    tail = classes[20:]
    got = row_semantics(eps, classes, tail)
    onehot = np.array([[SUPER[c] == s for s in CIFAR100_SUPERCLASSES] for c in classes], dtype=float)
    same = onehot @ onehot.T
    off = eps * (1 - np.eye(100))
    rows = [classes.index(c) for c in tail if off[classes.index(c)].sum() > 0]
    share = ((off * same).sum(1) / np.maximum(off.sum(1), 1e-12))[rows]
    top = same[rows, off[rows].argmax(1)]
    assert got == dict(tail=80, lending=len(rows), top_same=int(top.sum()), share=pytest.approx(share.mean()))
    table = flat(semantics_table(pd.DataFrame([dict(cell_id=("risda", "paper", "confusion"), seed=0,
                                                     graph=json.dumps({"classes": classes, "eps": eps.tolist()}),
                                                     graph_neighbours=json.dumps({c: [] for c in tail}))]), lambda c: c[0]))
    assert f"| risda | 0 | {len(rows)} of 80 | {int(top.sum())} (" in table and "4.0%" in table
    plot_superclass_graph(eps, classes, tmp_path / "g.png", "ε")
    assert (tmp_path / "g.png").stat().st_size > 10_000


def test_table5_across_lambda_shows_the_paper_beside_ours_and_what_is_missing(tmp_path):
    plan = {"spec": {"name": "cifar100lt_paper", "paper_numbers": {}}, "cells": [{"config": {"dataset": "cifar100lt"}}]}
    paper = published_by_arm(plan)
    assert paper["risda"][100.0] == 49.84 and paper["ce"][200.0] == 65.30   # the RISDA paper's rows, not the LDAM-DRW paper's CE
    rng = np.random.default_rng(3)
    last, best = rng.uniform(50, 56, (2, 2)), rng.uniform(50, 56, (2, 2))   # [arm: risda, no reasoning][seed]
    runs = pd.DataFrame([run_row("cifar100lt_paper", arm, s, last[i, s], best[i, s])
                         for i, arm in enumerate(("risda", "no_reasoning")) for s in range(2)]
                        + [run_row("cifar100lt_paper", "no_reweight", 0, 57.0, 56.0)]
                        + [run_row("cifar100lt_paper", "ce", 0, 60.0, 59.0, lam=10.0)]
                        + [run_row("cifar100lt_paper", "risda", 0, 58.0, 57.5, lam=200.0)])   # the same cell at another λ
    lines, missing = lambda_table(paper, ours_by_arm(runs))
    rows = {line.split("|")[1].strip(): line for line in flat(lines).splitlines()[2:]}
    assert f"49.84 / {best[0].mean():.2f} (a {last[0].mean():.2f}, n=2)" in rows["RISDA"] and "55.24 / 57.50 (a 58.00, n=1)" in rows["RISDA"]
    # the difference row: the paper's own difference, and ours as the mean of the per-seed differences
    reasoning = rows["RISDA − w/o r (no reasoning)"]
    assert f"{49.84 - 51.09:+.2f} / {(best[0] - best[1]).mean():+.2f} (a {(last[0] - last[1]).mean():+.2f}, n=2)" in reasoning
    assert f"{55.24 - 56.97:+.2f} / not run" in reasoning
    # RISDA on seeds 0–1 against no re-weighting on seed 0: the seed they share, not the means
    assert f"{49.84 - 54.40:+.2f} / {best[0, 0] - 56.0:+.2f} (a {last[0, 0] - 57.0:+.2f}, n=1)" in rows["RISDA − w/o w (no re-weighting)"]
    assert "RISDA at λ=50" in missing and "RISDA at λ=200" not in missing and "CE at λ=100" in missing and "CE at λ=10" not in missing
    md = lambda_section(plan, runs, tmp_path, tmp_path / "R.md")
    assert (tmp_path / "table5_lambda.png").stat().st_size > 1000 and "![Table 5 across λ](table5_lambda.png)" in md


def test_a_report_of_parts_from_its_manifest(tmp_path):
    """Two parts in the declared order, headings one level down, each part's figures in its own folder; a
    study on another protocol is named as such and never paired with the main one."""
    plan = make_plan_()
    main, runs = write_outputs(tmp_path / "a", plan, synthetic_trials(plan))
    other_plan = json.loads(json.dumps(plan))
    for c in other_plan["cells"]:
        c["config"]["batch_size"] = 128
    other, _ = write_outputs(tmp_path / "b", other_plan, [dict(t, result={**t["result"], "test_error": 1.0})
                                                           for t in synthetic_trials(other_plan)])
    second, _ = write_outputs(tmp_path / "c", plan, synthetic_trials(plan))
    (tmp_path / "preface.md").write_text("## What the numbers say\n\nRead me first.\n")
    manifest = tmp_path / "report.toml"
    manifest.write_text(f'title = "Report, third edition"\npreface = "preface.md"\nout = "R.md"\n'
                        f'[[part]]\nresults = "{main.relative_to(tmp_path)}"\nalso = ["{other.relative_to(tmp_path)}"]\n'
                        f'[[part]]\nresults = "{second.relative_to(tmp_path)}"\n')
    assert report.main(["--manifest", str(manifest)]) == 0
    md = (tmp_path / "R.md").read_text()
    assert md.startswith("# Report, third edition\n") and md.index("Read me first.") < md.index("## Part 1:") < md.index("## Part 2:")
    assert "### Machine" in md and "\n## Machine" not in md
    assert "Another protocol: batch_size 128 (here 100)" in md
    paired = md[md.index("## Part 1:"):md.index("## Part 2:")]
    paired = paired[paired.index("### Paired differences"):paired.index("### Compute")]
    ok = runs[(runs.status == "ok") & (runs.imbalance == 100)]   # read at λ = 100, the paper's headline
    d = (ok[ok.arm == "risda"].set_index("seed").test_error - ok[ok.arm == "ce"].set_index("seed").test_error).dropna()
    assert f"**{d.mean():+.2f}**" in paired   # the other protocol's CE (test error 1.0) never enters a pair
    assert (main / "paired_differences.png").is_file() and (second / "paired_differences.png").is_file()


def test_a_bad_manifest_is_one_line(tmp_path, capsys):
    (tmp_path / "report.toml").write_text('title = "x"\n')
    assert report.main(["--manifest", str(tmp_path / "report.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "[[part]]" in err


def test_the_paired_table_says_which_rows_share_neither_images_nor_stage_i():
    """unpaired_note reads each side's subset seed and stage-I key per seed: the reference variant on the
    authors' subset is not paired, a baseline with its own stage I is paired by data only, an ablation on the
    shared stage I needs no note (and a variant on the same subset and stage I, as in Part 2, none either)."""
    from risda.runner.evidence import unpaired_note
    risda, ref, ldam, nor = ("risda", "paper", "confusion"), ("risda", "reference", "confusion"), \
        ("ldam_drw", "paper", "confusion"), ("no_reasoning", "paper", "confusion")
    rows = []
    for s in (0, 1):
        rows += [dict(cell_id=risda, seed=s, subset_seed=0, stage1_key=f"k{s}"), dict(cell_id=nor, seed=s, subset_seed=0, stage1_key=f"k{s}"),
                 dict(cell_id=ldam, seed=s, subset_seed=0, stage1_key=f"ldam{s}"), dict(cell_id=ref, seed=s, subset_seed=42, stage1_key=f"r{s}")]
    ok = pd.DataFrame(rows)
    assert "other images (subset seed 42 against 0)" in unpaired_note(ok, ref, risda, "ref")
    assert "each side on its own stage I" in unpaired_note(ok, risda, ldam, "ldam")
    assert unpaired_note(ok, risda, nor, "nor") == ""
    same = ok.assign(subset_seed=0, stage1_key=[f"k{s}" for s in ok.seed])
    assert unpaired_note(same, ref, risda, "ref") == ""


def test_a_cell_at_another_imbalance_factor_is_another_cell():
    """The same arm and seed at λ = 200 and λ = 100 are two cells: neither replaces the other in the
    external check (it did, when a study across λ joined the report)."""
    runs = pd.DataFrame([run_row("cifar100lt_paper", "risda", s, 53.0 + s, 52.0 + s) for s in range(3)]
                        + [run_row("cifar100lt_paper", "risda", 0, 58.0, 57.5, lam=200.0)])
    at100, at200 = our_cells(runs, "risda", 100.0), our_cells(runs, "risda", 200.0)
    assert at100.seeds.tolist() == [3] and at100.best.tolist() == [pytest.approx(53.0)]
    assert at200.seeds.tolist() == [1] and at200.best.tolist() == [pytest.approx(57.5)]


def test_a_study_is_titled_by_the_imbalance_factors_its_cells_ran_at():
    spec = {"title": "CIFAR-100-LT, λ=100: the paper's protocol (study C)"}
    plan = lambda *lams: {"spec": spec, "cells": [{"config": {"imbalance": lam}} for lam in lams]}  # noqa: E731
    assert report.study_title(plan(100.0)) == spec["title"]
    assert report.study_title(plan(200.0, 50.0, 200.0)) == "CIFAR-100-LT, λ=200, 50: the paper's protocol (study C)"
    assert report.study_title({"spec": {"name": "table5"}, "cells": [{"config": {}}]}) == "table5"
