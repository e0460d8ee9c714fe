"""Ray Tune plumbing shared by the hyperparameter search (tune/search.py) and the ablation
runner: the trainer wrapped as a function trainable, Ray start-up, the resource check,
storage paths, restore-or-new Tuners, and the collation of a ResultGrid into tables.

The trainable takes a plain dict of risda.config.Config fields (param_space constants
merged with what a searcher suggests), so a trial is exactly one `risda.train` run.
Only `ray.tune` is used inside a trial (`ray.train.report` is an error in Tune trials).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from . import storage
from .config import Config, ConfigError

CHECKPOINT_FILE = "checkpoint.pt"  # the trainer's file; Tune checkpoints hold just this one
STAGE1_CACHE_KEY = "stage1_cache"  # in a trial's config: the stage-I cache to fork from (not a Config field)
LOCAL_STORAGE = "ray_results"      # default storage, relative to the working directory
# Tune's own per-report bookkeeping, dropped from our epoch tables.
TUNE_COLUMNS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "date", "time_this_iter_s",
                "time_total_s", "pid", "time_since_restore", "iterations_since_restore", "should_checkpoint"}
# Constant per-trial facts that ride along on every report (so any one report carries them).
TRIAL_FACTS = ("device", "ray_gpu_ids", "node_id", "hostname", "seed", "subset_seed")


# --- the trainables ------------------------------------------------------------------------
def train_trial(config: dict) -> None:
    """Ray Tune function trainable: one trainer run of `Config.from_dict(config)`.

    Reports every epoch with `tune.report` (train_loss, train_error, images_per_s, stage;
    the evaluation fields val_error, test_error, test_many/medium/few_error every eval_every
    epochs and at the last), plus epochs_done, stage2_epochs_done (ASHA's time axis) and the
    TRIAL_FACTS; the last report also carries the trainer's summary (`summary_*`). It attaches
    the trainer's checkpoint.pt as a Tune checkpoint on every checkpointed epoch and resumes from
    `tune.get_checkpoint()` when Tune restores the trial. With config["stage1_cache"] (a cache
    root, see risda.stage1) a fresh trial forks stage II from the cached stage I instead of
    training it. Wrap it with `tune.with_resources(train_trial, trial_resources(...))`."""
    from .stage1 import Stage1Cache, needs_observations, shares_stage1, stage1_key
    from .trainer import train

    config = dict(config)
    cache_root = config.pop(STAGE1_CACHE_KEY, None)
    with trial_scratch() as out:
        cfg = trial_config(config, out)
        facts = trial_facts(cfg)
        resume_from = restore_trial_checkpoint(out)
        stage1_from = None
        if resume_from is None and cache_root and shares_stage1(cfg):
            cache = Stage1Cache(cache_root)
            if cache.lookup(cfg, needs_observations(cfg)) is None:
                raise RuntimeError(f"stage I {stage1_key(cfg)} is not in the cache {cache_root}: the runner trains "
                                   f"every stage I before the stage-II trials; rerun the same command")
            stage1_from = cache.fetch(cfg, out / "stage1.pt")
        if cache_root and shares_stage1(cfg):
            facts["stage1_key"] = stage1_key(cfg)
        final = {}

        def on_epoch(record: dict, checkpoint: Path | None) -> None:
            metrics = {**record, "epochs_done": record["epoch"] + 1,
                       "stage2_epochs_done": max(0, record["epoch"] + 1 - cfg.resolved().stage1_epochs), **facts}
            if record["epoch"] + 1 == cfg.epochs:  # reported below, with the summary
                final.update(metrics=metrics, checkpoint=checkpoint)
                return
            report(metrics, checkpoint)

        summary = train(cfg, on_epoch=on_epoch, resume_from=resume_from, stage1_from=stage1_from)
        scalars = {f"summary_{k}": v for k, v in summary.items() if isinstance(v, (int, float, str)) or v is None}
        last = final or {"metrics": {"epochs_done": cfg.epochs, **facts}, "checkpoint": None}  # restored at its end
        report({**last["metrics"], **scalars}, last["checkpoint"])


def train_stage1_trial(config: dict) -> None:
    """Ray Tune function trainable: the shared stage I of one stage-I key (risda.stage1).

    config: {"job": {"config": <Config dict>, "observations": bool, "stage1_cache": root}}.
    Reports every epoch; keeps its resumable checkpoint in the cache (<key>/partial.pt), so a
    rerun, a retry or another experiment over the same stage I continues it; stores the
    finished stage I in the cache and reports its key."""
    from .stage1 import Stage1Cache, stage1_key
    from .trainer import train

    job = config["job"]
    cfg_dict, observations, cache = job["config"], bool(job["observations"]), Stage1Cache(job[STAGE1_CACHE_KEY])
    with trial_scratch() as out:
        cfg = trial_config(cfg_dict, out)
        key = stage1_key(cfg)
        facts = {**trial_facts(cfg), "stage1_key": key}
        if cache.lookup(cfg, observations) is not None:
            tune.report({"epochs_done": cfg.resolved().stage1_epochs, "cached": True, **facts})
            return
        partial = cache.partial(cfg)
        resume_from = storage.download(partial, out / "checkpoint.pt") if storage.exists(partial) else None

        def on_epoch(record: dict, checkpoint: Path | None) -> None:
            if checkpoint is not None:
                storage.upload(checkpoint, partial)
            tune.report({**record, "epochs_done": record["epoch"] + 1, "cached": False, **facts})

        done = train(cfg, on_epoch=on_epoch, resume_from=resume_from, stage1_only=True, observe_reference=observations)
        cache.store(cfg, Path(done["checkpoint"]), {"observations": observations, "wall_time_s": done["wall_time_s"],
                                                    "epochs": cfg.resolved().stage1_epochs, "train_size": done["train_size"],
                                                    "trial_id": tune.get_context().get_trial_id()})
        storage.delete_file(partial)


def report(metrics: dict, checkpoint: Path | None) -> None:
    if checkpoint is None:
        tune.report(metrics)
        return
    # Tune copies the directory into its storage during report(), so a temporary copy is
    # enough and the trainer can keep overwriting its own file.
    with tempfile.TemporaryDirectory() as d:
        shutil.copy2(checkpoint, Path(d) / CHECKPOINT_FILE)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


@contextlib.contextmanager
def trial_scratch():
    """The trainer's out dir: scratch, removed however the trial ends. Tune copies its trial
    dir to storage while the trial runs, which stored stale copies of checkpoint.pt; all the
    trainer writes is in the reports anyway."""
    # Ray logs a line per persisted checkpoint from every trial; it drowns the driver's progress.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    out = Path(tempfile.mkdtemp(prefix=f"risda-trial-{tune.get_context().get_trial_id()}-"))
    try:
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


def trial_facts(cfg: Config) -> dict:
    """Seeds and the machine, on every report; also seeds the trial's global RNGs and threads."""
    from .trainer import device_name, pick_device
    seed_everything(cfg.seed)
    set_torch_threads()
    return dict(device=device_name(pick_device(cfg.device)), ray_gpu_ids=",".join(map(str, ray.get_gpu_ids())),
                node_id=ray.get_runtime_context().get_node_id(), hostname=socket.gethostname(),
                seed=cfg.seed, subset_seed=cfg.resolved().subset_seed)


def trial_config(config: dict, out: Path) -> Config:
    """The Config a trial runs: the given fields, with the run-local ones set for Tune.

    out is the trial's scratch directory; progress bars are off; the device is the one Ray
    assigned (see `trial_device`)."""
    cfg = Config.from_dict(config)
    cfg.out = str(out)
    cfg.progress, cfg.resume = False, False
    cfg.device = trial_device(cfg.device)
    return cfg.validate()


def trial_device(requested: str) -> str:
    """'auto' becomes the GPU Ray assigned to this trial (Ray sets CUDA_VISIBLE_DEVICES, so
    it is cuda:0 here, also for a fractional GPU), else the CPU: a trial never grabs a GPU
    Ray did not give it. A logical GPU that torch cannot see (a test cluster) is CPU too;
    the results record both the device and ray_gpu_ids."""
    if requested != "auto":
        return requested
    import torch
    return "cuda:0" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def seed_everything(seed: int) -> None:
    """Reseed the global RNGs: Ray may reuse a worker process for the next trial."""
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_torch_threads() -> None:
    """As many intra-op threads as CPUs Ray reserved for the trial (Ray sets OMP_NUM_THREADS
    for 1 CPU; torch would otherwise use every core of the node)."""
    import torch
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))


