"""The ablation runner (ablations/run.py, risda.runner.ablation): specs, cell expansion, collation, tables, figures,
and one real Ray Tune experiment on CIFAR-10-LT images."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from risda.trainer.config import ConfigError
from risda.trainer.presets import TABLE2
from risda.runner.ablation import cli as run
from risda.runner.ablation.spec import (DATA_FIELDS, apply_overrides, expand, list_specs, load_spec, make_plan, merge_plans, parse_spec,
                                        published_rows, read_best, table2)
from risda.runner.ablation.tables import (FAILED, METRICS, NOT_RUN, OK, PARTIAL, SELECTIONS, collate_runs, latex_table,
                                          markdown_table, rich_tables, summarize_runs)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_PY = Path(__file__).resolve().parents[1] / "ablations" / "run.py"


def plan_for(name, grid=None, flags=None, best=None):
    spec, flags, notes = apply_overrides(load_spec(name), grid or {}, flags or {})
    cells, more = expand(spec, flags, best)
    return make_plan(spec, cells, notes + more)


# --- specs and cells ------------------------------------------------------------------------
def test_the_command_line_is_thin(tmp_path):
    """ablations/run.py is risda.runner.ablation.cli.main; it runs from any folder (the installed
    package), and finds the bundled specs (package data) by name."""
    assert "from risda.runner.ablation.cli import main" in RUN_PY.read_text()
    done = subprocess.run([sys.executable, str(RUN_PY), "--spec", "fig5_head_count", "--seeds", "0", "--imbalance", "100",
                           "--dry-run"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "fig5_head_count" in done.stdout, done.stdout + done.stderr


def test_bundled_specs_expand():
    assert {"table5", "fig4_alpha_beta", "fig5_head_count", "variants"} <= set(list_specs())
    plan = plan_for("table5")
    assert len(plan["cells"]) == 6 * 5 * 3
    assert plan["axes"] == ["arm", "imbalance", "seed"]
    assert plan["cells"][0]["config"]["dataset"] == "cifar100lt" and plan["cells"][0]["config"]["epochs"] == 200
    for cell in plan["cells"]:
        alpha, beta = TABLE2[cell["key"]["imbalance"]]
        assert (cell["config"]["alpha"], cell["config"]["beta"]) == (alpha, beta)
    assert len(plan_for("fig4_alpha_beta")["cells"]) == 6 * 6 * 2
    assert len(plan_for("fig5_head_count")["cells"]) == 4 * 2 * 3
    variants = plan_for("variants")
    assert {c["config"]["variant"] for c in variants["cells"]} == {"paper", "reference"}


def test_table2_nearest_factor_is_named():
    assert table2(100) == (0.5, 0.75, 100.0, True)
    assert table2(150)[2:] == (200.0, False)     # log scale: 150 is nearer 200 than 100
    assert table2(30)[2:] == (20.0, False)
    plan = plan_for("table5", grid={"imbalance": ["150"], "seed": ["0"], "arm": ["ce"]})
    assert any("λ=150 is not in the paper's Table 2" in n and "λ=200" in n for n in plan["notes"])
    assert plan["cells"][0]["hp_source"] == "Table 2 λ=200 (nearest to 150)"


def test_seed_is_subset_and_model_seed_and_arms_share_the_subset():
    plan = plan_for("variants", grid={"seed": ["0", "3"]})
    groups = {}
    for c in plan["cells"]:
        cfg = c["config"]
        assert cfg["seed"] == cfg["subset_seed"] == c["key"]["seed"]  # also in the reference variant (not 42)
        groups.setdefault((cfg["imbalance"], cfg["seed"]), set()).add(tuple(cfg[f] for f in DATA_FIELDS))
    assert all(len(v) == 1 for v in groups.values())
    pinned = plan_for("table5", grid={"seed": ["0", "1"]}, flags={"subset_seed": 42})
    assert {c["config"]["subset_seed"] for c in pinned["cells"]} == {42}


def test_precedence_flags_best_json_and_grid(tmp_path):
    # a typed trainer flag beats the spec's [config]; a flag naming an axis narrows it
    plan = plan_for("fig4_alpha_beta", flags={"alpha": 0.5, "epochs": 7, "dataset": "cifar10lt"})
    assert {c["config"]["alpha"] for c in plan["cells"]} == {0.5}
    assert len(plan["cells"]) == 6 * 2 and {c["config"]["epochs"] for c in plan["cells"]} == {7}
    # best.json replaces Table 2 (only method/optimiser fields are taken from it)
    best_path = tmp_path / "best.json"
    best_path.write_text(json.dumps({"config": {"alpha": 0.3, "beta": 1.2, "head_count": 3, "epochs": 999,
                                                "dataset": "cifar100lt", "imbalance": 100.0},
                                     "params": {"alpha": 0.3, "beta": 1.2, "head_count": 3}}))
    best, notes = read_best(best_path)
    assert best == {"alpha": 0.3, "beta": 1.2, "head_count": 3}
    plan = plan_for("table5", grid={"seed": ["0"]}, best=best)
    assert {(c["config"]["alpha"], c["config"]["beta"], c["config"]["epochs"]) for c in plan["cells"]} == {(0.3, 1.2, 200)}
    assert plan["cells"][0]["hp_source"] == "best.json"
    # a grid value beats best.json
    plan = plan_for("fig4_alpha_beta", best=best)
    assert len({c["config"]["alpha"] for c in plan["cells"]}) == 6


def test_spec_errors_name_the_fix():
    with pytest.raises(ConfigError, match="not a Config field"):
        parse_spec({"grid": {"alhpa": [1]}}, "bad")
    with pytest.raises(ConfigError, match="not in \\[grid\\]"):
        parse_spec({"grid": {"arm": ["ce"]}, "layout": {"rows": ["arm"], "cols": "beta"}}, "bad")
    with pytest.raises(ConfigError, match="unknown arm"):
        parse_spec({"grid": {"arm": ["rsida"], "imbalance": [10]}}, "bad")
    with pytest.raises(ConfigError, match="both"):
        parse_spec({"grid": {"arm": ["ce"], "imbalance": [10]}, "config": {"arm": "ce"}}, "bad")
    with pytest.raises(ConfigError, match="different data"):
        plan_for("table5", grid={"n_max": ["100", "200"], "seed": ["0"]})
    with pytest.raises(ConfigError, match="--epochs"):
        plan_for("table5", flags={"epochs": 0})


def test_param_space_reproduces_the_cells():
    from ray.tune.search.variant_generator import generate_variants
    from risda.runner.ablation.experiment import param_space
    plan = plan_for("table5", grid={"imbalance": ["150", "10"], "seed": ["0", "1"], "arm": ["risda", "ce"]},
                    flags={"dataset": "cifar10lt"})
    configs = [cfg for _, cfg in generate_variants(param_space(plan))]
    expected = {json.dumps(c["config"], sort_keys=True) for c in plan["cells"]}
    assert len(configs) == len(plan["cells"])
    assert {json.dumps(c, sort_keys=True) for c in configs} == expected


# --- collation on synthetic trials ----------------------------------------------------------
def synthetic(plan, fail=(), skip=(), partial_epochs=()):
    rng = random.Random(0)
    trials = []
    for i, c in enumerate(plan["cells"]):
        if i in skip:
            continue
        if i in fail:
            trials.append(dict(config=c["config"], status="ERROR", error="ValueError: boom", result={}))
            continue
        result = {m: 30 + 40 * rng.random() for m in METRICS}
        result.update(last_epoch=c["config"]["epochs"] - 1, epochs_run=c["config"]["epochs"], wall_time_s=1.0,
                      completed=i not in partial_epochs)
        trials.append(dict(config=c["config"], status="TERMINATED", error=None, result=result))
    return trials


def test_merging_plans_of_seeds_run_one_after_another():
    s0 = {**plan_for("cifar10lt_reduced", {"seed": [0]}), "commit": "a" * 40, "dirty": False, "started_at": 10.0, "ended_at": 20.0}
    s1 = {**plan_for("cifar10lt_reduced", {"seed": [1]}), "commit": "a" * 40, "dirty": False, "started_at": 30.0, "ended_at": 50.0}
    merged = merge_plans({"s0": s0, "s1": s1})
    assert len(merged["cells"]) == len(s0["cells"]) + len(s1["cells"]) == 12
    assert merged["spec"]["grid"]["seed"] == [0, 1] and merged["axes"] == s0["axes"]
    assert (merged["commit"], merged["started_at"], merged["ended_at"]) == ("a" * 40, 10.0, 50.0)
    assert merge_plans({"s0": s0, "again": s0})["cells"] == s0["cells"]  # a cell planned twice counts once
    assert "commit" not in merge_plans({"s0": s0, "s1": {**s1, "commit": "b" * 40}})  # no single commit to name
    with pytest.raises(ConfigError, match="lr"):  # the same cell trained with another config
        merge_plans({"s0": s0, "lr": plan_for("cifar10lt_reduced", {"seed": [0]}, {"lr": 0.05})})
    with pytest.raises(ConfigError, match="axes"):
        merge_plans({"s0": s0, "ref": plan_for("cifar10lt_reduced", {"seed": [0], "variant": ["reference"]})})


def test_collation_keeps_failed_and_missing_cells_and_matches_pandas():
    plan = plan_for("table5", grid={"arm": ["risda", "ce"], "imbalance": ["100", "10"]}, flags={"dataset": "cifar10lt"})
    trials = synthetic(plan, fail={0}, skip={4}, partial_epochs={7})
    runs = collate_runs(plan, trials)
    assert len(runs) == len(plan["cells"]) == 12
    assert runs.status.tolist().count(FAILED) == 2 and runs.status.tolist().count(NOT_RUN) == 1
    assert runs.loc[0, "error"] == "ValueError: boom"
    assert "stopped after" in runs.loc[7, "error"]
    assert runs.loc[runs.status != OK, "test_error"].isna().all()

    summary = summarize_runs(runs, plan)
    assert len(summary) == 4
    ok = runs[runs.status == OK]
    direct = ok.groupby(["arm", "imbalance"]).test_error.agg(["mean", "std", "count"])
    for _, row in summary.iterrows():
        d = direct.loc[(row.arm, row.imbalance)]
        assert row.test_error_mean == pytest.approx(d["mean"])
        assert row.test_error_std == pytest.approx(d["std"]) or (math.isnan(row.test_error_std) and d["count"] < 2)
        assert row.test_error_count == d["count"]
        assert row.n_runs == 3 and row.n_ok + row.n_failed + row.n_not_run == 3
    statuses = dict(zip(zip(summary.arm, summary.imbalance), summary.status))
    assert statuses[("risda", 100.0)] == PARTIAL and statuses[("risda", 10.0)] == PARTIAL
    assert statuses[("ce", 100.0)] == PARTIAL and statuses[("ce", 10.0)] == OK  # cell 7: ce, λ=100, seed 1

    # every cell failed -> the table says FAILED, never a number
    all_failed = collate_runs(plan, synthetic(plan, fail=set(range(12))))
    s2 = summarize_runs(all_failed, plan)
    assert set(s2.status) == {FAILED} and s2.test_error_mean.isna().all()
    (title, table, caption), = rich_tables(plan, all_failed, s2, "test_error")
    from rich.console import Console
    console = Console(record=True, width=200)
    console.print(table)
    assert console.export_text().count("FAILED") == 4
    assert "CIFAR-10-LT" in title and "CIFAR-100-LT" in caption
    assert "FAILED" in markdown_table(plan, all_failed, s2, "test_error")
    assert "\\toprule" in latex_table(plan, runs, summary, "test_error")


# --- published numbers ------------------------------------------------------------------------
def test_published_rows_name_their_method_and_source():
    """Every published row of every bundled spec names its method and its source (paper and
    table); a row matched to an arm is that method (docs/method.md's published numbers)."""
    for name in list_specs():
        spec = load_spec(name)
        for ds, rows in spec.paper_numbers.items():
            assert isinstance(rows, list)
            for row in rows:
                assert row["method"] and "Table" in row["source"] and row["errors"]
    rows = {(r["method"], r["source"]): r for r in published_rows(load_spec("table5"), "cifar10lt")}
    by_method = {m: r for (m, _), r in rows.items()}
    # plain CE (ERM) on CIFAR-10-LT is the LDAM-DRW paper's; MetaSAug's rows are no arm of ours
    ce = [r for r in rows.values() if r["arm"] == "ce"]
    assert len(ce) == 1 and ce[0]["errors"] == {100.0: 29.64, 10.0: 13.61} and "LDAM-DRW paper" in ce[0]["source"]
    assert by_method["LDAM-DRW"]["errors"] == {100.0: 22.97, 10.0: 11.84} and by_method["LDAM-DRW"]["arm"] == "ldam_drw"  # now an arm of ours
    assert by_method["MetaSAug with CE"]["errors"] == {200.0: 23.11, 100.0: 19.46, 50.0: 15.97, 20.0: 12.36, 10.0: 10.56}
    assert by_method["MetaSAug-LDAM"]["errors"] == {200.0: 22.65, 100.0: 19.34, 50.0: 15.66, 10.0: 10.32}
    assert by_method["MetaSAug with CE"]["arm"] is None and by_method["MetaSAug-LDAM"]["arm"] is None
    c100 = {r["arm"]: r for r in published_rows(load_spec("table5"), "cifar100lt")}
    assert c100["ce"]["errors"][100.0] == 61.54 and c100["risda"]["errors"][200.0] == 55.24
    assert c100["no_reasoning"]["errors"][10.0] == 38.43 and c100["no_reweight"]["note"]
    assert c100[None]["method"] == "MetaSAug with CE" and c100[None]["errors"][100.0] == 53.13
    assert [r["arm"] for r in published_rows(load_spec("variants"), "cifar100lt")] == ["risda"]


def test_published_rows_without_a_source_are_refused():
    base = {"grid": {"arm": ["ce"], "imbalance": [10]}}
    with pytest.raises(ConfigError, match="not a list of published rows"):   # the old arm -> numbers table
        parse_spec({**base, "paper": {"cifar10lt": {"ce": {"10": 10.56}}}}, "bad")
    with pytest.raises(ConfigError, match="missing \\['source'\\]"):
        parse_spec({**base, "paper": {"cifar10lt": [{"method": "CE", "errors": {"10": 13.61}}]}}, "bad")
    with pytest.raises(ConfigError, match="unknown arm"):
        parse_spec({**base, "paper": {"cifar10lt": [{"method": "CE", "source": "x, Table 1", "arm": "erm",
                                                      "errors": {"10": 13.61}}]}}, "bad")
    with pytest.raises(ConfigError, match="not a number"):
        parse_spec({**base, "paper": {"cifar10lt": [{"method": "CE", "source": "x, Table 1", "errors": {"20": "–"}}]}}, "bad")
    # a plan saved before rows had a method and source shows no published rows at all
    legacy = plan_for("table5", grid={"arm": ["ce"], "imbalance": ["10"], "seed": ["0"]}, flags={"dataset": "cifar10lt"})
    legacy["spec"]["paper_numbers"] = {"cifar10lt": {"source": "MetaSAug's table", "ce": {"10": 10.56}}}
    runs = collate_runs(legacy, synthetic(legacy))
    assert "published" not in markdown_table(legacy, runs, summarize_runs(runs, legacy), "test_error")


def test_tables_show_each_published_row_with_its_label(tmp_path):
    plan = plan_for("table5", grid={"arm": ["risda", "ce", "ldam_drw"], "imbalance": ["100", "10"], "seed": ["0"]},
                    flags={"dataset": "cifar10lt"})
    runs = collate_runs(plan, synthetic(plan))
    summary = summarize_runs(runs, plan)
    md = markdown_table(plan, runs, summary, "test_error")
    cells = [[c.strip() for c in line.strip(" |").split("|")] for line in md.splitlines() if line.startswith("| published")]
    assert {c[0]: c[1:] for c in cells} == {
        "published: CE (ERM, plain cross-entropy) — LDAM-DRW paper (Cao et al., NeurIPS 2019), Table 2": ["29.64", "13.61"],
        "published: LDAM-DRW — LDAM-DRW paper (Cao et al., NeurIPS 2019), Table 2": ["22.97", "11.84"],
        "published: MetaSAug with CE — MetaSAug paper (Li et al., CVPR 2021), Table 1": ["19.46", "10.56"],
        "published: MetaSAug-LDAM — MetaSAug paper (Li et al., CVPR 2021), Table 1": ["19.34", "10.32"]}
    assert "published" in latex_table(plan, runs, summary, "test_error")
    assert "published" not in markdown_table(plan, runs, summary, "few_error")   # overall errors only
    (_, table, _), = rich_tables(plan, runs, summary, "best_test_error")
    from rich.console import Console
    console = Console(record=True, width=250)
    console.print(table)
    assert "published: MetaSAug with CE — MetaSAug paper (Li et al., CVPR 2021), Table 1" in console.export_text()
    # without the ce arm, the published CE row is left out; the unmatched rows stay
    only_risda = plan_for("table5", grid={"arm": ["risda"], "imbalance": ["100"], "seed": ["0"]}, flags={"dataset": "cifar10lt"})
    r2 = collate_runs(only_risda, synthetic(only_risda))
    md2 = markdown_table(only_risda, r2, summarize_runs(r2, only_risda), "test_error")
    assert "published: CE" not in md2 and "published: MetaSAug with CE" in md2
    from risda.runner.ablation.figures import plot_study
    assert plot_study(plan, runs, summary, "test_error", tmp_path / "f.png").read_bytes()[:8] == PNG_MAGIC


def test_group_errors_of_every_selection_are_collated_from_epochs():
    """Each selection (last, best-val, best-test epoch) carries overall + many/medium/few into
    runs and summary; a result without them is completed from the trial's epochs."""
    assert {m for ms in SELECTIONS.values() for m in ms} <= set(METRICS)
    plan = plan_for("table5", grid={"arm": ["risda"], "imbalance": ["100"], "seed": ["0", "1"]}, flags={"dataset": "cifar10lt"})
    rng = random.Random(1)
    epochs, trials = [], []
    for i, c in enumerate(plan["cells"]):
        for e in range(4):
            epochs.append(dict(trial_id=f"t{i}", epoch=e, test_error=rng.uniform(20, 60), val_error=rng.uniform(20, 60),
                               test_many_error=rng.uniform(0, 30), test_medium_error=rng.uniform(20, 60),
                               test_few_error=rng.uniform(40, 90), device="cpu:x86_64", hostname="h"))
        trials.append(dict(config=c["config"], status="TERMINATED", error=None, trial_id=f"t{i}",
                           result=dict(test_error=epochs[-1]["test_error"], completed=True)))
    epochs = pd.DataFrame(epochs)
    runs = collate_runs(plan, trials, epochs=epochs)
    for _, r in runs.iterrows():
        e = epochs[epochs.trial_id == r.trial_id]
        bt, bv, last = e.loc[e.test_error.idxmin()], e.loc[e.val_error.idxmin()], e.iloc[-1]
        assert (r.best_test_error, r.best_test_many_error, r.best_test_medium_error, r.best_test_few_error) == \
               (bt.test_error, bt.test_many_error, bt.test_medium_error, bt.test_few_error)
        assert (r.test_error_at_best_val, r.few_error_at_best_val) == (bv.test_error, bv.test_few_error)
        assert (r.many_error, r.device) == (last.test_many_error, "cpu:x86_64")
    summary = summarize_runs(runs, plan)
    assert summary.best_test_few_error_mean.iloc[0] == pytest.approx(runs.best_test_few_error.mean())
    assert summary.best_test_few_error_count.iloc[0] == 2


@pytest.mark.parametrize("name", ["table5", "fig4_alpha_beta", "fig5_head_count", "variants"])
def test_figures_for_every_study(name, tmp_path):
    from risda.runner.ablation.figures import plot_study
    grid = {"seed": ["0", "1"]}
    if name == "fig4_alpha_beta":
        grid = {"alpha": ["0.5", "1.0"], "beta": ["0.5", "0.75", "1.0"], "seed": ["0"]}
    plan = plan_for(name, grid=grid)
    runs = collate_runs(plan, synthetic(plan, fail={1}))
    summary = summarize_runs(runs, plan)
    path = plot_study(plan, runs, summary, "test_error", tmp_path / f"{name}.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


# --- end to end on Ray ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    try:
        yield
    finally:
        ray.shutdown()


def tiny_args(cifar10_root, tmp_path, name, *extra):
    return ["--dataset", "cifar10lt", "--data-root", str(cifar10_root), "--epochs", "3", "--n-max", "150",
            "--test-per-class", "50", "--head-count", "2", "--seeds", "0", "--cpus-per-trial", "1",
            "--storage", str(tmp_path / "ray"), "--results", str(tmp_path / "results"), "--name", name,
            "--no-progress", *extra]


@pytest.mark.slow
def test_end_to_end_two_arms_two_imbalances(cifar10_root, tmp_path, ray_local, capsys):
    args = tiny_args(cifar10_root, tmp_path, "e2e", "--arms", "risda,ce", "--imbalance", "100,10")
    assert run.main(args) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "CIFAR-10-LT" in out and "λ=100" in out and "RISDA" in out

    results = tmp_path / "results" / "e2e"
    runs = pd.read_parquet(results / "runs.parquet")
    cells = set(zip(runs.arm, runs.imbalance, runs.seed))
    assert cells == {("risda", 100.0, 0), ("risda", 10.0, 0), ("ce", 100.0, 0), ("ce", 10.0, 0)} and len(runs) == 4
    assert (runs.status == OK).all() and runs.error.isna().all()
    assert runs[["test_error", "many_error", "few_error", "last_epoch", "wall_time_s"]].notna().all().all()
    assert (runs.last_epoch == 2).all() and (runs.subset_seed == 0).all()
    assert set(runs.alpha[runs.imbalance == 10]) == {TABLE2[10.0][0]} and set(runs.beta[runs.imbalance == 100]) == {TABLE2[100.0][1]}

    summary = pd.read_parquet(results / "summary.parquet")
    direct = runs.groupby(["arm", "imbalance"]).test_error.agg(["mean", "count"])
    assert len(summary) == 4
    for _, row in summary.iterrows():
        assert row.test_error_mean == pytest.approx(direct.loc[(row.arm, row.imbalance), "mean"])
        assert row.test_error_count == 1 and row.status == OK
    png = (results / "figure.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5000
    assert (results / "table.md").read_text().count("|") > 10

    plan = json.loads((results / "plan.json").read_text())  # what the report prints as code, command, span
    assert plan["argv"] == args and len(plan["commit"]) == 40 and isinstance(plan["dirty"], bool)
    assert plan["started_at"] < plan["ended_at"] <= time.time()

    # the same command again continues the finished experiment: nothing retrains
    assert run.main(args) == 0
    rerun = pd.read_parquet(results / "runs.parquet")
    assert json.loads((results / "plan.json").read_text())["started_at"] == plan["started_at"]  # the whole span
    assert "continued the existing experiment" in capsys.readouterr().out
    pd.testing.assert_series_equal(rerun.wall_time_s, runs.wall_time_s)
    # re-collating without training gives the same rows
    assert run.main(["--collate-only", "--storage", str(tmp_path / "ray"), "--results", str(tmp_path / "results"),
                     "--name", "e2e"]) == 0
    again = pd.read_parquet(results / "runs.parquet")
    pd.testing.assert_frame_equal(again[["cell", "status", "test_error"]], runs[["cell", "status", "test_error"]])
    # --merge collates several experiments into one table; here one experiment alone gives the same rows
    assert run.main(["--collate-only", "--merge", "e2e", "--storage", str(tmp_path / "ray"), "--results",
                     str(tmp_path / "results"), "--name", "e2e-merged"]) == 0
    merged = pd.read_parquet(tmp_path / "results" / "e2e-merged" / "runs.parquet")
    pd.testing.assert_frame_equal(merged[["cell", "status", "test_error"]], runs[["cell", "status", "test_error"]])
    merged_plan = json.loads((tmp_path / "results" / "e2e-merged" / "plan.json").read_text())
    assert merged_plan["commands"][0] == "python ablations/run.py " + " ".join(args) and merged_plan["commit"] == plan["commit"]
    assert run.main(["--collate-only", "--merge", "e2e", "--storage", str(tmp_path / "ray"), "--results",
                     str(tmp_path / "results"), "--name", "e2e"]) == 2  # it would overwrite its own input
    # the same name with another plan is refused before anything runs
    capsys.readouterr()
    assert run.main(tiny_args(cifar10_root, tmp_path, "e2e", "--arms", "risda,ce", "--imbalance", "100,10", "--lr", "0.05")) == 2
    assert "--restart" in capsys.readouterr().out


@pytest.mark.slow
def test_a_failing_cell_is_reported_as_failed(cifar10_root, tmp_path, ray_local, capsys):
    # lr 1e6 diverges inside Ray (bad data, e.g. λ=1000 with n_max 150, is refused before Ray starts:
    # tests/test_datacheck.py); the other cell finishes, and the table says which failed and why
    args = tiny_args(cifar10_root, tmp_path, "fails", "--arms", "ce", "--imbalance", "10", "--grid", "lr=0.1,1000000",
                     "--epochs", "1")
    assert run.main(args) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "FAILED" in out and "diverged" in out
    results = tmp_path / "results" / "fails"
    runs = pd.read_parquet(results / "runs.parquet")
    assert len(runs) == 2
    bad = runs[runs.lr == 1e6].iloc[0]
    assert bad.status == FAILED and "diverged" in bad.error and math.isnan(bad.test_error)
    assert runs[runs.lr == 0.1].iloc[0].status == OK
    summary = pd.read_parquet(results / "summary.parquet").set_index("lr")
    assert summary.loc[1e6, "status"] == FAILED and summary.loc[1e6, "n_failed"] == 1
    assert math.isnan(summary.loc[1e6, "test_error_mean"])
    assert (results / "figure.png").read_bytes()[:8] == PNG_MAGIC
    # re-collated from storage
    assert run.main(["--collate-only", "--storage", str(tmp_path / "ray"), "--results", str(tmp_path / "results"),
                     "--name", "fails"]) == 1
    again = pd.read_parquet(results / "runs.parquet")
    assert again[again.lr == 1e6].iloc[0].status == FAILED and "diverged" in again[again.lr == 1e6].iloc[0].error


def test_a_collation_shows_the_published_rows_of_today_s_spec():
    """Rows added to a bundled spec after an experiment ran appear when it is collated again; a
    spec that is not bundled keeps the rows its plan recorded."""
    plan = plan_for("cifar10lt_reduced")
    plan["spec"]["paper_numbers"] = {"cifar10lt": []}  # as recorded before the rows were added
    methods = {r["method"] for r in run.published_now(plan)["cifar10lt"]}
    assert {"Logit-adjusted loss", "Balanced Softmax", "Logit adjustment, post-hoc", "LDAM-DRW"} <= methods
    plan["spec"]["name"] = "my_own_spec"
    assert run.published_now(plan) == {"cifar10lt": []}
