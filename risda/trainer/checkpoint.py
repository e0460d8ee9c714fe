"""Checkpoints written atomically (temp file + rename) and read back with weights_only=True."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import Config, ConfigError, RunConfig, _flag, require_resolved
from .failures import writing

# Fields that may differ between an interrupted run and its resumption.
RESUMABLE_CHANGES = {"resume", "progress", "out", "device", "num_workers", "cache_dir", "data_root", "download",
                     "threads", "stage1_threads"}
CHECKPOINT_KEYS = {"config", "model", "optimizer", "objective", "epoch", "history", "elapsed"}


def save_checkpoint(path: Path, cfg: Config, **state) -> None:
    tmp = path.with_suffix(".tmp")
    # A full or broken disk: StorageFault naming what is intact, and no .tmp left (risda.trainer.failures).
    with writing(path, intact_checkpoint(path), tmp):
        torch.save({"config": cfg.to_dict(), **state}, tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a torn checkpoint


def intact_checkpoint(path: Path) -> str:
    """What survives a failed write of `path`: the checkpoint there now (its epoch), if any."""
    if not Path(path).is_file():
        return "no earlier checkpoint was written: free space and rerun the same command"
    try:
        epoch = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"] + 1
    except Exception:  # unreadable: say so rather than promise it
        return f"the earlier file {path} could not be read back: free space and rerun the same command"
    return (f"the checkpoint of epoch {epoch} ({path}) is intact: free space and rerun the same command "
            f"(risda.train: with --resume)")


def read_checkpoint(path: Path, mmap: bool = False, flag: str = "--resume", name: str | None = None,
                    fix: str = "delete it to start the run over, or drop --resume and pass a new --out") -> dict:
    """torch.load of a run's checkpoint; ConfigError naming the file (as `name`, if given: what a
    user knows it as, not a temporary copy), the flag that reads it and the fix, when it is
    missing, truncated, corrupt or not a risda checkpoint. mmap=True reads only its index and
    the small entries (a cheap check before the data is loaded)."""
    shown = name or path
    if not Path(path).is_file():
        raise ConfigError(f"{flag}: no checkpoint at {shown}; drop {flag} to start a new run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, UnpicklingError, ... here
        why = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]  # torch's first sentence
        raise ConfigError(f"{flag}: {shown} is not a readable checkpoint (truncated or corrupt: "
                          f"{type(e).__name__}{': ' + why if why else ''}); {fix}") from e
    missing = CHECKPOINT_KEYS - set(state) if isinstance(state, dict) else CHECKPOINT_KEYS
    if missing or not isinstance(state["config"], dict):
        raise ConfigError(f"{flag}: {shown} is not a checkpoint of risda.train (it lacks {', '.join(sorted(missing)) or 'a config'}); {fix}")
    return state


def check_checkpoint(path: Path, cfg: Config) -> dict:
    """What load_checkpoint checks, without reading the tensors (mmap): for the CLI before the data."""
    return load_checkpoint(path, cfg, mmap=True)


def load_checkpoint(path: Path, cfg: RunConfig, mmap: bool = False) -> dict:
    require_resolved(cfg, "load_checkpoint")
    state = read_checkpoint(path, mmap)
    saved, now = state["config"], cfg.to_dict()
    # a field newer than the checkpoint ran at its default; compare both sides resolved, as written
    saved = RunConfig.from_dict({k: v for k, v in saved.items() if k in now}).to_dict()
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        diffs = ", ".join(f"{_flag(k)}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(f"cannot resume from {path}: the config changed ({diffs}); use the original flags, "
                          "or a new --out for a new run")
    return state


def load_stage1_checkpoint(path: Path, cfg: RunConfig, name: str | None = None) -> dict:
    """A shared stage-I checkpoint (risda.trainer.stage1) for cfg: its stage-I fields must be cfg's.
    `name`: what to call it in a message (a cache entry's file, where `path` is a copy of it)."""
    from .stage1 import stage1_fields
    state = read_checkpoint(path, flag="--stage1-from", name=name, fix="train it again (--stage1-only)")
    path = name or path
    saved, now = stage1_fields(RunConfig.from_dict(state["config"])), stage1_fields(cfg)
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        diffs = ", ".join(f"{_flag(k)}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(f"the stage-I checkpoint {path} was trained for another stage I ({diffs}); "
                          f"the runner keys its cache by these fields, so this is a stale or misplaced file")
    if state["epoch"] + 1 != cfg.stage1_epochs:
        raise ConfigError(f"{path} ends at epoch {state['epoch'] + 1}, not at the end of stage I "
                          f"({cfg.stage1_epochs}): it is not a stage-I checkpoint")
    return state
