"""A plan (risda.runner.ablation.spec) as one Ray Tune experiment: a grid search over the
spec's axes, no scheduler, no early stopping. Everything Ray-specific that is not particular
to ablations (the trainable, ray init, the resource check, storage, restore-or-new, the
collation of a ResultGrid) is the rest of `risda.runner`, shared with the search command.

The experiment's param_space: one `tune.grid_search` per grid axis (so Ray's trial names
and progress show `arm=ce,imbalance=100.0,seed=0`), the Config fields that are the same in
every cell as constants, and the fields that differ between cells without being axes
(α, β from Table 2 per λ; subset_seed = seed) looked up from the plan by `CellValue`. The
plan stays the one source of truth for what each trial trains.
"""
from __future__ import annotations

import json
import math
from dataclasses import fields

from ray import tune

from ...trainer.arms import ARMS
from ...trainer.config import Config, ConfigError
from ...trainer.evaluate import selected_errors
from ...trainer.storage import read_text, write_text
from ..cluster import experiment_uri, remove_trial_scratch, restore_or_new_tuner, trial_resources
from ..collate import collate
from ..progress import RichProgress
from ..retry import NoRetryWhenDiverged
from ..stage1 import check_stage1, ensure_stage1
from ..trainables import STAGE1_CACHE_KEY, train_trial
from .spec import coerce, plan_cells

PLAN_FILE = "ablation_plan.json"  # a copy of the plan beside the Ray experiment


class CellValue:
    """tune.sample_from callable: the value of a non-axis field for the trial's cell."""

    def __init__(self, field: str, axes: list[str], table: dict):
        self.field, self.axes, self.table = field, list(axes), table

    def __call__(self, config):
        config = config["config"] if "config" in config else config  # Ray's older {"config": ...} form
        key = tuple(coerce(a, config[a]) for a in self.axes)
        try:
            return self.table[key]
        except KeyError:
            raise ConfigError(f"{self.field}: no planned cell for {dict(zip(self.axes, key))}") from None


def param_space(plan: dict) -> dict:
    cells = plan_cells(plan)
    axes = plan["axes"]
    grid = {a: [coerce(a, v) for v in vals] for a, vals in plan["spec"]["grid"].items()}
    if math.prod(len(v) for v in grid.values()) != len(cells):
        raise ConfigError("the plan's cells are not the product of its grid axes; re-expand the spec")
    space = {}
    for f in (f.name for f in fields(Config)):
        values = [c.config[f] for c in cells]
        if f in axes:
            space[f] = tune.grid_search(grid[f])
        elif all(v == values[0] for v in values):
            space[f] = values[0]
        else:
            table = {tuple(c.key[a] for a in axes): c.config[f] for c in cells}
            space[f] = tune.sample_from(CellValue(f, axes, table))
    return space


def run_experiment(plan: dict, storage: str, name: str, cpus_per_trial: float, gpus_per_trial: float,
                   restart: bool = False, progress: bool = True, max_failures: int = 0,
                   stage1_cache: str | None = None, retry_errored: bool = False, trackers: list | None = None,
                   stage1_plan: dict | None = None):
    """(ResultGrid, restored, stage-I table or None): first every distinct stage I the cells
    need and the cache lacks (with stage1_cache; risda.runner.stage1.ensure_stage1), then the plan's
    grid, each cell forking stage II from its stage I (isda trains from epoch 0). Continues an
    interrupted experiment (finished trials kept, unfinished ones resumed from their
    checkpoints, failed ones only with retry_errored; --restart starts over). `trackers`: more
    Tune callbacks (risda.runner.trackers). stage1_plan: the cells' stage Is as the driver checked
    them before Ray started (check_stage1), else checked here."""
    path = experiment_uri(storage, name)
    full, plan = plan, training_plan(plan)
    resources = trial_resources(cpus_per_trial, gpus_per_trial)
    train = tune.with_resources(train_trial, resources)
    axes = plan["axes"]
    callbacks = [NoRetryWhenDiverged()] + ([RichProgress(len(plan["cells"]), metric="test_error", params=axes)] if progress else [])
    callbacks += trackers or []
    stage1 = None
    space = param_space(plan)
    if stage1_cache:
        if stage1_plan is None:
            stage1_plan = check_stage1([Config.from_dict(c.config) for c in plan_cells(plan)], stage1_cache)
        stage1 = ensure_stage1(stage1_plan, stage1_cache, storage, name, resources, max_failures, progress)
        space[STAGE1_CACHE_KEY] = stage1_cache

    def new_tuner():
        return tune.Tuner(
            train, param_space=space,
            tune_config=tune.TuneConfig(num_samples=1, reuse_actors=True),
            run_config=tune.RunConfig(
                name=name, storage_path=storage, verbose=0, callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))

    tuner, restored = restore_or_new_tuner(path, train, new_tuner, restart=restart, retry_errored=retry_errored)
    write_text(f"{path}/{PLAN_FILE}", json.dumps(full, indent=1))  # with the derived cells: --merge collates them
    return remove_trial_scratch(tuner.fit()), restored, stage1


