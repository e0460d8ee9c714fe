"""The runner's side of the shared stage I (risda.trainer.stage1 holds the key and the cache): before
Ray starts, every distinct stage I that the stage-II trials of a search or an ablation need is
looked up in the cache and its entry verified, an unusable one moved aside (`check_stage1`);
then every one the cache lacks is trained, as one Ray Tune experiment of its own (`ensure_stage1`).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import ray
from ray import tune

from ..trainer.config import Config, RunConfig
from ..trainer.stage1 import Stage1Cache, needs_observations, shares_stage1, stage1_key, stage1_training_config
from ..trainer.stage1_verify import EntryFault, read_info
from ..trainer.storage import delete_dir
from .cluster import experiment_uri, remove_trial_scratch
from .collate import error_message
from .progress import RichProgress
from .retry import NoRetryWhenDiverged
from .stage1_entries import inspect_entry
from .trainables import STAGE1_CACHE_KEY, train_stage1_trial, trial_dirname


class Stage1Failed(RuntimeError):
    """A shared stage I failed; the stage-II trials that need it cannot start."""


class Stage1Interrupted(Stage1Failed):
    """The stage-I phase was interrupted (Ctrl-C); its progress is kept in the cache."""


def describe_stage1(table) -> str:
    reused, trained = table[~table.trained_now], table[table.trained_now]
    wall = trained.wall_time_s.sum() if len(trained) else 0.0
    again = {k: int((table.cache == k).sum()) for k in ("retrained", "replaced")}
    why = "; ".join(f"{n} {what}" for n, what in ((again["retrained"], "in place of an unusable entry, moved aside"),
                                                    (again["replaced"], "again with the reference observations")) if n)
    return (f"stage I: {len(table)} distinct, {len(reused)} reused from the cache (verified), {len(trained)} trained now "
            f"{'(' + why + ') ' if why else ''}({wall:.0f} s of training); stage II forks from them")


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


def check_stage1(configs: list[Config], cache_root: str, say=print) -> dict[str, dict]:
    """Before Ray starts: every distinct stage I that `configs` need (plan_stage1), its cache entry
    verified (risda.trainer.stage1_verify). {key: {config, observations, cache, note, info}}, cache one of
    verified (reused as it is), missing (trained), retrain (an unusable entry: `say` is told in one
    line what is wrong with it; it is moved aside, never deleted, and trained again) or replace (it
    lacks the reference observations a consumer needs: trained again with them)."""
    cache = Stage1Cache(cache_root)
    plan = {}
    for key, (cfg, observations) in plan_stage1(configs).items():
        state, info, note = inspect_entry(cache, cfg, observations)
        if note:
            say(note)
        plan[key] = dict(config=cfg, observations=observations, cache=state, note=note, info=info)
    return plan


CACHE_STATES = {"verified": "verified", "missing": "trained", "retrain": "retrained", "replace": "replaced"}


def ensure_stage1(plan: dict[str, dict], cache_root: str, storage_root: str, name: str, resources: dict,
                  max_failures: int = 0, progress: bool = True):
    """Train every stage I of `plan` (check_stage1) that is not verified in the cache, as one Tune
    experiment `<name>-stage1` (a grid over those keys, one trial each, spread over a cluster,
    each with a stage-II trial's resources or its share of a node's CPUs: stage1_resources).
    Returns a DataFrame with one row per key: `cache` verified, trained, retrained or replaced
    (`cache_note` says why), its wall time, status and error. Raises Stage1Failed if any is
    still missing afterwards."""
    cache = Stage1Cache(cache_root)
    missing = {k: p for k, p in plan.items() if p["cache"] != "verified"}
    errors = {}
    if missing:
        # A new experiment every time: what makes a stage I resumable is its partial checkpoint
        # in the cache, which survives a changed set of missing keys, where Tune's restore does not.
        jobs = [{"config": p["config"].to_dict(), "observations": p["observations"], STAGE1_CACHE_KEY: cache.root}
                for p in missing.values()]
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
    table = pd.DataFrame([stage1_row(cache, key, p, key in missing, errors) for key, p in plan.items()],
                         columns=STAGE1_COLUMNS)
    failed = table[table.status != "ok"]
    if len(failed) and not errors:
        raise Stage1Interrupted(f"{len(failed)} of {len(table)} shared stage I(s) unfinished; their progress is in "
                                f"{cache.root}: rerun the same command to continue them")
    if len(failed):
        raise Stage1Failed(f"{len(failed)} of {len(table)} shared stage I(s) did not finish ("
                           + "; ".join(f"{r.stage1_key}: {r.error}" for r in failed.itertuples())
                           + "); fix the cause and rerun the same command (finished ones are kept)")
    return table


STAGE1_COLUMNS = ["stage1_key", "status", "cache", "trained_now", "observations", "epochs", "wall_time_s", "torch_threads",
                  "compile", "error", "cache_note", "entry"]


def stage1_row(cache: Stage1Cache, key: str, planned: dict, trained_now: bool, errors: dict) -> dict:
    """One row of stage1.parquet. A stage I trained now is read back from its stage1.json (its own
    digest checked; the trials verify the checkpoint they copy)."""
    info, error = planned["info"], None
    if trained_now:
        try:
            info = read_info(cache.entry(key), key)
        except EntryFault as e:
            info, error = None, str(e)
        if info is not None and planned["observations"] and not info.get("observations"):
            info = None
    notes = [n for n in (planned["note"], *((info or {}).get("notes") or [])) if n]
    return dict(stage1_key=key, status="ok" if info else "failed", cache=CACHE_STATES[planned["cache"]],
                trained_now=trained_now, observations=planned["observations"],
                epochs=planned["config"].resolved().stage1_epochs, wall_time_s=(info or {}).get("wall_time_s"),
                torch_threads=(info or {}).get("torch_threads"), compile=(info or {}).get("compile"),
                error=None if info else (error or errors.get(key, "missing")), cache_note="; ".join(notes) or None,
                entry=cache.entry(key))


def stage1_cache_root(option: str | None, storage_root: str) -> str:
    """--stage1-cache, or <storage>/stage1."""
    if option:
        return option.rstrip("/") if "://" in option else str(Path(option).expanduser().resolve())
    return f"{storage_root.rstrip('/')}/stage1"
