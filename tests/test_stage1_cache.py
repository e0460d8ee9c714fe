"""Issue 25, item 1: the stage-I cache serves nothing it has not verified. Each fault is injected
into a real entry (truncated, bytes overwritten, a weight flipped to 1e31, a part removed, a cut or
edited stage1.json, an entry under another key, a legacy entry) on a local path, a file:// URI and
an in-memory object store; the driver's check names the entry's real path in one line, moves it
aside (nothing deleted) and has it trained again. Nothing here starts Ray or trains."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs
import pytest
import torch

from risda.trainer import storage
from risda.trainer.checkpoint import save_checkpoint
from risda.trainer.config import Config
from risda.trainer.failures import RunFailure
from risda.runner.lock import FileLock
from risda.runner.stage1_entries import inspect_entry, verified_or_set_aside
from risda.runner.trainables import fetch_stage1
from risda.trainer.stage1 import Stage1Cache, stage1_key
from risda.trainer.stage1_verify import EntryFault

MARK = 0.123456789  # the value every weight starts at, so that a test can find a tensor's bytes in the file


def stage1_config(**kw):
    return Config(dataset="cifar10lt", epochs=4, stage1_epochs=2, **kw).resolved()


def stage1_checkpoint(path: Path, cfg: Config, n: int = 300_000) -> Path:
    """A stage-I checkpoint of cfg's stage I (1.2 MB of weights), as the trainer writes it."""
    save_checkpoint(path, cfg.resolved(), epoch=cfg.resolved().stage1_epochs - 1, elapsed=1.0, history=[],
                    model={"w": torch.full((n,), MARK)}, optimizer={}, objective={})
    return path


@pytest.fixture(params=["path", "file-uri", "object-store"])
def cache(request, tmp_path, monkeypatch):
    """A stage-I cache holding one verified entry for stage1_config()."""
    if request.param == "path":
        root = str(tmp_path / "cache")
    elif request.param == "file-uri":
        root = f"file://{tmp_path}/cache"
    else:  # an object store: no real folders, moves are copies (pyarrow over fsspec's in-memory store)
        import fsspec
        memory = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fsspec.filesystem("memory")))
        fsspec.filesystem("memory").store.clear()
        real = storage.filesystem
        monkeypatch.setattr(storage, "filesystem", lambda uri: (memory, uri[len("memory://"):]) if uri.startswith(
            "memory://") else real(uri))
        root = "memory://bucket/cache"
    c = Stage1Cache(root)
    cfg = stage1_config()
    c.store(cfg.resolved(), stage1_checkpoint(tmp_path / "trained.pt", cfg), {"observations": False, "wall_time_s": 1.0})
    return c


def entry_file(cache: Stage1Cache, name: str) -> str:
    return f"{cache.entry(stage1_key(stage1_config().resolved()))}/{name}"


def read_bytes(uri: str) -> bytes:
    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = storage.filesystem(uri)
    with fs.open_output_stream(path) as f:
        f.write(data)