def restore_trial_checkpoint(out: Path) -> Path | None:
    """Copy the checkpoint Tune restored this trial with into `out`; None for a fresh trial."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    out.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as d:
        shutil.copy2(Path(d) / CHECKPOINT_FILE, out / CHECKPOINT_FILE)
    return out / CHECKPOINT_FILE


def trial_dirname(trial) -> str:
    """Short trial directory names (TuneConfig(trial_dirname_creator=...)): by default Tune
    spells out every config field that a searcher's suggestion carries."""
    return f"{trial.trainable_name}_{trial.trial_id}"


def absolute_paths(cfg: Config) -> Config:
    """data_root and cache_dir made absolute on the driver: trials run in scratch directories."""
    cfg.data_root = str(Path(cfg.data_root).expanduser().resolve())
    cfg.cache_dir = str(Path(cfg.cache_dir).expanduser().resolve())
    return cfg


class EvaluatedOptunaSearch(OptunaSearch):
    """OptunaSearch that hears only the reports carrying the metric: trials report every epoch,
    the validation error only on evaluated ones (OptunaSearch would raise a KeyError)."""

    def on_trial_result(self, trial_id: str, result: dict):
        if self.metric in result:
            super().on_trial_result(trial_id, result)


# --- stage I, shared ------------------------------------------------------------------------
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
    from .stage1 import needs_observations, shares_stage1, stage1_key, stage1_training_config
    plan = {}
    for cfg in configs:
        if shares_stage1(cfg):
            key = stage1_key(cfg)
            observations = needs_observations(cfg) or plan.get(key, (None, False))[1]
            plan[key] = (stage1_training_config(cfg), observations)
    return plan


