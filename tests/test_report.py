"""The reproduction report (risda.runner.report, ablations/report.py) on synthetic ablation outputs:
no training, no Ray."""
from __future__ import annotations

import importlib.util
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

from risda.runner import report
from risda.runner.ablation.spec import apply_overrides, expand, load_spec, make_plan
from risda.runner.ablation.tables import METRICS, OK, SELECTIONS, collate_runs, summarize_runs

REPO = Path(__file__).resolve().parents[1]
COMMAND = "python ablations/run.py --dataset cifar10lt --arms risda,ce,ce_drw --imbalance 100,10 --val-per-class 5"
T0 = 1_700_000_000.0


def make_plan_():
    spec, flags, notes = apply_overrides(load_spec("table5"), {"arm": ["risda", "ce", "ce_drw"], "imbalance": ["100", "10"]},
                                         {"dataset": "cifar10lt", "val_per_class": 5, "epochs": 20})
    cells, more = expand(spec, flags)
    return make_plan(spec, cells, notes + more)


def cell_index(plan, arm, lam, seed):
    return next(i for i, c in enumerate(plan["cells"]) if c["key"] == {"arm": arm, "imbalance": lam, "seed": seed})


def synthetic_trials(plan, fail=(), skip=(), group_errors=True):
    rng = random.Random(0)
    trials = []
    for i, c in enumerate(plan["cells"]):
        if i in skip:
            continue
        if i in fail:
            trials.append(dict(config=c["config"], status="ERROR", trial_id=f"t{i}", result={},
                               error="Traceback ...\nrisda.trainer.DivergedError: loss became nan at epoch 12"))
            continue
        result = {m: round(rng.uniform(5, 80), 3) for m in METRICS}
        if not group_errors:
            for m in ("many_error_at_best_val", "medium_error_at_best_val", "few_error_at_best_val",
                      "best_test_many_error", "best_test_medium_error", "best_test_few_error"):
                result.pop(m)
        facts = dict(device="cpu:x86_64", hostname="box") if group_errors else {}  # Ray trials report neither today
        result.update(**facts)
        result.update(last_epoch=19, best_test_epoch=rng.randrange(20), epochs_run=20, wall_time_s=100.0 + i,
                      train_size=12406 if c["config"]["imbalance"] == 100 else 20431, completed=True,
                      started_at=T0 + 10 * i, ended_at=T0 + 10 * i + 100 + i)
        trials.append(dict(config=c["config"], status="TERMINATED", error=None, trial_id=f"t{i}", result=result))
    return trials


