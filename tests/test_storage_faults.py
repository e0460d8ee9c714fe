"""Issue 18, item 2: ENOSPC, EIO or EACCES while writing a checkpoint, a parquet file, a summary or
the stage-I cache is one line naming the path, the fault and what is intact; no .tmp file is left;
a rerun after freeing space continues without loss. The faults are injected at the write call."""
from __future__ import annotations

import errno

import pandas as pd
import pytest
import torch

from risda.trainer import storage
from risda.trainer.checkpoint import load_checkpoint, save_checkpoint
from risda.trainer.config import Config
from risda.trainer.failures import StorageFault, storage_fault
from risda.runner.collate import write_parquet


def full_disk(code=errno.ENOSPC):
    """A write that starts its file, then fails as a full disk does."""
    def write(obj, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(code, "No space left on device" if code == errno.ENOSPC else "Input/output error")
    return write


def leftovers(folder):
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


def test_a_full_disk_while_checkpointing_names_the_intact_checkpoint(tmp_path, monkeypatch):
    cfg, path = Config(out=str(tmp_path)), tmp_path / "checkpoint.pt"
    save_checkpoint(path, cfg, epoch=11, model={}, optimizer={}, objective={}, history=[], elapsed=0.0)
    monkeypatch.setattr(torch, "save", full_disk())
    with pytest.raises(StorageFault) as e:
        save_checkpoint(path, cfg, epoch=12, model={}, optimizer={}, objective={}, history=[], elapsed=0.0)
    assert str(e.value).startswith(f"cannot write {path}: no space left on the device (ENOSPC); the checkpoint of "
                                   f"epoch 12 ({path}) is intact")
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    assert load_checkpoint(path, cfg.resolved())["epoch"] == 11  # the old one, whole


def test_torchs_own_write_failure_is_a_storage_fault_too():
    assert "stopped short" in storage_fault(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64"))
    assert storage_fault(OSError("[Errno 28] No space left on device")) == "no space left on the device (ENOSPC)"  # pyarrow
    assert storage_fault(OSError(errno.EACCES, "Permission denied")) == "permission denied (EACCES)"
    assert storage_fault(OSError(errno.ENOENT, "No such file")) is None  # not a fault of the storage


def test_a_result_table_that_cannot_be_written_leaves_no_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(pd.DataFrame, "to_parquet", lambda self, path, **k: full_disk(errno.EIO)(None, path))
    with pytest.raises(StorageFault, match=r"trials.parquet: I/O error \(EIO\); the experiment in --storage"):
        write_parquet(pd.DataFrame({"a": [1]}), tmp_path / "trials.parquet")
    assert leftovers(tmp_path) == [] and not (tmp_path / "trials.parquet").exists()


def test_the_stage1_cache_upload_leaves_the_entry_as_it_was(tmp_path, monkeypatch):
    import pyarrow.fs
    local, dest = tmp_path / "ck.pt", tmp_path / "cache" / "key" / "checkpoint.pt"
    local.write_bytes(b"new")
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"old")

    def copy(src, tmp, **k):
        open(tmp, "wb").write(b"ne")
        raise OSError("[Errno 28] error writing bytes to file. Detail: [errno 28] No space left on device")
    monkeypatch.setattr(pyarrow.fs, "copy_files", copy)
    with pytest.raises(StorageFault, match=r"cannot write .*checkpoint.pt: no space left on the device \(ENOSPC\)"):
        storage.upload(local, str(dest))
    assert dest.read_bytes() == b"old" and leftovers(tmp_path / "cache") == []


@pytest.mark.slow
def test_a_run_hit_by_full_disks_continues_without_loss(tiny_config, tmp_path, monkeypatch, capsys):
    """Full at the second checkpoint, then at epochs.parquet: one line each (exit 1), no .tmp; each
    rerun with --resume continues, and the run ends as the uninterrupted one would."""
    import pyarrow.parquet as pq

    from risda.trainer.cli import main
    cfg = tiny_config(epochs=2, n_max=60)
    out = tmp_path / "run"
    flags = ["--dataset", "cifar10lt", "--data-root", cfg.data_root, "--imbalance", "10", "--n-max", "60",
             "--test-per-class", "10", "--epochs", "2", "--warmup-epochs", "0", "--checkpoint-every", "1",
             "--eval-every", "1", "--device", "cpu", "--precision", "fp32", "--no-progress", "--out", str(out)]
    real_save, saves = torch.save, []

    def second_save_fails(obj, path, *a, **k):
        saves.append(path)
        return (full_disk() if len(saves) == 2 else real_save)(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", second_save_fails)
    capsys.readouterr()
    assert main(flags) == 1
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and line.startswith(f"error: cannot write {out / 'checkpoint.pt'}: no space left")
    assert "the checkpoint of epoch 1" in line and leftovers(out) == []
    monkeypatch.setattr(torch, "save", real_save)
    real_write = pq.write_table
    monkeypatch.setattr(pq, "write_table", lambda table, where, **k: (full_disk(errno.EIO) if "epochs" in str(where)
                                                                      else real_write)(table, where, **k))
    assert main(flags + ["--resume"]) == 1
    line = capsys.readouterr().err.strip()
    assert f"cannot write {out / 'epochs.parquet'}: I/O error (EIO)" in line and "--resume" in line
    assert leftovers(out) == []
    monkeypatch.undo()
    assert main(flags + ["--resume"]) == 0
    assert len(pd.read_parquet(out / "epochs.parquet")) == 2  # both epochs, none twice
