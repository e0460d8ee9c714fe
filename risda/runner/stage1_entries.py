"""What the runner does with a stage-I cache entry before using it (risda.trainer.stage1_verify checks it):

- `inspect_entry` (the driver, before Ray starts): verified, missing, or unusable; an unusable
  one is moved aside under the key's lock (never deleted) and trained again, and one line says
  what was wrong and where it went. A legacy entry is checked in full and sealed (`adopt_legacy`).
- `verified_or_set_aside` (a stage-I trial, holding the key's lock): the same, as the entry is
  when the trial gets to it.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..trainer import storage
from ..trainer.config import Config, ConfigError
from ..trainer.stage1 import CHECKPOINT, Stage1Cache, stage1_key
from ..trainer.stage1_verify import EntryFault, LegacyEntry
from .lock import lock_for


def lookup(cache: Stage1Cache, cfg: Config) -> dict | None:
    """cache.verify(cfg), a legacy entry adopted."""
    try:
        return cache.verify(cfg)
    except LegacyEntry:
        return adopt_legacy(cache, cfg)


def adopt_legacy(cache: Stage1Cache, cfg: Config) -> dict:
    """An entry written before the digests, read in full (a readable stage-I checkpoint of cfg's
    stage I, every weight finite: all that can be checked without a digest), then sealed with
    its digests; EntryFault when it fails."""
    import torch

    from ..trainer.checkpoint import load_stage1_checkpoint
    from ..trainer.stage1_verify import read_info
    key = stage1_key(cfg)
    entry = cache.entry(key)
    info = read_info(entry, key)
    with tempfile.TemporaryDirectory() as d:
        if not storage.exists(f"{entry}/{CHECKPOINT}"):
            raise EntryFault(f"stage-I cache entry {entry}: {CHECKPOINT} is missing")
        local = storage.download(f"{entry}/{CHECKPOINT}", Path(d) / CHECKPOINT)
        try:
            state = load_stage1_checkpoint(local, cfg, name=f"{entry}/{CHECKPOINT}")
        except ConfigError as e:
            raise EntryFault(f"stage-I cache entry {entry} (written before digests): {e}") from None
        bad = [k for k, v in state["model"].items() if torch.is_floating_point(v) and not torch.isfinite(v).all()]
        if bad:
            raise EntryFault(f"stage-I cache entry {entry} (written before digests): {CHECKPOINT} has non-finite "
                             f"weights ({', '.join(bad[:3])})")
        return cache.seal(cfg, info, local)


def inspect_entry(cache: Stage1Cache, cfg: Config, observations: bool) -> tuple[str, dict | None, str | None]:
    """(state, info, note) of cfg's entry: `verified`, `missing`, `retrain` (an unusable entry, moved
    aside under the key's lock; `note` says what was wrong and where it went) or `replace` (it lacks
    the reference observations). An entry that a trainer is writing right now (it holds the key's
    lock) counts as missing: the stage-I trial waits for that trainer."""
    entry = cache.entry(stage1_key(cfg))
    try:
        info = lookup(cache, cfg)
    except EntryFault:
        lock = lock_for(f"{entry}.lock")
        if lock.acquire() is not None:
            return "missing", None, None
        try:
            info = lookup(cache, cfg)  # as it is now that no one writes it
        except EntryFault as e:
            return "retrain", None, f"{e}: moved aside to {cache.set_aside(cfg)}; training it again"
        finally:
            lock.release()
    if info is None:
        return "missing", None, None
    if observations and not info.get("observations"):
        return "replace", None, (f"stage-I cache entry {entry} lacks the reference variant's observations: training it "
                                 f"again with them (the same weights) and replacing it")
    return "verified", info, None


def verified_or_set_aside(cache: Stage1Cache, cfg: Config, observations: bool) -> tuple[dict | None, str | None]:
    """(the entry's info if cfg's stage I is cached whole, with the observations if needed; else
    None, and what was wrong with an entry that is there: it was moved aside). Call it holding
    the key's lock: no one writes the entry meanwhile."""
    try:
        info = lookup(cache, cfg)
    except EntryFault as e:
        return None, f"{e}; moved aside to {cache.set_aside(cfg)}"
    if info is not None and observations and not info.get("observations"):
        return None, None  # trained without the reference observations: retrained (same weights) with them
    return info, None
