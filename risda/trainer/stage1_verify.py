"""A stage-I cache entry is verified before it is used (risda.stage1.Stage1Cache).

An entry is <root>/<key>/checkpoint.pt and <root>/<key>/stage1.json. stage1.json is written
last, atomically (risda.storage.write_text), and records the size and sha256 of checkpoint.pt
(`checkpoint_bytes`, `checkpoint_sha256`) and, under `sha256`, the sha256 of its own content
(every other field, as sorted JSON). So a missing, truncated or bit-flipped checkpoint, a cut or
edited stage1.json, or an entry filed under another key is an `EntryFault` naming the entry and
what is wrong with it, never a checkpoint that loads and trains on wrong weights.

An entry written before the digests (a legacy entry) has no `sha256`: the runner reads it in full
once (risda.checkpoint.load_stage1_checkpoint, and every weight finite), then seals it
(risda.runner.stage1_entries.adopt_legacy).
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from . import storage

CHECKPOINT, INFO = "checkpoint.pt", "stage1.json"
PARTIAL = ("partial.pt", "partial.json")  # a stage I in training: its last checkpoint, and that checkpoint's record
DIGEST = "sha256"  # stage1.json's own digest; the checkpoint's are checkpoint_sha256 and checkpoint_bytes


class EntryFault(Exception):
    """A cache entry that is there but cannot be trusted. The message names the entry and why."""


class LegacyEntry(Exception):
    """An entry written before the digests: its checkpoint is to be read in full, then sealed
    (risda.runner.stage1_entries.adopt_legacy)."""


def content_digest(info: dict) -> str:
    fields = {k: v for k, v in info.items() if k != DIGEST}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def seal(info: dict) -> str:
    """stage1.json's text: `info` with the digest of its content."""
    return json.dumps({**info, DIGEST: content_digest(info)}, indent=1)


def checkpoint_record(local: Path) -> dict:
    digest, size = storage.sha256(str(local))
    return {"checkpoint_sha256": digest, "checkpoint_bytes": size}


def read_info(entry: str, key: str, names=(CHECKPOINT, INFO)) -> dict | None:
    """The entry's stage1.json (or, with names=PARTIAL, partial.json), its own digest checked;
    None when neither it nor its checkpoint is there (nothing was stored). A legacy entry comes
    back without DIGEST."""
    checkpoint, record = names
    if not storage.exists(f"{entry}/{record}"):
        if storage.exists(f"{entry}/{checkpoint}"):
            raise EntryFault(f"stage-I cache entry {entry}: {checkpoint} without {record} (its store was cut short)")
        return None
    try:
        info = json.loads(storage.read_text(f"{entry}/{record}"))
    except ValueError as e:  # UnicodeDecodeError is a ValueError too
        raise EntryFault(f"stage-I cache entry {entry}: {record} is not readable JSON (truncated or corrupt: {e})") from None
    if not isinstance(info, dict):
        raise EntryFault(f"stage-I cache entry {entry}: {record} is not a JSON object")
    if DIGEST in info and info[DIGEST] != content_digest(info):
        raise EntryFault(f"stage-I cache entry {entry}: {record} does not match its own sha256 (edited or corrupt)")
    if info.get("key") != key:
        raise EntryFault(f"stage-I cache entry {entry}: {record} belongs to stage I {info.get('key')!r}, not {key} "
                         f"(a misplaced entry)")
    return info


def check_file(entry: str, info: dict, path: str, names=(CHECKPOINT, INFO), copy: bool = False) -> None:
    """The checkpoint at `path` (the entry's own, or a local copy of it) is the one its record
    (stage1.json, partial.json) names, by size and sha256."""
    checkpoint, record = names
    where = " (as copied here)" if copy else ""
    if not storage.exists(path):
        raise EntryFault(f"stage-I cache entry {entry}: {checkpoint} is missing{where}")
    digest, size = storage.sha256(path)
    if size != info["checkpoint_bytes"]:
        raise EntryFault(f"stage-I cache entry {entry}: {checkpoint} is {size} bytes{where}, {record} records "
                         f"{info['checkpoint_bytes']} (truncated or overwritten)")
    if digest != info["checkpoint_sha256"]:
        raise EntryFault(f"stage-I cache entry {entry}: {checkpoint}{where} does not match the sha256 {record} records "
                         f"(its bytes changed: corrupt)")


def set_aside_path(entry: str) -> str:
    """<entry>.bad-<UTC time>, a name not taken yet."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest, n = f"{entry}.bad-{stamp}", 1
    while storage.exists(dest):
        n += 1
        dest = f"{entry}.bad-{stamp}-{n}"
    return dest


def set_aside(entry: str) -> str:
    """Move the entry's files (not a stage I in training: partial.*) to <entry>.bad-<UTC time>;
    the new place. Nothing is deleted."""
    dest = set_aside_path(entry)
    for name in storage.files(entry):
        if name not in PARTIAL:
            storage.move(f"{entry}/{name}", f"{dest}/{name}")
    return dest


def set_partial_aside(entry: str) -> str:
    """Move a stage I's unusable resumable checkpoint (partial.pt, partial.json) aside; the new place."""
    dest = set_aside_path(entry)
    for name in storage.files(entry):
        if name in PARTIAL:
            storage.move(f"{entry}/{name}", f"{dest}/{name}")
    return dest