def ensure_stage1(configs: list[Config], cache_root: str, storage_root: str, name: str, resources: dict,
                  max_failures: int = 0, progress: bool = True):
    """Train every distinct stage I that `configs` need and the cache lacks, as one Tune
    experiment `<name>-stage1` (a grid over the missing keys, one trial each, the same
    per-trial resources as stage II, so they spread over a cluster). Returns a DataFrame with
    one row per key: reused or trained now, its wall time, status and error. Raises
    Stage1Failed if any is still missing afterwards."""
    import pandas as pd
    from .stage1 import Stage1Cache
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
            tune.with_resources(train_stage1_trial, resources),
            param_space={"job": tune.grid_search(jobs)},
            tune_config=tune.TuneConfig(trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=f"{name}-stage1", storage_path=storage_root, verbose=0,
                                      callbacks=[RichProgress(len(jobs), metric=None, label="stage I")] if progress else [],
                                      failure_config=tune.FailureConfig(max_failures=max_failures)))
        for result in tuner.fit():
            if result.error is not None:
                job = (result.config or {}).get("job", {})
                key = (result.metrics or {}).get("stage1_key") or job.get("config", {}).get("seed", "?")
                errors[str(key)] = error_message(result.error)
    rows = []
    for key, (cfg, obs) in plan.items():
        info = cache.lookup(cfg, obs)
        rows.append(dict(stage1_key=key, status="ok" if info else "failed", trained_now=key in missing,
                         observations=obs, epochs=cfg.resolved().stage1_epochs,
                         wall_time_s=(info or {}).get("wall_time_s"), error=None if info else errors.get(key, "missing"),
                         entry=cache.entry(key)))
    table = pd.DataFrame(rows, columns=["stage1_key", "status", "trained_now", "observations", "epochs", "wall_time_s",
                                        "error", "entry"])
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


