"""The runner's side of the shared stage I (risda.trainer.stage1 holds the key and the cache): before
the stage-II trials of a search or an ablation, every distinct stage I they need and the
cache lacks is trained, as one Ray Tune experiment of its own (`ensure_stage1`).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import ray
from ray import tune

from ..trainer.config import Config, RunConfig
from ..trainer.stage1 import Stage1Cache, needs_observations, shares_stage1, stage1_key, stage1_training_config
from ..trainer.storage import delete_dir
from .cluster import experiment_uri, remove_trial_scratch
from .collate import error_message
from .progress import RichProgress
from .retry import NoRetryWhenDiverged
from .trainables import STAGE1_CACHE_KEY, train_stage1_trial, trial_dirname


class Stage1Failed(RuntimeError):
    """A shared stage I failed; the stage-II trials that need it cannot start."""


class Stage1Interrupted(Stage1Failed):
    """The stage-I phase was interrupted (Ctrl-C); its progress is kept in the cache."""


def describe_stage1(table) -> str:
    reused, trained = table[~table.trained_now], table[table.trained_now]
    wall = trained.wall_time_s.sum() if len(trained) else 0.0
    return (f"stage I: {len(table)} distinct, {len(reused)} reused from the cache, {len(trained)} trained now "
            f"({wall:.0f} s of training); stage II forks from them")


def plan_stage1(configs: list[Config]) -> dict[str, tuple[Config, bool]]:
    """{stage-I key: (the config its stage I trains with, whether it records the reference
    observations)} over the configs that share a stage I; isda and stage-I-less runs have none."""
    plan = {}
    for cfg in (c.resolved() for c in configs):  # the plan's entry: each cell resolved once
        if shares_stage1(cfg):
            key = stage1_key(cfg)
            observations = needs_observations(cfg) or plan.get(key, (None, False))[1]
            plan[key] = (stage1_training_config(cfg), observations)
    return plan


def stage1_resources(resources: dict, jobs: int, node_cpus: float) -> dict:
    """What each of `jobs` shared stage Is trained at once reserves: a stage-II trial's resources,
    with a node's CPUs shared out among them (all of them for a stage I alone), never fewer
    than the trial's own. The stage-II trials that follow are many and keep --cpus-per-trial
    (default 1: one trial per core is the faster packing, bench/bench_speed.py --packing)."""
    share = int(node_cpus // max(jobs, 1))
    return {**resources, "cpu": max(resources["cpu"], share)}


def largest_node_cpus() -> float:
    return max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)


def ensure_stage1(configs: list[Config], cache_root: str, storage_root: str, name: str, resources: dict,
                  max_failures: int = 0, progress: bool = True):
    """Train every distinct stage I that `configs` need and the cache lacks, as one Tune
    experiment `<name>-stage1` (a grid over the missing keys, one trial each, spread over a
    cluster, each with a stage-II trial's resources or its share of a node's CPUs: stage1_resources). Returns a DataFrame with
    one row per key: reused or trained now, its wall time, status and error. Raises
    Stage1Failed if any is still missing afterwards."""
    cache = Stage1Cache(cache_root)
    plan = plan_stage1(configs)
    missing = {k: v for k, v in plan.items() if cache.lookup(v[0], v[1]) is None}
    errors = {}
    if missing:
        # A new experiment every time: what makes a stage I resumable is its partial checkpoint
        # in the cache, which survives a changed set of missing keys, where Tune's restore does not.
        jobs = [{"config": cfg.to_dict(), "observations": obs, STAGE1_CACHE_KEY: cache.root} for cfg, obs in missing.values()]
        delete_dir(experiment_uri(storage_root, f"{name}-stage1"))
        tuner = tune.Tuner(
            tune.with_resources(train_stage1_trial, stage1_resources(resources, len(jobs), largest_node_cpus())),
            param_space={"job": tune.grid_search(jobs)},
            tune_config=tune.TuneConfig(trial_dirname_creator=trial_dirname, reuse_actors=True),
            run_config=tune.RunConfig(name=f"{name}-stage1", storage_path=storage_root, verbose=0,
                                      callbacks=[NoRetryWhenDiverged(), *([RichProgress(len(jobs), metric=None,
                                                                                       label="stage I")] if progress else [])],
                                      failure_config=tune.FailureConfig(max_failures=max_failures)))
        for result in remove_trial_scratch(tuner.fit()):
            if result.error is not None:
                # A trial that failed before its first report has no metrics: the key comes from its job.
                job = (result.config or {}).get("job", {})
                errors[stage1_key(RunConfig.from_dict(job["config"]))] = error_message(result.error)
    rows = []
    for key, (cfg, obs) in plan.items():
        info = cache.lookup(cfg, obs)
        rows.append(dict(stage1_key=key, status="ok" if info else "failed", trained_now=key in missing,
                         observations=obs, epochs=cfg.stage1_epochs,
                         wall_time_s=(info or {}).get("wall_time_s"), torch_threads=(info or {}).get("torch_threads"),
                         compile=(info or {}).get("compile"), error=None if info else errors.get(key, "missing"),
                         entry=cache.entry(key)))
    table = pd.DataFrame(rows, columns=["stage1_key", "status", "trained_now", "observations", "epochs", "wall_time_s",
                                        "torch_threads", "compile", "error", "entry"])
    failed = table[table.status != "ok"]
    if len(failed) and not errors:
        raise Stage1Interrupted(f"{len(failed)} of {len(table)} shared stage I(s) unfinished; their progress is in "
                                f"{cache.root}: rerun the same command to continue them")
    if len(failed):
        raise Stage1Failed(f"{len(failed)} of {len(table)} shared stage I(s) did not finish ("
                           + "; ".join(f"{r.stage1_key}: {r.error}" for r in failed.itertuples())
                           + "); fix the cause and rerun the same command (finished ones are kept)")
    return table


def stage1_cache_root(option: str | None, storage_root: str) -> str:
    """--stage1-cache, or <storage>/stage1."""
    if option:
        return option.rstrip("/") if "://" in option else str(Path(option).expanduser().resolve())
    return f"{storage_root.rstrip('/')}/stage1"
