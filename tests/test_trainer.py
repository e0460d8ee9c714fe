"""The two-stage trainer on real CIFAR-10-LT images: it learns, resumes exactly, and writes its outputs."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from risda.trainer.config import Config
from risda.trainer.loop import lr_at, train

SUMMARY_FIELDS = {"config", "class_counts", "train_size", "val_size", "test_size", "test_error", "many_error",
                  "medium_error", "few_error", "best_val_error", "best_val_epoch", "wall_time_s", "torch",
                  "device", "seed", "subset_seed"}


def test_paper_schedule_and_scaling():
    cfg = Config().resolved()
    assert (cfg.stage1_epochs, cfg.lr_milestones, cfg.warmup_epochs) == (160, (160, 180), 5)
    assert lr_at(cfg, 0) == pytest.approx(0.02) and lr_at(cfg, 100) == 0.1
    assert lr_at(cfg, 160) == pytest.approx(1e-3) and lr_at(cfg, 199) == pytest.approx(1e-5)
    short = Config(epochs=20).resolved()
    assert (short.stage1_epochs, short.lr_milestones) == (16, (16, 18))
    assert Config(variant="reference").resolved().subset_seed == 42


def test_two_epochs_loss_falls_and_outputs(tiny_config):
    cfg = tiny_config(arm="ce", epochs=3, val_per_class=10, lr=0.05)
    summary = train(cfg)
    history = pd.read_parquet(f"{cfg.out}/epochs.parquet")
    assert len(history) == 3 and history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    on_disk = json.loads(open(f"{cfg.out}/summary.json").read())
    assert SUMMARY_FIELDS <= set(on_disk) and on_disk["test_error"] == summary["test_error"]
    assert on_disk["val_size"] == 100 and on_disk["best_val_error"] is not None
    assert 0 <= summary["test_error"] <= 100 and summary["config"]["arm"] == "ce"


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(tiny_config, tmp_path):
    straight = train(tiny_config(arm="ce_drw", epochs=3, out=str(tmp_path / "a")))

    def crash_after_first_epoch(record, checkpoint):
        if record["epoch"] == 0:
            raise Interrupt
    cfg = tiny_config(arm="ce_drw", epochs=3, out=str(tmp_path / "b"))
    with pytest.raises(Interrupt):
        train(cfg, on_epoch=crash_after_first_epoch)
    resumed = train(tiny_config(arm="ce_drw", epochs=3, out=str(tmp_path / "b"), resume=True))
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_error"] == straight["test_error"] and resumed["epochs_run"] == 3


def test_resume_refuses_a_changed_config(tiny_config):
    train(tiny_config(arm="ce", epochs=1, stage1_epochs=0))
    with pytest.raises(ValueError, match="config changed.*lr"):
        train(tiny_config(arm="ce", epochs=1, stage1_epochs=0, lr=0.5, resume=True))


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "mnistlt"], "unknown dataset 'mnistlt'"),
    (["--imbalance", "0.5"], "imbalance must be >= 1"),
    (["--epochs", "10", "--stage1-epochs", "10"], "stage-I epochs"),
    (["--data-root", "/no/such/dir"], "does not exist"),
])
def test_cli_bad_input_fails_fast(flags, message):
    run = subprocess.run([sys.executable, "-m", "risda.train", "--no-progress", *flags],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and message in run.stderr
