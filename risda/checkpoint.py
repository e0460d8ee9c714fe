"""Checkpoints written atomically (temp file + rename) and read back with weights_only=True."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import Config

# Fields that may differ between an interrupted run and its resumption.
RESUMABLE_CHANGES = {"resume", "progress", "out", "device", "num_workers", "cache_dir", "data_root", "download"}


def save_checkpoint(path: Path, cfg: Config, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"config": cfg.to_dict(), **state}, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a torn checkpoint


def load_checkpoint(path: Path, cfg: Config) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved, now = state["config"], cfg.to_dict()
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"cannot resume from {path}: the config changed ({diffs}); use the original flags or a new --out")
    return state
