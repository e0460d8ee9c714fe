"""python ablations/run.py [--spec table5] [--arms risda,ce] [--imbalance 100,10] [--seeds 0,1,2] [trainer flags]

Reruns one of the paper's analyses (a spec in risda/runner/specs/) as one Ray Tune experiment,
one trial per (arm, imbalance, seed) cell (or whatever axes the spec's [grid] names), and
collates it into results/<name>/: runs.parquet (one row per cell, failed cells included),
summary.parquet (mean, std, count over seeds), epochs.parquet, table.md / table.tex, the
figures (figure.png: every seed, mean ± std, all / many / medium / few; paired.png: the paired
differences, where the study makes a comparison) and the plan (plan.json). Prints the table in
the paper's layout.

    python ablations/run.py --dataset cifar10lt --data-root ../shared/data/cifar10-jpeg --epochs 20 --seeds 0
    python ablations/run.py --spec fig4_alpha_beta --config results/search/best.json
    python ablations/run.py --collate-only --name table5          # re-collate, no training
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd
import ray
from ray import tune
from rich.markup import escape

from ...trainer.config import Config, ConfigError, add_config_args, config_overrides
from ...trainer.evaluate import SUMMARY_ERRORS
from ...trainer.progress import set_log_every
from ..address import resolve_address
from ..cluster import (add_runner_args, check_writable, cluster_summary, experiment_uri, init_ray, quiet_tune,
                       storage_uri, trial_resources)
from ..collate import Outcome, count_diverged, write_parquet
from ..datacheck import check_cells_data
from ..exits import failure_exit
from ..headwatch import watch_head
from ..lock import hold_experiment
from ..retry import max_failures
from ..progress import driver_console
from ..provenance import ablation_command, code_state
from ..paired_figure import plot_paired
from ..trackers import check_trackers, tracker_callbacks
from ..results_owner import check_results_owner
from ..stage1 import Stage1Failed, Stage1Interrupted, check_stage1, describe_stage1, stage1_cache_root
from ..trainables import absolute_paths
from .experiment import load_results, run_experiment, saved_plan, training_plan, trials_from_grid
from .figures import plot_study
from .spec import (DEFAULT_SPEC, apply_overrides, axis_label, expand, list_specs, load_spec, make_plan, parse_list,
                   merge_plans, plan_cells, plan_differences, published_now, read_best, value_label)
from .tables import (FAILED, NOT_RUN, OK, collate_runs, failure_lines, latex_table, markdown_table, rich_tables,
                     summarize_runs, trials_from_run_dirs)

# A tiny run checkpoints every few seconds; Ray warns about it on every trial.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# Trainer flags that the ablation runner owns: the grid axes have list flags, Ray places outputs and
# sets the threads (the CPUs it reserved).
SKIP_FLAGS = ("arm", "imbalance", "seed", "out", "resume", "progress", "threads", "stage1_threads")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    g = p.add_argument_group("study")
    g.add_argument("--spec", default=DEFAULT_SPEC, help=f"a spec bundled in risda/runner/specs/ ({', '.join(list_specs())}) or a path to a .toml file (default: {DEFAULT_SPEC})")
    g.add_argument("--arms", help="comma-separated arms, replacing the spec's arm axis (e.g. risda,ce)")
    g.add_argument("--imbalance", dest="imbalances", help="comma-separated imbalance factors, replacing the spec's (e.g. 100,10)")
    g.add_argument("--seeds", help="comma-separated seeds, replacing the spec's (e.g. 0,1,2); a seed is both the subset and the model seed")
    g.add_argument("--grid", action="append", default=[], metavar="AXIS=V1,V2",
                   help="set any grid axis (a Config field), e.g. --grid head_count=2,4; repeatable")
    g.add_argument("--config", metavar="BEST_JSON", help="take the hyperparameters (α, β, head count, lr, ...) from a search's best.json instead of the paper's Table 2")
    g.add_argument("--metric", help="the error shown in the table and figure (default: the spec's, test_error); e.g. few_error, test_error_at_best_val, best_test_error")
    g.add_argument("--dry-run", action="store_true", help="print the cells and exit")
    g.add_argument("--collate-only", action="store_true", help="re-collate an existing experiment into tables and figures without training (where the Ray "
                   "experiment is gone, e.g. bundled results, redraw them from results/<name>/runs.parquet)")
    g.add_argument("--merge", metavar="NAME,NAME", help="with --collate-only: collate several experiments of one spec "
                   "(e.g. seeds run one after another, --name study-s0 then --name study-s1) into results/<--name>/")
    g.add_argument("--from-runs", metavar="DIR", help="collate plain `risda.train` run folders (DIR/*/summary.json, e.g. "
                                                     "from bench/gpu_study.sh on a machine without Ray) instead of a Ray experiment")
    add_runner_args(p, default_name="the spec's name")
    r = p.add_argument_group("output")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_config_args(p, skip=SKIP_FLAGS)
    return p


def plan_from_args(args):
    spec = load_spec(args.spec)
    grid, origins = {}, {}  # axis -> values, and the flag that gave them (a typo is blamed on it)
    for axis, flag, text in (("arm", "--arms", args.arms), ("imbalance", "--imbalance", args.imbalances),
                             ("seed", "--seeds", args.seeds)):
        if text:
            grid[axis], origins[axis] = parse_list(text), flag
    for item in args.grid:
        axis, sep, values = item.partition("=")
        if not sep or not parse_list(values):
            raise ConfigError(f"--grid {item!r}: write AXIS=V1,V2 (e.g. --grid head_count=2,4)")
        axis = axis.strip().replace("-", "_")
        grid[axis], origins[axis] = parse_list(values), f"--grid {item}"
    flags = config_overrides(args)
    spec, flags, notes = apply_overrides(spec, grid, flags, origins)
    if args.metric:
        spec.metric = args.metric
    best, best_notes = read_best(args.config) if args.config else (None, [])
    cells, more = expand(spec, flags, best, args.config)
    more = best_notes + more
    for c in cells:  # trials run in their own folders
        c.config = absolute_paths(Config.from_dict(c.config)).to_dict()
    return make_plan(spec, cells, notes + more)


def print_plan(console, plan, name, results_dir, storage):
    spec = plan["spec"]
    sizes = " × ".join(f"{len(v)} {a}" for a, v in spec["grid"].items())
    console.print(f"[bold]{spec['name']}[/]: {len(plan['cells'])} trials ({sizes}) -> {results_dir}  "
                  f"(Ray experiment {storage}/{name})")
    for note in plan["notes"]:
        console.print(f"[yellow]note:[/] {note}")


def dry_run(console, plan):
    from rich.table import Table
    axes = plan["axes"]
    t = Table(title=f"{plan['spec']['name']}: {len(plan['cells'])} cells")
    for a in axes:
        t.add_column(axis_label(a))
    t.add_column("α, β from")
    varying = [f for f in plan["cells"][0]["config"]
               if f not in axes and len({json.dumps(c["config"][f]) for c in plan["cells"]}) > 1]
    for f in varying:
        t.add_column(f)
    for c in plan["cells"]:
        t.add_row(*[value_label(a, c["key"][a]) for a in axes], c["hp_source"], *[str(c["config"][f]) for f in varying])
    console.print(t)
    fixed = {f: v for f, v in plan["cells"][0]["config"].items() if f not in axes and f not in varying}
    console.print("fixed: " + ", ".join(f"{k}={v}" for k, v in fixed.items()))


def check_same_plan(plan, storage, name):
    """Continuing an experiment from a different plan would mix old and new trials."""
    old = saved_plan(storage, name)
    if old is None or not tune.Tuner.can_restore(experiment_uri(storage, name)):
        return
    diffs = plan_differences(training_plan(old), training_plan(plan))  # derived cells train nothing (older copies lack them)
    if diffs:
        raise ConfigError(f"the Ray experiment {experiment_uri(storage, name)} was started from a different plan ("
                          + "; ".join(diffs) + "): pass --restart to discard it and start over, or --name NEW for a new experiment")


def main(argv=None) -> int:
    console = driver_console()  # logs and pipes: one line per message, the paper-layout table one line per row
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    set_log_every(args.log_every)  # plain progress lines (risda.runner.progress)
    quiet_tune(args.debug)  # no Tune tracebacks or boxes in the log (risda.runner.cluster)
    args.max_failures = max_failures(args.max_failures, args.address)  # 2 on a cluster (risda.runner.retry)
    try:
        return run(args, console, argv)
    except ConfigError as e:
        if args.debug:
            raise
        console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)  # one line, however long
        return 2
    except Exception as e:  # a runtime failure on the driver: one line (risda.runner.exits), else the traceback
        return failure_exit(e, console, args.debug)


def stamp_provenance(plan: dict, argv: list[str], previous: Path | None) -> None:
    """Record in the plan the code, the command and when the experiment started (kept from an
    earlier invocation of the same experiment, so that a resumed run reports its whole span)."""
    started = time.time()
    if previous is not None and previous.exists():
        try:
            started = json.loads(previous.read_text()).get("started_at") or started
        except (OSError, ValueError):
            pass
    plan.update(code_state(), argv=[str(a) for a in argv], started_at=started)


def recorded_plan(results_dir: Path, storage: str, name: str) -> dict | None:
    """The plan an experiment ran with: results/<name>/plan.json (it has the end time), else
    the copy beside the Ray experiment, else None."""
    saved = results_dir / "plan.json"
    return json.loads(saved.read_text()) if saved.exists() else saved_plan(storage, name)


def experiment_plan(results_dir: Path, storage: str, name: str) -> dict:
    plan = recorded_plan(results_dir, storage, name)
    if plan is None:
        raise ConfigError(f"--merge: no experiment {name!r} in {storage} (nor {results_dir / 'plan.json'}); "
                          "check --storage and the names")
    return plan


def redraw_only(storage: str, name: str, results_dir: Path) -> bool:
    """--collate-only where the Ray experiment is gone (or was a --merge) but its results folder is
    there (a clone with the bundled results): the tables and figures are drawn again from runs.parquet."""
    return not tune.Tuner.can_restore(experiment_uri(storage, name)) and (results_dir / "runs.parquet").is_file()


def run(args, console, argv=()) -> int:
    """The study: plan, train (one driver per experiment: risda.runner.lock), collate."""
    with contextlib.ExitStack() as held:
        return run_held(args, console, argv, held)


def run_held(args, console, argv, held: contextlib.ExitStack) -> int:
    check_trackers(args.tracker)  # a missing extra: one line, before anything starts
    plan = plan_from_args(args)
    name = args.name or plan["spec"]["name"]
    results_dir = Path(args.results) / name
    storage = storage_uri(args.storage)
    merge = parse_list(args.merge) if args.merge else []
    if merge and not args.collate_only:
        raise ConfigError("--merge collates experiments that have run: add --collate-only")
    if name in merge:
        raise ConfigError(f"--merge: --name {name!r} is one of the merged experiments, whose results/{name}/ would be "
                          "overwritten: give the merged table its own --name (or another --results folder)")
    if merge:
        plans = {n: experiment_plan(Path(args.results) / n, storage, n) for n in merge}
        plan = merge_plans(plans)
        plan["commands"] = [ablation_command(p["argv"]) for p in plans.values() if p.get("argv")] + [ablation_command(argv)]
    elif args.collate_only:  # the plan the experiment was run with, not today's flags
        plan = recorded_plan(results_dir, storage, name) or plan
    if args.collate_only:
        plan["spec"]["paper_numbers"] = published_now(plan)
    if args.collate_only and args.metric:
        plan["spec"]["metric"] = args.metric
    metric = plan["spec"]["metric"]
    if metric not in SUMMARY_ERRORS:
        raise ConfigError(f"--metric {metric!r}: choose one of {', '.join(SUMMARY_ERRORS)}")
    print_plan(console, plan, name, results_dir, storage)
    if args.dry_run:
        dry_run(console, plan)
        return 0
    source = (str(Path(args.from_runs).resolve()) if args.from_runs
              else ", ".join(experiment_uri(storage, n) for n in merge or [name]))  # runs.parquet's `experiment`
    trains = not (args.collate_only or args.from_runs)
    stage1_plan = cache = None
    if trains:
        args.address = resolve_address(args.address)  # `auto`, a dead head: one line first (risda.runner.address)
        check_writable(storage, "--storage")
    check_writable(results_dir, "--results")  # creates nothing: a refusal leaves no empty folder
    new = trains and (args.restart or not tune.Tuner.can_restore(experiment_uri(storage, name)))
    redraw = args.collate_only and not merge and redraw_only(storage, name, results_dir)  # figures only: no table written
    if not redraw:
        check_results_owner(results_dir.resolve(), source, new=new, restart=args.restart)  # nothing replaced unasked
    if trains:
        if not args.restart:
            check_same_plan(plan, storage, name)
        held.enter_context(hold_experiment(storage, name))  # before anything of the experiment is touched
        # Every cell's data (layout, long-tailed subset), before Ray starts: one line, exit 2 (as tune/search.py).
        configs = [Config.from_dict(c["config"]) for c in plan["cells"]]
        checked = check_cells_data(configs, args.address)
        if checked:
            console.print(f"data: {checked} distinct data configuration(s) of the {len(plan['cells'])} cells checked")
        if args.shared_stage1:  # every stage-I entry verified, a bad one moved aside, before Ray starts
            cache = stage1_cache_root(args.stage1_cache, storage)
            check_writable(cache, "--stage1-cache")
            stage1_plan = check_stage1([Config.from_dict(c.config) for c in plan_cells(training_plan(plan))], cache,
                                       say=lambda line: console.print(escape(line), soft_wrap=True))

    started = time.time()
    grid = runs = None
    if redraw:
        console.print(f"note: no Ray experiment at {experiment_uri(storage, name)}: the tables and figures are redrawn from "
                      f"{results_dir / 'runs.parquet'}")
        runs = pd.read_parquet(results_dir / "runs.parquet")
    elif args.from_runs:
        trials, epochs = trials_from_run_dirs(args.from_runs)
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / "plan.json").write_text(json.dumps(plan, indent=1))
    elif args.collate_only:
        trials, epochs = [], []
        for n in merge or [name]:
            t, e = trials_from_grid(load_results(storage, n), plan["axes"])
            trials, epochs = trials + t, epochs + [e]
        epochs = pd.concat(epochs, ignore_index=True)
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / "plan.json").write_text(json.dumps(plan, indent=1))
        if merge:  # the merged experiments' stage-I accounting, for the report's compute section
            stage1 = [pd.read_parquet(p).assign(experiment=n) for n in merge
                      if (p := Path(args.results) / n / "stage1.parquet").is_file()]
            if stage1:
                write_parquet(pd.concat(stage1, ignore_index=True), results_dir / "stage1.parquet")
    else:
        we_started = True  # until init_ray says otherwise: an interrupted start-up is shut down too
        try:
            held.enter_context(watch_head(args.address, experiment_uri(storage, name)))  # a lost head: one line, exit 1
            we_started = init_ray(args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                                  include_dashboard=False, logging_level="warning", log_to_driver=False)
            trial_resources(args.cpus_per_trial, args.gpus_per_trial)  # a GPU no node has: refused before any write
            console.print(f"Ray: {cluster_summary()}; per trial {args.cpus_per_trial:g} CPU, {args.gpus_per_trial:g} GPU")
            if args.gpus_per_trial == 0 and ray.cluster_resources().get("GPU", 0):
                console.print("[yellow]note:[/] the cluster has GPUs but --gpus-per-trial is 0: trials train on CPUs "
                              "(e.g. --gpus-per-trial 0.25 packs four trials on a GPU)")
            results_dir.mkdir(parents=True, exist_ok=True)
            stamp_provenance(plan, argv, None if args.restart else results_dir / "plan.json")
            (results_dir / "plan.json").write_text(json.dumps(plan, indent=1))
            try:
                grid, restored, stage1 = run_experiment(
                    plan, storage, name, args.cpus_per_trial, args.gpus_per_trial, restart=args.restart,
                    progress=args.progress, max_failures=args.max_failures, stage1_cache=cache,
                    retry_errored=args.retry_errored, trackers=tracker_callbacks(args.tracker, name, results_dir),
                    stage1_plan=stage1_plan)
            except Stage1Interrupted as e:
                console.print(f"[yellow]interrupted:[/] {e}")
                return 130
            except Stage1Failed as e:
                console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)  # one line, however long
                return 1
            if stage1 is not None:
                console.print(describe_stage1(stage1))
                results_dir.mkdir(parents=True, exist_ok=True)
                write_parquet(stage1, results_dir / "stage1.parquet")
            if restored:
                console.print("continued the existing experiment (finished trials kept; --restart starts over)")
        finally:
            if we_started:
                ray.shutdown()

    if grid is not None:
        trials, epochs = trials_from_grid(grid, plan["axes"])
    redrawn = runs is not None
    if not redrawn:
        runs = collate_runs(plan, trials, experiment=str(Path(args.from_runs).resolve()) if args.from_runs
                            else ", ".join(experiment_uri(storage, n) for n in merge or [name]))
    summary = summarize_runs(runs, plan)
    results_dir.mkdir(parents=True, exist_ok=True)
    if not args.collate_only and not args.from_runs:  # the span the report prints
        plan["ended_at"] = time.time()
        (results_dir / "plan.json").write_text(json.dumps(plan, indent=1))
    if not redrawn:
        write_parquet(runs, results_dir / "runs.parquet")
        write_parquet(summary, results_dir / "summary.parquet")
        if len(epochs):
            write_parquet(epochs, results_dir / "epochs.parquet")
    (results_dir / "table.md").write_text(markdown_table(plan, runs, summary, metric))
    (results_dir / "table.tex").write_text(latex_table(plan, runs, summary, metric))
    figures = [plot_study(plan, runs, summary, metric, results_dir / "figure.png"), plot_paired(runs, results_dir / "paired.png")]

    for title, table, caption in rich_tables(plan, runs, summary, metric):
        console.print(f"\n[bold]{title}[/]")
        console.print(table)
        if caption:
            console.print(f"[dim]{caption}[/]")
    for line in failure_lines(runs):
        console.print(f"[red]{line}[/]")
    n_ok = int((runs.status == OK).sum())
    console.print(f"{n_ok}/{len(runs)} cells ok in {time.time() - started:.0f} s; wrote {results_dir}/"
                  + ("" if redrawn else "{runs,summary,epochs}.parquet, ")
                  + ", ".join(["table.md", "table.tex", *(f.name for f in figures if f is not None)]))
    n_failed, n_unfinished = int((runs.status == FAILED).sum()), int((runs.status == NOT_RUN).sum())
    diverged = count_diverged(runs[runs.status == FAILED].error)
    return Outcome(n_ok, n_failed, n_unfinished, diverged).report(console, retry_hint=True)