def add_runner_args(parser, default_name: str) -> None:
    """The flags of where and how an experiment runs, shared by tune/search.py and ablations/run.py."""
    w = parser.add_argument_group("where it runs (Ray)")
    w.add_argument("--address", default=None, help="Ray cluster to join: host:port, ray://host:port or auto "
                                                   "(default: $RAY_ADDRESS, else an embedded local Ray on 127.0.0.1)")
    w.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray (default: all)")
    w.add_argument("--num-gpus", type=int, default=None, help="GPUs of the embedded local Ray (default: all)")
    w.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs per trial (default: 1)")
    w.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs per trial, fractions pack trials on a GPU, "
                                                                    "e.g. 0.25 (default: 0)")
    w.add_argument("--max-failures", type=int, default=0, help="retries of a failed trial from its last checkpoint (default: 0)")
    w.add_argument("--storage", default=None, help=f"Ray experiment storage: a path or a URI pyarrow understands "
                                                   f"(s3://, gs://; shared by all nodes) (default: ./{LOCAL_STORAGE})")
    w.add_argument("--name", default=None, help=f"experiment name (default: {default_name})")
    w.add_argument("--results", default="results", help="tables go to <results>/<name>/ (default: results)")
    w.add_argument("--restart", action="store_true", help="delete the experiment of this name and start over")
    w.add_argument("--retry-errored", action="store_true", help="on resume, also continue the trials that failed, from "
                                                                "their last checkpoint (e.g. after a crash killed them)")
    w.add_argument("--shared-stage1", action=argparse.BooleanOptionalAction, default=True,
                   help="train each distinct stage I once and fork every trial's stage II from it (default: on; "
                        "--no-shared-stage1 trains each trial's own stage I)")
    w.add_argument("--stage1-cache", default=None, metavar="DIR|URI",
                   help="the stage-I cache, shared by searches and ablations over the same base config "
                        "(default: <storage>/stage1)")


# --- the cluster ----------------------------------------------------------------------------
def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             **options) -> bool:
    """Connect to the cluster at `address` (or $RAY_ADDRESS); with neither, start an embedded
    local Ray with num_cpus/num_gpus (default: what the machine has). `options` go to
    ray.init either way (e.g. include_dashboard=False, logging_level="warning").

    Returns True when this call initialised Ray (the caller shuts it down), False when Ray
    was already initialised, e.g. by a test fixture or a notebook."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        options.pop("include_dashboard", None)  # only meaningful when starting Ray
        try:
            ray.init(address=address, **options)
        except ConnectionError as e:  # something answers there, but not a Ray cluster
            raise ConfigError(f"{e}: is a Ray head node (`ray start --head`) running at {address}? "
                              f"Fix --address / RAY_ADDRESS, or drop it to run on an embedded local Ray") from None
    else:
        # "local" and not None: None would attach to a cluster someone `ray start`ed here.
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **options)
    return True


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raise ConfigError quickly when nothing listens at a host:port address (ray.init
    itself would retry for a minute and then fail with a less helpful message)."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r} is not host:port (or ray://host:port, or auto)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"no Ray cluster answers at {address} ({e}): start one there with "
                          f"`ray start --head --port {port}`, fix --address / RAY_ADDRESS, "
                          f"or drop --address to run on an embedded local Ray") from None


def trial_resources(cpus_per_trial: float, gpus_per_trial: float) -> dict:
    """What one trial reserves, checked against the live cluster: Ray would leave a trial that
    fits on no node PENDING forever, so that is a ConfigError here instead. Fractional GPUs
    are bookkeeping only (0.25 packs four trials on one GPU)."""
    if cpus_per_trial <= 0:
        raise ConfigError(f"--cpus-per-trial must be > 0, got {cpus_per_trial}")
    if not 0 <= gpus_per_trial <= 1:
        raise ConfigError(f"--gpus-per-trial must be in [0, 1] (the trainer uses one device; fractions pack "
                          f"several trials on a GPU), got {gpus_per_trial}")
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    most_cpus = max((n.get("CPU", 0) for n in nodes), default=0)
    most_gpus = max((n.get("GPU", 0) for n in nodes), default=0)
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    if gpus_per_trial > most_gpus:
        raise ConfigError(f"--gpus-per-trial {gpus_per_trial:g} but no node of the cluster has that many GPUs "
                          f"(largest node: {most_gpus:g}, cluster total: {total_gpus:g}); lower --gpus-per-trial "
                          f"(0 trains on CPUs) or connect to a cluster with GPUs (--address)")
    if cpus_per_trial > most_cpus:
        raise ConfigError(f"--cpus-per-trial {cpus_per_trial:g} but the largest node has {most_cpus:g} CPUs; "
                          f"lower --cpus-per-trial")
    return {"cpu": cpus_per_trial, "gpu": gpus_per_trial}


def cluster_summary() -> str:
    """One line: nodes, CPUs and GPUs of the live cluster."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    total = lambda k: sum(n.get(k, 0) for n in nodes)
    return f"{len(nodes)} node(s), {total('CPU'):g} CPUs, {total('GPU'):g} GPUs"


