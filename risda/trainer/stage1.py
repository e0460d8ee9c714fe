"""Stage I, shared: one stage-I checkpoint per distinct stage-I configuration, forked by every
stage-II run that needs it.

In RISDA's protocol stage I (the first 80% of the epochs) is plain cross-entropy for every arm
but isda: it does not depend on the arm, α, β, the head classes, the covariance form or the
variant. `stage1_key(cfg)` hashes everything that does change what stage I computes, so a
search over α, β and an ablation over the arms train stage I once and fork stage II from it,
with exactly the weights and metrics of a run trained from scratch (tests/test_stage1.py).

The reference variant takes ε and the prototypes from extra passes after each stage-I epoch
(risda.trainer.risda_objective.ReferenceObservations). Those passes change nothing about the training, so the
shared stage I records them whenever any consumer is a reference run, and one stage I serves
both variants.

The cache, on local or shared storage (risda.trainer.storage): <root>/<key>/checkpoint.pt and
<root>/<key>/stage1.json, the JSON written last, so an entry exists once both are whole. The
JSON records the checkpoint's size and sha256 and its own sha256, and every entry is verified
before it is used (risda.trainer.stage1_verify).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from . import stage1_verify as verify
from . import storage
from .arms import ARM_FIELDS, ARMS
from .config import Config, RunConfig, require_resolved

STAGE1_FORMAT = 1  # bump when stage I's computation changes, so old entries are not reused
# Fields that act only in stage II (for the arms whose stage I is plain CE).
# The fields of one arm only (risda.trainer.arms: la_tau, LDAM's margin and scale) are stage-I fields
# of that arm's own stage I and count nowhere else.
STAGE2_FIELDS = frozenset({"arm", "variant", "alpha", "beta", "head_count", "head_min_count", "cb_gamma",
                           "covariance", "graph_topk", "graph_source", "graph_temperature"}) | ARM_FIELDS
# Where and how a run is kept and shown, not what it computes. `compile` is here with the thread
# counts (threads, stage1_threads): they change fp32 rounding, not the computation (risda.trainer.compile
# states the tolerance), so a compiled and an eager stage I, or one on 1 and one on 2 threads, are
# the same stage I. What a stage I ran with is recorded instead (stage1_torch_threads, stage1_compile).
BOOKKEEPING_FIELDS = frozenset({"preset", "out", "resume", "progress", "eval_every", "checkpoint_every", "device",
                                "num_workers", "cache_dir", "download", "compile", "threads", "stage1_threads"})
CHECKPOINT, INFO = verify.CHECKPOINT, verify.INFO


def shares_stage1(cfg: RunConfig) -> bool:
    """An arm whose stage I is plain CE or its own objective (risda.trainer.arms); isda trains its
    augmentation from epoch 0, and a run without stage I has nothing to share."""
    require_resolved(cfg, "shares_stage1")
    return ARMS[cfg.arm].stage1 is not None and cfg.stage1_epochs > 0


def stage1_fields(cfg: RunConfig) -> dict:
    """Every resolved field that changes what stage I computes, where it differs from Config's
    default. Everything not listed as stage-II or bookkeeping counts, so a new Config field is a
    stage-I field until said otherwise; a field at its default is left out, so adding a field
    (whose default keeps today's behaviour) keeps every existing key and cache entry valid. The
    map is still one-to-one: two configs that differ in a stage-I field differ in this dict."""
    require_resolved(cfg, "stage1_key")
    c = cfg  # resolved: variant-dependent defaults (subset seed, padding, warm-up) filled in
    defaults, values = Config().to_dict(), c.to_dict()
    fields = {k: v for k, v in values.items() if k not in STAGE2_FIELDS | BOOKKEEPING_FIELDS and v != defaults[k]}
    arm = ARMS[c.arm]
    if arm.stage1 == "own":  # LDAM, the LA loss: its own objective from epoch 0, and what that reads
        fields.update(stage1_objective=arm.stage1_name, **{k: values[k] for k in arm.stage1_fields})
    return fields


def stage1_key(cfg: RunConfig) -> str:
    text = json.dumps({"format": STAGE1_FORMAT, **stage1_fields(cfg)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage1_training_config(cfg: RunConfig) -> RunConfig:
    """The config a shared stage I trains with: cfg resolved, its stage-II fields at their
    defaults and the arm plain CE (or, for an arm with its own stage I, the arm and the fields
    that stage I reads), so the cached entry belongs to no one consumer."""
    defaults = Config()
    arm = ARMS[cfg.arm]
    keep = {"arm": cfg.arm, **{k: getattr(cfg, k) for k in arm.stage1_fields}} if arm.stage1 == "own" else {"arm": "ce"}
    return dataclasses.replace(cfg, **{**{name: getattr(defaults, name) for name in STAGE2_FIELDS}, **keep})


def needs_observations(cfg: RunConfig) -> bool:
    """A reference-variant run of a RISDA arm reads ε and prototypes from its stage I."""
    return cfg.variant == "reference" and ARMS[cfg.arm].has_reference


class Stage1Cache:
    """<root>/<key>/ per stage I, on a local path or any pyarrow URI; every entry is verified
    before it is used (risda.trainer.stage1_verify: a bad one is an EntryFault naming it)."""

    def __init__(self, root: str):
        self.root = root.rstrip("/") if "://" in root else str(Path(root).expanduser().resolve())

    def entry(self, key: str) -> str:
        return f"{self.root}/{key}"

    def verify(self, cfg: Config) -> dict | None:
        """The entry's stage1.json if cfg's stage I is cached and whole (its checkpoint read in
        full and matched to the recorded sha256), None if nothing is cached. EntryFault if the
        entry is there but missing a part, truncated, unreadable or changed; LegacyEntry if it
        was written before the digests (the runner checks it in full, then `seal`s it)."""
        key = stage1_key(cfg)
        info = verify.read_info(self.entry(key), key)
        if info is None:
            return None
        if verify.DIGEST not in info:
            raise verify.LegacyEntry(self.entry(key))
        verify.check_file(self.entry(key), info, f"{self.entry(key)}/{CHECKPOINT}")
        return info

    def seal(self, cfg: Config, info: dict, checkpoint: Path) -> dict:
        """Record a legacy entry's digests (`checkpoint`: a local copy of its checkpoint, checked in full)."""
        info = {**info, **verify.checkpoint_record(checkpoint)}
        storage.write_text(f"{self.entry(stage1_key(cfg))}/{INFO}", verify.seal(info))
        return info

    def lookup(self, cfg: Config, observations: bool = False) -> dict | None:
        """verify(cfg), None also when it lacks the reference observations a consumer needs
        (the runner's risda.runner.stage1_entries also adopts a legacy entry)."""
        info = self.verify(cfg)
        if info is not None and observations and not info.get("observations"):
            return None  # trained without the reference observations: retrain (same weights) with them
        return info

    def store(self, cfg: Config, checkpoint: Path, info: dict) -> dict:
        key = stage1_key(cfg)
        info = {"key": key, "format": STAGE1_FORMAT, "fields": stage1_fields(cfg), **info,
                **verify.checkpoint_record(checkpoint)}
        storage.upload(checkpoint, f"{self.entry(key)}/{CHECKPOINT}")
        storage.write_text(f"{self.entry(key)}/{INFO}", verify.seal(info))  # last: the commit
        return info

    def set_aside(self, cfg: Config) -> str:
        """Move an unusable entry aside (never deleted): where it went."""
        return verify.set_aside(self.entry(stage1_key(cfg)))

    def fetch(self, cfg: Config, dest: Path) -> Path:
        """The cached stage-I checkpoint, copied to a local file and checked against its
        recorded sha256 (EntryFault naming the entry, not the copy)."""
        key = stage1_key(cfg)
        info = verify.read_info(self.entry(key), key)
        if info is None:
            raise verify.EntryFault(f"stage-I cache entry {self.entry(key)} is not there")
        if verify.DIGEST not in info:
            raise verify.EntryFault(f"stage-I cache entry {self.entry(key)} was written before the cache recorded digests "
                                    f"and is not sealed yet")
        local = storage.download(f"{self.entry(key)}/{CHECKPOINT}", Path(dest))
        verify.check_file(self.entry(key), info, str(local), copy=True)
        return local

    # --- a stage I in training: its resumable checkpoint --------------------------------------
    def partial(self, cfg: Config) -> str:
        """Where a stage I in training keeps its resumable checkpoint."""
        return f"{self.entry(stage1_key(cfg))}/{verify.PARTIAL[0]}"

    def store_partial(self, cfg: Config, checkpoint: Path) -> None:
        key = stage1_key(cfg)
        storage.upload(checkpoint, f"{self.entry(key)}/{verify.PARTIAL[0]}")
        storage.write_text(f"{self.entry(key)}/{verify.PARTIAL[1]}",
                           verify.seal({"key": key, **verify.checkpoint_record(checkpoint)}))

    def fetch_partial(self, cfg: Config, dest: Path) -> tuple[Path | None, str | None]:
        """(the resumable checkpoint copied to `dest`, None) if there is a whole one; (None, what
        was wrong with it and where it was moved) if it was unusable; (None, None) if there is none."""
        key, entry = stage1_key(cfg), self.entry(stage1_key(cfg))
        try:
            info = verify.read_info(entry, key, verify.PARTIAL)
            if info is None:
                return None, None
            if verify.DIGEST not in info:
                raise verify.EntryFault(f"stage-I cache entry {entry}: {verify.PARTIAL[1]} has no sha256")
            local = storage.download(f"{entry}/{verify.PARTIAL[0]}", Path(dest))
            verify.check_file(entry, info, str(local), verify.PARTIAL, copy=True)
            return local, None
        except verify.EntryFault as e:
            Path(dest).unlink(missing_ok=True)
            return None, f"{e}; moved aside to {verify.set_partial_aside(entry)}, stage I starts over"

    def delete_partial(self, cfg: Config) -> None:
        for name in verify.PARTIAL:
            storage.delete_file(f"{self.entry(stage1_key(cfg))}/{name}")