def write_outputs(tmp_path, plan, trials, epochs=None, command=True):
    results = tmp_path / "results" / "table5"
    results.mkdir(parents=True)
    runs = collate_runs(plan, trials, experiment="ray_results/table5")
    summary = summarize_runs(runs, plan)
    if command:
        plan = {**plan, "command": COMMAND}
    (results / "plan.json").write_text(json.dumps(plan))
    runs.to_parquet(results / "runs.parquet", index=False)
    summary.to_parquet(results / "summary.parquet", index=False)
    if epochs is not None:
        epochs.to_parquet(results / "epochs.parquet", index=False)
    (results / "figure.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
    return results, runs


def flat(md: str | list[str]) -> str:
    """The Markdown with the padding of its table cells removed (pandas pads each column to its width)."""
    lines = md.splitlines() if isinstance(md, str) else md
    return "\n".join(re.sub(r" *\| *", " | ", line).strip() if line.startswith("|") else line for line in lines)


def table_rows(md: str, lam: str) -> dict[str, list[str]]:
    """arm label -> cells of that arm's row in the main table of the λ section."""
    section = md.split(f"### λ = {lam}\n", 1)[1].split("###", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith(("| arm", "| published", "| :--", "| ---")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == 14:
                rows[cells[0]] = cells[1:]
    return rows


def expected(ok: pd.DataFrame, metric: str) -> str:
    vals = ok[metric].dropna()
    return f"{vals.mean():.2f}" + (f" ± {vals.std(ddof=1):.2f}" if len(vals) > 1 else "")


def test_report_lists_every_arm_three_selections_failures_and_pandas_numbers(tmp_path):
    plan = make_plan_()
    failed_all = {cell_index(plan, "ce_drw", 10.0, s) for s in (0, 1, 2)}
    partial = cell_index(plan, "risda", 100.0, 1)
    not_run = cell_index(plan, "ce", 10.0, 2)
    results, runs = write_outputs(tmp_path, plan, synthetic_trials(plan, fail=failed_all | {partial}, skip={not_run}))
    out = tmp_path / "REPRODUCTION.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    md = flat(out.read_text())

    assert md.startswith("# Reproduction report: Table 5")
    for label in ("(a) last epoch", "(b) best-val epoch", "(c) best-test epoch",
                  "what the literature reports (model selection on test, never used for any choice)"):
        assert label in md
    assert "`git rev-parse HEAD`" in md and "logical cores" in md and "cpu:x86_64 (13 cells)" in md
    assert COMMAND in md and "as recorded in plan.json" in md
    assert f"{runs.wall_time_s.sum():.0f} s over 13 of 18 cells" in md
    span = (runs.ended_at.max() - runs.started_at.min())
    assert f"Experiment span: {report.duration(span)}" in md
    assert "| train size (images) | λ=100: 12,406; λ=10: 20,431 |" in md
    assert "| validation images per class | 5 |" in md and "| stage-I epochs | 16 |" in md
    assert "![Table 5: ablation of RISDA's components](results/table5/figure.png)" in md

    ok = runs[runs.status == OK]
    for lam in ("100", "10"):
        rows = table_rows(md, lam)
        assert set(rows) == {"RISDA", "CE", "CE-DRW"}   # every arm, failed or not
        for arm, label in (("risda", "RISDA"), ("ce", "CE"), ("ce_drw", "CE-DRW")):
            cells = rows[label]
            group = ok[(ok.arm == arm) & (ok.imbalance == float(lam))]
            if arm == "ce_drw" and lam == "10":
                assert cells[0] == "0/3: 3 FAILED (seed 0,1,2)" and set(cells[1:]) == {"FAILED"}
                continue
            metrics = [m for sel in SELECTIONS.values() for m in sel]
            assert cells[1:] == [expected(group, m) for m in metrics], (arm, lam)
    assert table_rows(md, "100")["RISDA"][0] == "2/3: 1 FAILED (seed 1)"
    assert table_rows(md, "10")["CE"][0] == "2/3: 1 not run"
    # failures listed one by one, with the exception's last line
    assert md.count("failed: arm=CE-DRW, λ=10") == 3 and "DivergedError: loss became nan at epoch 12" in md
    assert "not run: arm=CE, λ=10, seed=2" in md
    # published numbers beside each table, each with its source; CE matched only to plain CE
    sec100 = md.split("### λ = 100\n", 1)[1].split("###", 1)[0]
    assert "| CE (ERM, plain cross-entropy) | LDAM-DRW paper (Cao et al., NeurIPS 2019), Table 2 | 29.64 | CE |" in sec100
    assert "| MetaSAug with CE | MetaSAug paper (Li et al., CVPR 2021), Table 1 | 19.46 | — (no arm of ours is this method) |" in sec100
    sec10 = md.split("### λ = 10\n", 1)[1].split("## Figure", 1)[0]
    assert "| 13.61 | CE |" in sec10 and "| 10.56 |" in sec10 and "| 10.32 |" in sec10


def test_report_completes_group_errors_from_epochs_and_takes_the_command_flag(tmp_path):
    """Runs without the groups' errors at the best-val / best-test epochs (as Ray trials report
    them today) are completed from epochs.parquet, and the summary recomputed."""
    plan = make_plan_()
    trials = synthetic_trials(plan, group_errors=False)
    rng = random.Random(2)
    epochs = pd.DataFrame([dict(trial_id=t["trial_id"], epoch=e, test_error=rng.uniform(10, 70), val_error=rng.uniform(10, 70),
                                test_many_error=rng.uniform(0, 40), test_medium_error=rng.uniform(10, 70),
                                test_few_error=rng.uniform(30, 95), device="cuda:NVIDIA H200", hostname="gpu")
                           for t in trials for e in range(0, 20, 5)])
    for t in trials:  # the results' own numbers agree with their epochs
        e = epochs[epochs.trial_id == t["trial_id"]]
        t["result"].update(best_test_error=e.test_error.min(), test_error_at_best_val=e.test_error[e.val_error.idxmin()])
    results, runs = write_outputs(tmp_path, plan, trials, epochs=epochs, command=False)
    assert runs.best_test_few_error.isna().all()
    path = report.write_report(results, commands=["python ablations/run.py --spec table5"])
    assert path == results.parent / "REPRODUCTION.md"
    md = path.read_text()
    assert "given to this report with --command" in md and "python ablations/run.py --spec table5" in md
    assert "read from the trials' epochs in epochs.parquet" in md and "cuda:NVIDIA H200" in md
    rows = table_rows(md, "100")
    for arm, label in (("risda", "RISDA"), ("ce", "CE")):
        per_trial = []
        for t in trials:
            if t["config"]["arm"] == arm and t["config"]["imbalance"] == 100.0:
                e = epochs[epochs.trial_id == t["trial_id"]]
                per_trial.append((e.loc[e.test_error.idxmin()], e.loc[e.val_error.idxmin()]))
        best_test_few = pd.Series([bt.test_few_error for bt, _ in per_trial])
        best_val_many = pd.Series([bv.test_many_error for _, bv in per_trial])
        assert rows[label][12] == f"{best_test_few.mean():.2f} ± {best_test_few.std():.2f}"
        assert rows[label][6] == f"{best_val_many.mean():.2f} ± {best_val_many.std():.2f}"


def test_a_second_study_and_a_preface(tmp_path):
    """--also: each study's commit, command and wall time under its own folder name; --preface:
    a person's reading of the numbers, kept in its own file, placed after the title."""
    plan = make_plan_()
    main, _ = write_outputs(tmp_path / "main", plan, synthetic_trials(plan))
    ref_plan = {**plan, "argv": ["--arms", "risda", "--grid", "variant=reference"], "commit": "c" * 40, "dirty": False,
                "started_at": T0, "ended_at": T0 + 3725}
    ref, _ = write_outputs(tmp_path / "ref", ref_plan, synthetic_trials(plan), command=False)
    preface = tmp_path / "preface.md"
    preface.write_text("## What the numbers say\n\nReasoning pays here.\n")
    assert report.main(["--results", str(main), "--also", str(ref), "--preface", str(preface),
                        "--out", str(tmp_path / "R.md")]) == 0
    md = (tmp_path / "R.md").read_text()
    assert md.index("## What the numbers say") < md.index("## Machine") and "Reasoning pays here." in md
    command = md[md.index("## Command"):md.index("## Wall time")]
    assert COMMAND in command and "python ablations/run.py --arms risda --grid variant=reference" in command
    assert command.index(COMMAND) < command.index("variant=reference")
    assert f"`{'c' * 40}`" in md[md.index("## Code"):md.index("## Command")]
    assert md[md.index("## Wall time"):md.index("## Protocol")].count("Sum of the cells' wall times") == 2  # one per study


def test_missing_outputs_name_the_fix(tmp_path, capsys):
    assert report.main(["--results", str(tmp_path / "nothing")]) == 2
    assert "python ablations/run.py writes results/<name>/" in capsys.readouterr().err


def test_cli_is_thin(tmp_path):
    spec = importlib.util.spec_from_file_location("ablations_report", REPO / "ablations" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main is report.main
    # the command itself, from another folder: the installed package, no path set-up
    done = subprocess.run([sys.executable, str(REPO / "ablations" / "report.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--results" in done.stdout, done.stderr


def test_paired_differences_are_per_seed_and_say_which_keep_their_sign():
    """RISDA − each comparison, per seed, against numpy; the sentences follow the signs."""
    import numpy as np

    from risda.runner.evidence import paired_table
    from risda.runner.evidence import finished

    rng = np.random.default_rng(0)
    cells = [("risda", "paper", None), ("no_reasoning", "paper", None), ("risda", "reference", None),
             ("risda", "paper", "prototype"), ("ce", "paper", None)]
    errors = {c: rng.uniform(40, 50, size=3) for c in cells}
    errors[("no_reasoning", "paper", None)] = errors[("risda", "paper", None)] + [1.0, 0.5, 2.0]  # RISDA lower at every seed
    errors[("ce", "paper", None)] = errors[("risda", "paper", None)] + [1.0, -0.5, 2.0]  # changes sign
    rows = []
    for (arm, variant, source), e in errors.items():
        for seed in range(3):
            rows.append(dict(arm=arm, variant=variant, graph_source=source, seed=seed, status="ok",
                             config=json.dumps({"precision": "bf16"}), test_error=e[seed], test_error_at_best_val=e[seed] + 1,
                             best_test_error=e[seed] - 1, few_error=2 * e[seed]))
    rows.append(dict(rows[0], status="failed", test_error=99.0))  # a failed run never enters a pair
    lines, words = paired_table(finished(pd.DataFrame(rows)))
    by_name = {line.split(" | ")[0].lstrip("| "): line for line in flat(lines).splitlines()[2:]}
    d = errors[("risda", "paper", None)] - errors[("no_reasoning", "paper", None)]
    row = by_name["RISDA − w/o r (no reasoning)"]
    assert f"**{d.mean():+.2f}** ± {d.std(ddof=1):.2f}" in row and ", ".join(f"{v:+.2f}" for v in d) in row
    d_ref = errors[("risda", "reference", None)] - errors[("risda", "paper", None)]
    assert f"**{d_ref.mean():+.2f}** ± {d_ref.std(ddof=1):.2f}" in by_name["RISDA (reference) − RISDA"]
    assert "RISDA, prototype graph − RISDA" in by_name and "RISDA − CE" in by_name
    said = {w.split(":")[0].lstrip("- "): w for w in words}
    assert "keeps its sign" in said["RISDA − w/o r (no reasoning)"] and "lower at all 3 seeds" in said["RISDA − w/o r (no reasoning)"]
    assert "(a) last" not in said["RISDA − CE"]  # +1.0, −0.5, +2.0 flips in the last-epoch column


def test_the_tuned_tau_of_post_hoc_la_is_reported_beside_tau_1():
    from risda.runner.evidence import finished, tuned_tau_table

    row = dict(arm="ce_posthoc_la", variant="paper", graph_source=None, seed=1, status="ok", config=json.dumps({"precision": "bf16"}),
               test_error=46.89, few_error=71.6, tuned_tau=2.0, tuned_val_error=37.5, tuned_test_error=42.52,
               tuned_test_many_error=36.82, tuned_test_medium_error=53.73, tuned_test_few_error=39.95)
    other = dict(row, arm="ce", tuned_tau=float("nan"))
    lines = tuned_tau_table(finished(pd.DataFrame([row, other])))
    assert len(lines) == 3 and "| 1 | 46.89 / 71.60 | 2 | 37.50 | 42.52 / 36.82 / 53.73 / 39.95 |" in flat(lines[2:])


def test_a_published_row_is_run_here_when_another_study_of_the_report_ran_its_arm():
    spec, flags, notes = apply_overrides(load_spec("cifar10lt_reduced"), {"arm": ["risda"], "seed": [0]}, {})
    cells, more = expand(spec, flags, None)
    plan = make_plan(spec, cells, notes + more)
    ldam = lambda lines: next(line for line in flat(lines).splitlines() if line.startswith("| LDAM-DRW |"))
    assert ldam(report.published_table(plan, 100.0)).endswith("| LDAM-DRW (not run here) |")
    assert ldam(report.published_table(plan, 100.0, frozenset({"ldam_drw"}))).endswith("| LDAM-DRW |")
