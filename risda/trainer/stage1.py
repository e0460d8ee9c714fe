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
<root>/<key>/stage1.json, the JSON written last, so an entry exists once both are whole.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

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
CHECKPOINT, INFO = "checkpoint.pt", "stage1.json"


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
    def __init__(self, root: str):
        self.root = root.rstrip("/") if "://" in root else str(Path(root).expanduser().resolve())

    def entry(self, key: str) -> str:
        return f"{self.root}/{key}"

    def lookup(self, cfg: Config, observations: bool = False) -> dict | None:
        """The entry's stage1.json if a usable stage I is cached for cfg, else None."""
        text = storage.read_text(f"{self.entry(stage1_key(cfg))}/{INFO}")
        if text is None:
            return None
        info = json.loads(text)
        if observations and not info.get("observations"):
            return None  # trained without the reference observations: retrain (same weights) with them
        return info

    def store(self, cfg: Config, checkpoint: Path, info: dict) -> dict:
        key = stage1_key(cfg)
        info = {"key": key, "format": STAGE1_FORMAT, "fields": stage1_fields(cfg), **info}
        storage.upload(checkpoint, f"{self.entry(key)}/{CHECKPOINT}")
        storage.write_text(f"{self.entry(key)}/{INFO}", json.dumps(info, indent=1))  # last: the commit
        return info

    def partial(self, cfg: Config) -> str:
        """Where a stage I in training keeps its resumable checkpoint."""
        return f"{self.entry(stage1_key(cfg))}/partial.pt"

    def fetch(self, cfg: Config, dest: Path) -> Path:
        """The cached stage-I checkpoint, copied to a local file."""
        return storage.download(f"{self.entry(stage1_key(cfg))}/{CHECKPOINT}", Path(dest))