# --- storage ----------------------------------------------------------------------------------
def storage_uri(storage: str | None) -> str:
    """An absolute local path (default ./ray_results), or a URI as given (s3://, gs://,
    file://, anything pyarrow understands; on a multi-node cluster it must be shared)."""
    if storage and "://" in storage:
        return storage.rstrip("/")
    return str(Path(storage or LOCAL_STORAGE).expanduser().resolve())


def experiment_uri(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


read_text, write_text, delete_dir = storage.read_text, storage.write_text, storage.delete_dir


def restore_or_new_tuner(path: str, trainable, new_tuner: Callable[[], tune.Tuner],
                         restart: bool = False, retry_errored: bool = False) -> tuple[tune.Tuner, bool]:
    """(Tuner, restored). Tuner.restore(path) when a restorable experiment is there: finished
    trials are kept, unfinished ones continue from their last checkpoint, the searcher and
    scheduler continue from their saved state. Errored trials stay errored unless
    retry_errored (then they continue from their last checkpoint too: for trials that a
    crash or a lost node killed). Otherwise (or with restart=True, which deletes the old
    experiment first) `new_tuner()`. `trainable` must be the one the experiment was created with."""
    if restart:
        delete_dir(path)
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=retry_errored), True
    return new_tuner(), False


# --- results -----------------------------------------------------------------------------------
def error_message(error) -> str | None:
    """The last line of a trial's exception (e.g. 'DivergedError: loss became nan ...'):
    Ray wraps it in a RayTaskError whose str() is the whole remote traceback."""
    if error is None:
        return None
    lines = [l.strip() for l in str(error).strip().splitlines() if l.strip()]
    return lines[-1] if lines else repr(error)


def trial_statuses(grid) -> dict[str, str]:
    """trial_id -> Ray's status (TERMINATED, ERROR, PAUSED, PENDING, ...) from the saved
    experiment state (a Result alone does not say whether an unfinished trial was stopped
    by the scheduler or interrupted)."""
    analysis = tune.ExperimentAnalysis(grid.experiment_path, storage_filesystem=grid.filesystem)
    return {t.trial_id: t.status for t in analysis.trials}


def epoch_rows(result, params=()) -> list[dict]:
    """One dict per reported epoch of one trial (the last report wins if a restored trial
    reported an epoch twice), with trial_id and the searched `params` in front."""
    df = result.metrics_dataframe
    if df is None or df.empty or "epoch" not in df:
        return []
    config = result.config or {}
    df = df.drop(columns=[c for c in df.columns if c in TUNE_COLUMNS or c.startswith(("config/", "summary_"))])
    df = df.drop_duplicates("epoch", keep="last").sort_values("epoch")
    head = {"trial_id": trial_id_of(result), **{p: config.get(p) for p in params}}
    return [{**head, **row} for row in df.to_dict("records")]


def trial_id_of(result) -> str:
    return (result.metrics or {}).get("trial_id") or Path(result.path).name


