"""Ray Tune plumbing shared by the hyperparameter search (tune/search.py) and the ablation
runner: the trainer wrapped as a function trainable, Ray start-up, the resource check,
storage paths, restore-or-new Tuners, and the collation of a ResultGrid into tables.

The trainable takes a plain dict of risda.config.Config fields (param_space constants
merged with what a searcher suggests), so a trial is exactly one `risda.train` run.
Only `ray.tune` is used inside a trial (`ray.train.report` is an error in Tune trials).
"""
from __future__ import annotations

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

from .config import Config, ConfigError

CHECKPOINT_FILE = "checkpoint.pt"  # the trainer's file; Tune checkpoints hold just this one
LOCAL_STORAGE = "ray_results"      # default storage, relative to the working directory
# Tune's own per-report bookkeeping, dropped from our epoch tables.
TUNE_COLUMNS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "date", "time_this_iter_s",
                "time_total_s", "pid", "time_since_restore", "iterations_since_restore", "should_checkpoint"}
# Constant per-trial facts that ride along on every report (so any one report carries them).
TRIAL_FACTS = ("device", "ray_gpu_ids", "node_id", "hostname", "seed", "subset_seed")


# --- the trainable ------------------------------------------------------------------------
def train_trial(config: dict) -> None:
    """Ray Tune function trainable: one trainer run of `Config.from_dict(config)`.

    Reports every evaluated epoch with `tune.report` (record fields: val_error, test_error,
    test_many/medium/few_error, ..., plus epochs_done and the TRIAL_FACTS), attaches the
    trainer's checkpoint.pt as a Tune checkpoint on every checkpointed epoch, and resumes
    from `tune.get_checkpoint()` when Tune restores the trial. Wrap it with
    `tune.with_resources(train_trial, trial_resources(...))`."""
    from .trainer import device_name, pick_device, train

    # Ray logs a line per persisted checkpoint from every trial; it drowns the driver's progress.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # The trainer's own out dir is scratch: Tune copies its trial dir to storage while the
    # trial runs, which stored stale copies of checkpoint.pt; everything the trainer writes
    # is in the reports anyway.
    out = Path(tempfile.mkdtemp(prefix=f"risda-trial-{tune.get_context().get_trial_id()}-"))
    try:
        cfg = trial_config(config, out)
        seed_everything(cfg.seed)
        set_torch_threads()
        facts = dict(device=device_name(pick_device(cfg.device)), ray_gpu_ids=",".join(map(str, ray.get_gpu_ids())),
                     node_id=ray.get_runtime_context().get_node_id(), hostname=socket.gethostname(),
                     seed=cfg.seed, subset_seed=cfg.resolved().subset_seed)

        def on_epoch(record: dict, checkpoint: Path | None) -> None:
            metrics = {**record, "epochs_done": record["epoch"] + 1, **facts}
            if checkpoint is None:
                tune.report(metrics)
                return
            # Tune copies the directory into its storage during report(), so a temporary
            # copy is enough and the trainer can keep overwriting its own file.
            with tempfile.TemporaryDirectory() as d:
                shutil.copy2(checkpoint, Path(d) / CHECKPOINT_FILE)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

        train(cfg, on_epoch=on_epoch, resume_from=restore_trial_checkpoint(out))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def trial_config(config: dict, out: Path) -> Config:
    """The Config a trial runs: the given fields, with the run-local ones set for Tune.

    out is the trial's scratch directory; progress bars are off; every checkpoint epoch is
    also an evaluated epoch (a report without the metric would stop the trial); the
    device is the one Ray assigned (see `trial_device`)."""
    cfg = Config.from_dict(config)
    cfg.out = str(out)
    cfg.progress, cfg.resume = False, False
    if cfg.checkpoint_every % cfg.eval_every:
        cfg.checkpoint_every = cfg.eval_every
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


def _fs(uri: str):
    import pyarrow.fs
    if "://" not in uri:
        return pyarrow.fs.LocalFileSystem(), uri
    return pyarrow.fs.FileSystem.from_uri(uri)


def read_text(uri: str) -> str | None:
    """A small file on local or remote storage; None when it does not exist."""
    import pyarrow.fs
    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(uri: str, text: str) -> None:
    fs, path = _fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def delete_dir(uri: str) -> None:
    import pyarrow.fs
    fs, path = _fs(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(path)


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
    df = df.drop(columns=[c for c in df.columns if c in TUNE_COLUMNS or c.startswith("config/")])
    df = df.drop_duplicates("epoch", keep="last").sort_values("epoch")
    head = {"trial_id": trial_id_of(result), **{p: config.get(p) for p in params}}
    return [{**head, **row} for row in df.to_dict("records")]


def trial_id_of(result) -> str:
    return (result.metrics or {}).get("trial_id") or Path(result.path).name


def trial_row(result, status: str | None, metric: str = "val_error", params=()) -> dict:
    """One trial as a flat dict: params, status, error, the epoch with the best `metric` and
    the final errors (test, many/medium/few, validation), epochs run, wall time, where it ran."""
    config = result.config or {}
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
               path=result.path, config=json.dumps(config, sort_keys=True))
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


def best_trial(trials, metric: str = "val_error"):
    """The row with the lowest final `metric` among trials that ran all epochs (a trial ASHA
    stopped early is not comparable); among all scored trials if none completed; None if none.
    Ties go to the lower best-epoch `metric`, then to the earlier trial (the enqueued paper
    point, if any), so the answer does not depend on the order Ray lists trials in."""
    scored = trials[trials[f"final_{metric}"].notna()] if len(trials) else trials
    if not len(scored):
        return None
    done = scored[scored["completed"]]
    pool = done if len(done) else scored
    return pool.sort_values([f"final_{metric}", f"best_{metric}", "started_at"], kind="stable").iloc[0]


# --- progress and summary ------------------------------------------------------------------------
class RichProgress(tune.Callback):
    """A rich progress bar of finished trials and a line per finished trial, on the driver.

    Tune pickles its callbacks with the experiment, so the rich objects are made lazily and
    dropped from the pickle."""

    def __init__(self, total: int, metric: str = "val_error", params=()):
        self.total, self.metric, self.params = total, metric, tuple(params)
        self._bar = None

    def __getstate__(self):
        return {**self.__dict__, "_bar": None}

    def _progress(self):
        if self._bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self._bar = Progress(TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn())
            self._task = self._bar.add_task("trials", total=self.total, status="")
            self._bar.start()
        return self._bar

    def _describe(self, trial) -> str:
        params = " ".join(f"{p}={_fmt(trial.config.get(p))}" for p in self.params)
        return f"{trial.trial_id} {params}".strip()

    def on_step_end(self, iteration, trials, **info):
        finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        scores = [t.last_result.get(self.metric) for t in trials if t.last_result.get(self.metric) is not None]
        best = f"  best {self.metric} {min(scores):.2f}" if scores else ""
        self._progress().update(self._task, completed=finished, status=f"{running} running{best}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result
        self._progress().console.log(f"done   {self._describe(trial)}  {self.metric} {_fmt(r.get(self.metric))}  "
                                     f"test {_fmt(r.get('test_error'))}  epochs {r.get('epochs_done', 0)}")

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