def training_plan(plan: dict) -> dict:
    """The plan without the cells of derived arms (risda.trainer.arms derived_from: post-hoc LA is read
    from the CE cell's evaluation), which train nothing; collation gives them back their rows."""
    derived = [a for a in plan["spec"]["grid"].get("arm", []) if ARMS[a].derived_from]
    if not derived:
        return plan
    spec = {**plan["spec"], "grid": {**plan["spec"]["grid"], "arm": [a for a in plan["spec"]["grid"]["arm"] if a not in derived]}}
    return {**plan, "spec": spec, "cells": [c for c in plan["cells"] if c["key"].get("arm") not in derived]}


def with_derived(trials: list[dict]) -> list[dict]:
    """Each trial, and one trial per derived arm of its arm, made from the summary that the
    trainer recorded for it (risda.trainer.loop: summary["derived"]): same status, no epochs of its own."""
    out = []
    for t in trials:
        out.append(t)
        derived = t["result"].get("derived") or {}
        derived = json.loads(derived) if isinstance(derived, str) else derived
        for arm_name, summary in derived.items():
            config = {**t["config"], **{k: v for k, v in summary.get("config", {}).items() if k in ("arm", *ARMS[arm_name].fields)}}
            config["arm"] = arm_name
            out.append(dict(t, config=config, trial_id=f"{t['trial_id']}+{arm_name}",
                            result={**summary, "completed": t["result"].get("completed", True)}))
    return out


def saved_plan(storage: str, name: str) -> dict | None:
    text = read_text(f"{experiment_uri(storage, name)}/{PLAN_FILE}")
    return json.loads(text) if text else None


def load_results(storage: str, name: str):
    """The ResultGrid of an existing experiment, without training anything."""
    path = experiment_uri(storage, name)
    if not tune.Tuner.can_restore(path):
        raise ConfigError(f"--collate-only: no Ray experiment at {path}; run without --collate-only first, "
                          f"or point --storage / --name at the experiment")
    return tune.Tuner.restore(path, trainable=train_trial).get_results()


# --- ResultGrid -> trial dicts for risda.runner.ablation.tables.collate_runs -------------
def trials_from_grid(grid, axes) -> tuple[list[dict], "object"]:
    """(trials, epochs DataFrame). Each trial: config, status (Ray's), error, result (the
    trainer-summary errors: last evaluated epoch, best validation epoch, best test epoch)."""
    trials_df, epochs_df = collate(grid, metric="val_error", params=())
    trials = []
    for row in trials_df.to_dict("records"):
        epochs = epochs_df[epochs_df.trial_id == row["trial_id"]] if len(epochs_df) else epochs_df
        config = json.loads(row["config"]) or trial_params(row["path"])
        config.pop(STAGE1_CACHE_KEY, None)
        # The trainer's own summary rides on a trial's last report; the epochs rebuild it otherwise.
        summary = json.loads(row.get("summary") or "{}")
        result = {**summary_from_epochs(epochs, row), **summary, "completed": bool(row.get("completed"))}
        trials.append(dict(config=config, status=row["status"], error=row["error"],
                           trial_id=row["trial_id"], path=row["path"], result=result))
    return with_derived(trials), epochs_df


def trial_params(path: str) -> dict:
    """A trial's config from its params.json. A ResultGrid from Tuner.restore has no config
    for a trial that failed before its first report; its directory still has the params."""
    text = read_text(f"{path}/params.json") if path else None
    return json.loads(text) if text else {}


def summary_from_epochs(epochs, row: dict) -> dict:
    """The trainer's summary fields (risda.trainer.loop.summarize) from a trial's reported epochs."""
    out = dict(epochs_run=row.get("epochs_run"), wall_time_s=row.get("wall_time_s"), completed=bool(row.get("completed")))
    if epochs is None or not len(epochs) or "test_error" not in epochs:
        return out
    evaluated = epochs[epochs.test_error.notna()].sort_values("epoch")
    if not len(evaluated):
        return out
    last = evaluated.iloc[-1]
    out.update(selected_errors(last, "last"), last_epoch=last.epoch)
    best_test = evaluated.loc[evaluated.test_error.idxmin()]
    out.update(selected_errors(best_test, "best_test"), best_test_epoch=best_test.epoch)
    if "val_error" in evaluated and evaluated.val_error.notna().any():
        best_val = evaluated.loc[evaluated.val_error.idxmin()]
        out.update(selected_errors(best_val, "best_val"), best_val_error=best_val.val_error, best_val_epoch=best_val.epoch)
    if "train_size" in evaluated:
        out["train_size"] = last.get("train_size")
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