def trial_row(result, status: str | None, metric: str = "val_error", params=()) -> dict:
    """One trial as a flat dict: params, status, error, the epoch with the best `metric` and
    the final errors (test, many/medium/few, validation), epochs run, wall time, where it ran."""
    config = {k: v for k, v in (result.config or {}).items() if k != STAGE1_CACHE_KEY}
    epochs = epoch_rows(result)
    last = epochs[-1] if epochs else {}
    scored = [r for r in epochs if r.get(metric) is not None]
    best = min(scored, key=lambda r: r[metric]) if scored else {}
    metrics = result.metrics or {}
    row = {"trial_id": trial_id_of(result), **{p: config.get(p) for p in params},
           "status": status, "error": error_message(result.error),
           "completed": bool(last) and last.get("epochs_done") == config.get("epochs"),
           "epochs_run": last.get("epochs_done", 0),
           f"final_{metric}": last.get(metric), f"best_{metric}": best.get(metric),
           f"best_{metric}_epoch": best.get("epoch")}
    for k in ("test_error", "test_many_error", "test_medium_error", "test_few_error",
              "val_error", "val_many_error", "val_medium_error", "val_few_error"):
        row.setdefault(f"final_{k}", last.get(k))
    ended, wall = metrics.get("timestamp"), metrics.get("time_total_s")
    row.update(train_time_s=last.get("wall_time_s"), wall_time_s=wall,
               started_at=None if ended is None or wall is None else ended - wall, ended_at=ended,
               node_ip=metrics.get("node_ip"), **{k: last.get(k) for k in TRIAL_FACTS},
               stage1_key=last.get("stage1_key"), stage1_wall_time_s=metrics.get("summary_stage1_wall_time_s"),
               path=result.path, config=json.dumps(config, sort_keys=True),
               summary=json.dumps({k[len("summary_"):]: v for k, v in metrics.items() if k.startswith("summary_")}))
    return row


def collate(grid, metric: str = "val_error", params=()):
    """(trials, epochs) DataFrames from a ResultGrid. trials: one row per trial, including
    trials that failed before their first report (get_dataframe() drops those), with the
    error message; epochs: one row per trial per reported epoch."""
    import pandas as pd
    statuses = trial_statuses(grid)
    trials = pd.DataFrame([trial_row(r, statuses.get(trial_id_of(r)), metric, params) for r in grid])
    trials = trials.sort_values("started_at", kind="stable", ignore_index=True)  # in the order they ran
    epochs = pd.DataFrame([row for r in grid for row in epoch_rows(r, params)])
    for df in (trials, epochs):  # an empty shot group is None: make those columns float, not object
        for c in [c for c in df.columns if c.endswith("_error")]:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return trials, epochs


