"""The trainer as Ray Tune function trainables: `train_trial` (one `risda.train` run, or its
stage II forked from a shared stage I) and `train_stage1_trial` (one shared stage I), with
what a trial needs around them: its scratch folder, seeds and threads, its device, the
checkpoint Tune restores it with.

The trainable takes a plain dict of risda.trainer.config.Config fields (param_space constants
merged with what a searcher suggests), so a trial is exactly one `risda.train` run.
Only `ray.tune` is used inside a trial (`ray.train.report` is an error in Tune trials).
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import random
import shutil
import socket
import tempfile
from pathlib import Path

import ray
from ray import tune

from ..trainer.config import Config, RunConfig
from ..trainer.failures import RunFailure
from ..trainer.stage1 import Stage1Cache, shares_stage1, stage1_key
from ..trainer.stage1_verify import EntryFault
from ..trainer.loop import device_name, pick_device, train
from .lock import hold_key
from .retry import reporting_divergence
from .stage1_entries import verified_or_set_aside

CHECKPOINT_FILE = "checkpoint.pt"  # the trainer's file; Tune checkpoints hold just this one
SCRATCH_PREFIX = "risda-trial-"  # a trial's scratch folder: <temp dir>/risda-trial-<trial_id>-<random>
STAGE1_CACHE_KEY = "stage1_cache"  # in a trial's config: the stage-I cache to fork from (not a Config field)
JSON_SUMMARY = ("graph_neighbours", "graph", "derived", "tuned_val_errors")  # summary entries reported as JSON text


# --- the trainables ------------------------------------------------------------------------
def train_trial(config: dict) -> None:
    """Ray Tune function trainable: one trainer run of `Config.from_dict(config)`.

    Reports every epoch with `tune.report` (train_loss, train_error, images_per_s, stage;
    the evaluation fields val_error, test_error, test_many/medium/few_error every eval_every
    epochs and at the last), plus epochs_done, stage2_epochs_done (ASHA's time axis) and the
    trial facts (risda.runner.collate.TRIAL_FACTS); the last report also carries the trainer's
    summary (`summary_*`). It attaches the trainer's checkpoint.pt as a Tune checkpoint on every
    checkpointed epoch and resumes from
    `tune.get_checkpoint()` when Tune restores the trial. With config["stage1_cache"] (a cache
    root, see risda.trainer.stage1) a fresh trial forks stage II from the cached stage I instead of
    training it. Wrap it with `tune.with_resources(train_trial, trial_resources(...))`."""
    config = dict(config)
    cache_root = config.pop(STAGE1_CACHE_KEY, None)
    with trial_scratch() as out:
        cfg = trial_config(config, out)
        facts = trial_facts(cfg)
        resume_from = restore_trial_checkpoint(out)
        stage1_from = stage1_name = None
        if resume_from is None and cache_root and shares_stage1(cfg):
            stage1_from, stage1_name = fetch_stage1(Stage1Cache(cache_root), cfg, out / "stage1.pt")
        if cache_root and shares_stage1(cfg):
            facts["stage1_key"] = stage1_key(cfg)
        final = {}
        stage1_epochs = cfg.stage1_epochs

        def on_epoch(record: dict, checkpoint: Path | None) -> None:
            metrics = {**record, "epochs_done": record["epoch"] + 1,
                       "stage2_epochs_done": max(0, record["epoch"] + 1 - stage1_epochs), **facts}
            if record["epoch"] + 1 == cfg.epochs:  # reported below, with the summary
                final.update(metrics=metrics, checkpoint=checkpoint)
                return
            report(metrics, checkpoint)

        with reporting_divergence(facts):  # a diverged trial is not retried (risda.runner.retry)
            summary = train(cfg, on_epoch=on_epoch, resume_from=resume_from, stage1_from=stage1_from,
                            stage1_name=stage1_name, data=trial_data(cfg))
        # scalars as they are; the graph diagnostics' neighbour lists and a derived arm's summary as JSON
        scalars = {f"summary_{k}": json.dumps(v) if isinstance(v, (dict, list)) and k in JSON_SUMMARY else v
                   for k, v in summary.items() if isinstance(v, (int, float, str)) or v is None or k in JSON_SUMMARY}
        last = final or {"metrics": {"epochs_done": cfg.epochs, **facts}, "checkpoint": None}  # restored at its end
        report({**last["metrics"], **scalars}, last["checkpoint"])


def train_stage1_trial(config: dict) -> None:
    """Ray Tune function trainable: the shared stage I of one stage-I key (risda.trainer.stage1).

    config: {"job": {"config": <Config dict>, "observations": bool, "stage1_cache": root}}.
    Reports every epoch; keeps its resumable checkpoint in the cache (<key>/partial.pt, with its
    sha256 in partial.json), so a rerun, a retry or another experiment over the same stage I
    continues it (an unusable one is moved aside and stage I starts over); stores the finished
    stage I in the cache and reports its key. An unusable entry found here is moved aside too. It holds the key's lock meanwhile
    (<cache>/<key>.lock, risda.runner.lock): a second trainer of the same key waits for it."""
    job = config["job"]
    cfg_dict, observations, cache = job["config"], bool(job["observations"]), Stage1Cache(job[STAGE1_CACHE_KEY])
    with trial_scratch() as out:
        cfg = trial_config(cfg_dict, out)
        key = stage1_key(cfg)
        facts = {**trial_facts(cfg), "stage1_key": key}
        # One trainer per key: another experiment training the same stage I now is waited for, and
        # its entry is then found below (or, if it died, its partial checkpoint continued).
        with hold_key(f"{cache.entry(key)}.lock"):
            info, note = verified_or_set_aside(cache, cfg, observations)
            if info is not None:
                tune.report({"epochs_done": cfg.stage1_epochs, "cached": True, **facts})
                return
            resume_from, partial_note = cache.fetch_partial(cfg, out / "checkpoint.pt")

            def on_epoch(record: dict, checkpoint: Path | None) -> None:
                if checkpoint is not None:
                    cache.store_partial(cfg, checkpoint)
                tune.report({**record, "epochs_done": record["epoch"] + 1, "cached": False, **facts})

            with reporting_divergence(facts):  # a diverged stage I is not retried (risda.runner.retry)
                done = train(cfg, on_epoch=on_epoch, resume_from=resume_from, stage1_only=True,
                             observe_reference=observations, data=trial_data(cfg))
            # How it ran (threads, compile) is also in the checkpoint, whence every fork's summary has it.
            notes = [n for n in (note, partial_note) if n]
            cache.store(cfg, Path(done["checkpoint"]), {"observations": observations, "wall_time_s": done["wall_time_s"],
                                                        "precision": done["precision"], "device": facts["device"],
                                                        "torch_threads": done.get("stage1_torch_threads"),
                                                        "compile": done.get("stage1_compile"),
                                                        "epochs": cfg.stage1_epochs, "train_size": done["train_size"],
                                                        "trial_id": tune.get_context().get_trial_id(),
                                                        **({"notes": notes} if notes else {})})
            cache.delete_partial(cfg)


def fetch_stage1(cache: Stage1Cache, cfg: RunConfig, dest: Path) -> tuple[Path, str]:
    """(a verified local copy of cfg's cached stage I, the entry's file it was copied from):
    a bad entry is one line naming the entry, never the copy."""
    try:
        return cache.fetch(cfg, dest), f"{cache.entry(stage1_key(cfg))}/{CHECKPOINT_FILE}"
    except EntryFault as e:
        raise RunFailure(f"{e}; rerun the same command: the driver verifies every entry before the trials, moves a "
                         f"bad one aside and trains it again") from None


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
    out = Path(tempfile.mkdtemp(prefix=scratch_prefix(tune.get_context().get_trial_id())))
    try:
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


def scratch_prefix(trial_id: str) -> str:
    return f"{SCRATCH_PREFIX}{trial_id}-"


def remove_scratch(trial_ids) -> list[Path]:
    """Remove this machine's scratch folders of these trials; the folders removed. A trial
    removes its own when it ends, unless its worker was killed (SIGKILL, out of memory) and
    never reached the `finally`. Call it once the trials are stopped."""
    root = Path(tempfile.gettempdir())
    removed = []
    for trial_id in trial_ids:
        for folder in root.glob(glob.escape(scratch_prefix(trial_id)) + "*"):
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


_DATA_CACHE: dict[str, object] = {}  # per worker process; Tune reuses the actors (reuse_actors=True)


def trial_data(cfg: RunConfig):
    """The trial's splits, loaded once per worker process and data config: with reused actors
    the next trial on the same data skips the load (about 1 s of a ~9 s per-trial overhead)."""
    from ..trainer.data import load_long_tail
    c = cfg
    key = json.dumps([c.dataset, c.data_root, c.imbalance, c.n_max, c.val_per_class, c.test_per_class, c.subset_seed,
                      c.image_size, c.pad_mode, c.cache_dir, c.num_workers, c.device])
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # one data set at a time: a worker may serve several experiments
        _DATA_CACHE[key] = load_long_tail(c, pick_device(c.device))
    return _DATA_CACHE[key]


def trial_facts(cfg: RunConfig) -> dict:
    """Seeds and the machine, on every report; also seeds the trial's global RNGs and threads."""
    seed_everything(cfg.seed)
    set_torch_threads()
    return dict(device=device_name(pick_device(cfg.device)), ray_gpu_ids=",".join(map(str, ray.get_gpu_ids())),
                node_id=ray.get_runtime_context().get_node_id(), hostname=socket.gethostname(),
                seed=cfg.seed, subset_seed=cfg.subset_seed)


def trial_config(config: dict, out: Path) -> RunConfig:
    """The config a trial runs, resolved once here (the trainable's entry): the given fields, with
    the run-local ones set for Tune.

    out is the trial's scratch directory; progress bars are off; the device is the one Ray
    assigned (see `trial_device`); the threads are the CPUs Ray reserved (`set_torch_threads`;
    the summary records them)."""
    cfg = Config.from_dict(config)
    cfg.out = str(out)
    cfg.progress, cfg.resume = False, False
    cfg.threads, cfg.stage1_threads = None, None
    cfg.device = trial_device(cfg.device)
    return cfg.validate().resolved()


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