def truncate(cache):
    data = read_bytes(entry_file(cache, "checkpoint.pt"))
    write_bytes(entry_file(cache, "checkpoint.pt"), data[: len(data) // 2])


def random_bytes(cache):  # 200 KB of noise written into the checkpoint, its size unchanged
    data = bytearray(read_bytes(entry_file(cache, "checkpoint.pt")))
    data[100_000:300_000] = np.random.default_rng(0).bytes(200_000)
    write_bytes(entry_file(cache, "checkpoint.pt"), bytes(data))


def flip_weights(cache):  # 64 bytes of one weight tensor become 1e31: the file still loads
    data = bytearray(read_bytes(entry_file(cache, "checkpoint.pt")))
    at = data.find(np.full(16, MARK, np.float32).tobytes())
    data[at:at + 64] = np.full(16, 1e31, np.float32).tobytes()
    write_bytes(entry_file(cache, "checkpoint.pt"), bytes(data))


def remove_checkpoint(cache):
    storage.delete_file(entry_file(cache, "checkpoint.pt"))


def remove_info(cache):
    storage.delete_file(entry_file(cache, "stage1.json"))


def truncate_info(cache):
    text = read_bytes(entry_file(cache, "stage1.json"))
    write_bytes(entry_file(cache, "stage1.json"), text[: len(text) // 2])


def edit_info(cache):  # valid JSON, one recorded fact changed
    info = json.loads(read_bytes(entry_file(cache, "stage1.json")))
    info["wall_time_s"] = 0.5
    write_bytes(entry_file(cache, "stage1.json"), json.dumps(info).encode())


def misplace(cache):  # another stage I's entry filed under this key
    other = stage1_config(lr=0.05)
    for name in ("checkpoint.pt", "stage1.json"):
        storage.delete_file(entry_file(cache, name))
    with tempfile.TemporaryDirectory() as d:
        cache.store(other.resolved(), stage1_checkpoint(Path(d) / "other.pt", other), {"observations": False})
    for name in ("checkpoint.pt", "stage1.json"):
        storage.move(f"{cache.entry(stage1_key(other.resolved()))}/{name}", entry_file(cache, name))


FAULTS = {truncate: "checkpoint.pt is", random_bytes: "does not match the sha256", flip_weights: "does not match the sha256",
          remove_checkpoint: "checkpoint.pt is missing", remove_info: "checkpoint.pt without stage1.json",
          truncate_info: "stage1.json is not readable JSON", edit_info: "stage1.json does not match its own sha256",
          misplace: "belongs to stage I"}


def test_a_whole_entry_is_verified(cache):
    info = inspect_entry(cache, stage1_config(), False)[1]
    assert info["checkpoint_bytes"] > 1_000_000 and len(info["checkpoint_sha256"]) == 64 and len(info["sha256"]) == 64
    assert inspect_entry(cache, stage1_config(), False) == ("verified", info, None)


@pytest.mark.parametrize("fault", FAULTS, ids=[f.__name__ for f in FAULTS])
def test_an_unusable_entry_is_named_moved_aside_and_trained_again(cache, fault):
    cfg = stage1_config()
    entry = cache.entry(stage1_key(cfg.resolved()))
    before = sorted(storage.files(entry))
    fault(cache)
    damaged = {n: read_bytes(f"{entry}/{n}") for n in storage.files(entry)}
    state, info, note = inspect_entry(cache, cfg, False)
    assert state == "retrain" and info is None
    assert "\n" not in note and note.startswith(f"stage-I cache entry {entry}: ") and FAULTS[fault] in note, note
    aside = note.split("moved aside to ")[1].split(";")[0]
    assert aside.startswith(f"{entry}.bad-") and note.endswith("training it again")
    assert {n: read_bytes(f"{aside}/{n}") for n in storage.files(aside)} == damaged  # moved, byte for byte, not deleted
    assert storage.files(entry) == [] and inspect_entry(cache, cfg, False)[0] == "missing"  # retrained as a new entry
    assert before == ["checkpoint.pt", "stage1.json"]


def test_the_flipped_weights_load_so_only_the_digest_catches_them(tmp_path):
    cfg = stage1_config()
    cache = Stage1Cache(str(tmp_path / "cache"))
    cache.store(cfg.resolved(), stage1_checkpoint(tmp_path / "trained.pt", cfg), {"observations": False})
    flip_weights(cache)
    state = torch.load(entry_file(cache, "checkpoint.pt"), weights_only=True)  # loads without complaint
    assert state["model"]["w"].max() > 1e30
    with pytest.raises(EntryFault, match="checkpoint.pt does not match the sha256 stage1.json records"):
        cache.verify(cfg)


def test_a_legacy_entry_is_checked_in_full_then_sealed(tmp_path):
    """An entry written before the digests (checkpoint.pt, then stage1.json without them): adopted
    when it loads as this stage I with finite weights; moved aside when it does not."""
    cfg = stage1_config()
    cache = Stage1Cache(str(tmp_path / "cache"))
    entry = Path(cache.entry(stage1_key(cfg.resolved())))
    entry.mkdir(parents=True)
    stage1_checkpoint(entry / "checkpoint.pt", cfg)
    (entry / "stage1.json").write_text(json.dumps({"key": stage1_key(cfg.resolved()), "format": 1, "observations": False}))
    state, info, note = inspect_entry(cache, cfg, False)
    assert state == "verified" and note is None and info["checkpoint_bytes"] == (entry / "checkpoint.pt").stat().st_size
    assert "sha256" in json.loads((entry / "stage1.json").read_text())  # sealed: from now on verified by digest
    assert cache.verify(cfg)["checkpoint_sha256"] == info["checkpoint_sha256"]

    (entry / "stage1.json").write_text(json.dumps({"key": stage1_key(cfg.resolved()), "format": 1}))  # legacy again, and cut short
    (entry / "checkpoint.pt").write_bytes((entry / "checkpoint.pt").read_bytes()[:5000])
    state, _, note = inspect_entry(cache, cfg, False)
    assert state == "retrain" and "(written before digests): --stage1-from" in note and "not a readable checkpoint" in note
    assert f"{entry}/checkpoint.pt" in note and not (entry / "checkpoint.pt").exists()


def test_a_trial_names_the_entry_never_its_copy(tmp_path, monkeypatch):
    """The copy a trial makes is checked too (a transfer cut short): the message names the cache
    entry, and neither the temporary copy nor --resume."""
    cfg = stage1_config()
    cache = Stage1Cache(str(tmp_path / "cache"))
    cache.store(cfg.resolved(), stage1_checkpoint(tmp_path / "trained.pt", cfg), {"observations": False})
    copy, name = fetch_stage1(cache, cfg, tmp_path / "scratch" / "stage1.pt")
    assert copy.is_file() and name == entry_file(cache, "checkpoint.pt")

    real = storage.download

    def cut_short(uri, local):
        real(uri, local)
        Path(local).write_bytes(Path(local).read_bytes()[:1000])
        return Path(local)
    monkeypatch.setattr(storage, "download", cut_short)
    scratch = tmp_path / "risda-trial-x" / "stage1.pt"
    with pytest.raises(RunFailure) as e:
        fetch_stage1(cache, cfg, scratch)
    text = str(e.value)
    assert text.startswith(f"stage-I cache entry {cache.entry(stage1_key(cfg.resolved()))}: checkpoint.pt is 1000 bytes (as copied here)")
    assert str(scratch) not in text and "--resume" not in text and "rerun the same command" in text


def test_an_entry_being_written_is_waited_for_not_moved(tmp_path):
    cfg = stage1_config()
    cache = Stage1Cache(str(tmp_path / "cache"))
    entry = Path(cache.entry(stage1_key(cfg.resolved())))
    stage1_checkpoint(tmp_path / "trained.pt", cfg)
    entry.mkdir(parents=True)
    shutil.copy(tmp_path / "trained.pt", entry / "checkpoint.pt")  # a trainer between its two writes
    writer = FileLock(f"{entry}.lock")
    assert writer.acquire() is None
    try:
        assert inspect_entry(cache, cfg, False) == ("missing", None, None)
        assert (entry / "checkpoint.pt").is_file()  # untouched: its stage-I trial waits for the writer
    finally:
        writer.release()
    assert inspect_entry(cache, cfg, False)[0] == "retrain"  # a writer that died there: moved aside


def test_a_trial_holding_the_key_moves_a_bad_entry_aside(tmp_path):
    cfg = stage1_config()
    cache = Stage1Cache(str(tmp_path / "cache"))
    cache.store(cfg.resolved(), stage1_checkpoint(tmp_path / "trained.pt", cfg), {"observations": False})
    assert verified_or_set_aside(cache, cfg, False)[0]["key"] == stage1_key(cfg.resolved())
    assert verified_or_set_aside(cache, cfg, True) == (None, None)  # lacks the observations: trained again with them
    truncate(cache)
    info, note = verified_or_set_aside(cache, cfg, False)
    assert info is None and "truncated" in note and "moved aside to" in note


def test_a_bad_resumable_checkpoint_is_moved_aside_and_stage1_starts_over(tmp_path):
    cfg = stage1_config()
    cache = Stage1Cache(str(tmp_path / "cache"))
    partial = stage1_checkpoint(tmp_path / "epoch1.pt", cfg)
    cache.store_partial(cfg, partial)
    copy, note = cache.fetch_partial(cfg, tmp_path / "scratch" / "checkpoint.pt")
    assert note is None and copy.read_bytes() == partial.read_bytes()
    data = Path(cache.partial(cfg.resolved())).read_bytes()
    Path(cache.partial(cfg.resolved())).write_bytes(data[:100] + b"\0" * 64 + data[164:])
    copy, note = cache.fetch_partial(cfg, tmp_path / "scratch2" / "checkpoint.pt")
    assert copy is None and "partial.pt (as copied here) does not match the sha256 partial.json records" in note
    assert "stage I starts over" in note and not Path(cache.partial(cfg.resolved())).exists()
    assert not (tmp_path / "scratch2" / "checkpoint.pt").exists()
    cache.delete_partial(cfg)
    assert cache.fetch_partial(cfg, tmp_path / "scratch3" / "checkpoint.pt") == (None, None)


# --- a search over a damaged entry (trains) ----------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fault", [flip_weights, truncate_info], ids=["flip_weights", "truncate_info"])
def test_a_search_over_a_damaged_entry_retrains_it(cifar10_root, tmp_path, local_ray, capsys, fault):
    """The entry of the search's stage I, trained and stored as the runner does, then damaged:
    the search says so in one line naming the entry, moves it aside, trains it again ("trained
    now", stage1.parquet: retrained) and its trial forks from the new one and finishes (before: "1
    reused from the cache", then every trial diverged or a 34-line traceback)."""
    from risda.runner import search
    from risda.trainer.stage1 import stage1_training_config
    from risda.trainer.loop import train
    argv = ["--dataset", "cifar10lt", "--data-root", str(cifar10_root), "--imbalance", "10", "--n-max", "50",
            "--val-per-class", "5", "--test-per-class", "10", "--epochs", "2", "--batch-size", "50", "--lr", "0.02",
            "--num-samples", "1", "--scheduler", "none", "--storage", str(tmp_path / "ray"),
            "--results", str(tmp_path / "results"), "--name", "s"]
    cfg = search.base_config(search.parse_args(argv))
    shared = stage1_training_config(cfg.resolved())
    shared.out, shared.progress = str(tmp_path / "trained"), False
    done = train(shared, stage1_only=True)
    cache = Stage1Cache(str(tmp_path / "ray" / "stage1"))
    cache.store(shared.resolved(), Path(done["checkpoint"]), {"observations": False, "wall_time_s": 1.0})
    (tmp_path / "trained" / "checkpoint.pt").unlink()
    entry = cache.entry(stage1_key(cfg.resolved()))
    if fault is flip_weights:  # the trainer's weights start anywhere: flip 64 bytes of the first conv's
        data = bytearray(Path(entry, "checkpoint.pt").read_bytes())
        first = torch.load(Path(entry, "checkpoint.pt"), weights_only=True)["model"]["conv1.weight"]
        at = data.find(first.flatten()[:16].numpy().tobytes())
        data[at:at + 64] = np.full(16, 1e31, np.float32).tobytes()
        Path(entry, "checkpoint.pt").write_bytes(bytes(data))
    else:  # stage1.json cut in half
        text = Path(entry, "stage1.json").read_text()
        Path(entry, "stage1.json").write_text(text[: len(text) // 2])
    capsys.readouterr()
    assert search.main(argv) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    named = [line for line in text.splitlines() if f"stage-I cache entry {entry}" in line]
    assert len(named) == 1 and "moved aside to" in named[0] and "training it again" in named[0], text
    assert "0 reused from the cache (verified), 1 trained now (1 in place of an unusable entry" in " ".join(text.split())
    table = pd.read_parquet(tmp_path / "results" / "s" / "stage1.parquet")
    assert list(table.cache) == ["retrained"] and table.trained_now.all() and "moved aside" in table.cache_note[0]
    assert len(list(Path(tmp_path / "ray" / "stage1").glob(f"{stage1_key(cfg.resolved())}.bad-*/*"))) == 2  # kept, not deleted
    assert cache.verify(cfg.resolved()) is not None  # the new entry is whole
    trials = pd.read_parquet(tmp_path / "results" / "s" / "trials.parquet")
    assert list(trials.status) == ["TERMINATED"] and trials.completed.all()
    summary = json.loads(trials.summary[0])
    assert summary["stage1_checkpoint"] == f"{entry}/checkpoint.pt"  # the entry, not the trial's scratch copy