def write_parquet(df, path: Path) -> Path:
    """Atomic write (temp file + rename) so a reader never sees half a table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.parquet")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


class Outcome:
    """How a set of requested trials ended: done (TERMINATED: all epochs, or stopped by the
    scheduler), failed (ERROR, diverged included) and unfinished (never started, pending,
    running or paused when the driver stopped)."""

    def __init__(self, done: int, failed: int, unfinished: int):
        self.done, self.failed, self.unfinished = done, failed, unfinished

    @classmethod
    def of(cls, trials, requested: int) -> "Outcome":
        status = trials["status"] if len(trials) else []
        done = int((status == "TERMINATED").sum()) if len(trials) else 0
        failed = int((status == "ERROR").sum()) if len(trials) else 0
        return cls(done, failed, max(0, requested - done - failed))

    def report(self, console, retry_hint: bool = False) -> int:
        """Print what did not finish; the exit code: 0 all done, 130 interrupted, 1 failures."""
        total = self.done + self.failed + self.unfinished
        if self.failed:
            hint = " (rerun with --retry-errored to continue them from their last checkpoint)" if retry_hint else ""
            console.print(f"[red]{self.failed} of {total} trial(s) failed{hint}[/red]")
        if self.unfinished:
            console.print(f"[yellow]{self.unfinished} of {total} trial(s) unfinished: the state is saved, rerun the same "
                          f"command to continue[/yellow]")
        if self.failed:
            return 1
        return 130 if self.unfinished else 0


def check_writable(path: str | Path, flag: str) -> None:
    """A local output folder that can be created and written, checked before Ray starts."""
    if "://" in str(path):
        return
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".risda-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{flag} {path} is not writable ({e.strerror or e}); choose a folder you can write to") from None


def best_trial(trials, metric: str = "val_error"):
    """The row with the lowest final `metric` among trials that ran all epochs (a trial ASHA
    stopped early is not comparable, a failed one is not a result); None if there is none.
    Ties go to the lower best-epoch `metric`, then to the earlier trial (the enqueued paper
    point, if any), so the answer does not depend on the order Ray lists trials in."""
    if not len(trials):
        return None
    pool = trials[trials[f"final_{metric}"].notna() & trials["completed"] & (trials["status"] == "TERMINATED")]
    if not len(pool):
        return None
    return pool.sort_values([f"final_{metric}", f"best_{metric}", "started_at"], kind="stable").iloc[0]


# --- progress and summary ------------------------------------------------------------------------
class RichProgress(tune.Callback):
    """On the driver: a rich bar of finished trials, each running trial's epoch beside it
    (trials report every epoch, so it moves within a minute), and a line per finished trial.

    Tune pickles its callbacks with the experiment, so the rich objects are made lazily and
    dropped from the pickle."""

    def __init__(self, total: int, metric: str | None = "val_error", params=(), label: str = "trials"):
        self.total, self.metric, self.params, self.label = total, metric, tuple(params), label
        self._bar = None
        self._scores = {}  # trial_id -> last reported metric (reports between evaluations lack it)

    def __getstate__(self):
        return {**self.__dict__, "_bar": None}

    def _progress(self):
        if self._bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self._bar = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn())
            self._task = self._bar.add_task(self.label, total=self.total, status="")
            self._bar.start()
        return self._bar

    def _describe(self, trial) -> str:
        params = " ".join(f"{p}={_fmt(trial.config.get(p))}" for p in self.params)
        return f"{trial.trial_id} {params}".strip()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.metric and result.get(self.metric) is not None:
            self._scores[trial.trial_id] = result[self.metric]

    def on_step_end(self, iteration, trials, **info):
        finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        running = [t for t in trials if t.status == "RUNNING"]
        epochs = ", ".join(f"{t.trial_id[-5:]} ep {t.last_result.get('epochs_done', 0)}" for t in running[:6])
        best = f"  best {self.metric} {min(self._scores.values()):.2f}" if self._scores else ""
        self._progress().update(self._task, completed=finished, status=f"{len(running)} running: {epochs}{best}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result
        score = f"{self.metric} {_fmt(r.get(self.metric))}  test {_fmt(r.get('test_error'))}  " if self.metric else ""
        self._progress().console.log(f"done   {self._describe(trial)}  {score}epochs {r.get('epochs_done', 0)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        # Tune writes the error file after this call; Tune's log shows the traceback and
        # trials.parquet the message.
        self._progress().console.log(f"[red]failed {self._describe(trial)}")

    def on_experiment_end(self, trials, **info):
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_top(trials, metric: str = "val_error", params=(), n: int = 10, title: str = "top trials") -> None:
    """A rich table of the n best trials by final `metric`, failed trials counted below it."""
    from rich.console import Console
    from rich.table import Table
    console = Console()
    if not console.is_terminal:  # a log file: don't squeeze the table into 80 columns
        console.width = 150
    if not len(trials):
        console.print("no trials")
        return
    scored = trials[trials[f"final_{metric}"].notna()].sort_values(["completed", f"final_{metric}"], ascending=[False, True])
    table = Table(title=title)
    columns = {"trial_id": "trial", **{p: p for p in params}, f"final_{metric}": metric.replace("_error", ""),
               "final_test_error": "test", "final_test_many_error": "many", "final_test_medium_error": "med",
               "final_test_few_error": "few", "epochs_run": "epochs", "wall_time_s": "wall s"}
    for label in columns.values():
        table.add_column(label, justify="left" if label == "trial" else "right", no_wrap=True)
    for _, row in scored.head(n).iterrows():
        table.add_row(*[_fmt(row.get(c)) for c in columns])
    console.print(table)
    failed = trials[trials["error"].notna()]
    for _, row in failed.iterrows():
        console.print(f"[red]failed[/red] {row['trial_id']}: {row['error']}")
