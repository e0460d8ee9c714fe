"""Issue 18, item 3: without a terminal (or with --log-every) a run and a driver print plain
lines: a run one per epoch, a driver one per running trial every so often and one per finished
or failed trial."""
from __future__ import annotations

import re
import time
from types import SimpleNamespace

import pytest
import torch

from risda.trainer import progress
from risda.trainer.config import Config
from risda.runner.progress import RichProgress


@pytest.fixture(autouse=True)
def no_log_every():
    progress.set_log_every(None)
    yield
    progress.set_log_every(None)


def record(epoch, evaluated=False):
    r = dict(epoch=epoch, train_loss=1.5, images_per_s=400.0)
    if evaluated:
        r.update(test_error=52.1, test_many_error=None, test_medium_error=40.0, test_few_error=60.0)
    return r


def run_epochs(p, epochs, train_size=100):
    with p:
        for e in epochs:
            p.batch(train_size, torch.tensor(1.5))
            p.epoch_done(record(e, evaluated=e == epochs[-1]))


def test_a_run_without_a_terminal_prints_a_line_per_epoch(capsys):
    cfg = Config(epochs=3, arm="risda")  # stage I: 2 epochs
    run_epochs(progress.TrainProgress(cfg.resolved(), 100, 3), [0, 1, 2])  # capsys's stderr is no terminal
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3, lines
    assert re.match(r"\d\d:\d\d:\d\d risda stage I epoch 1/3  loss 1.500  400 img/s  ETA \S+$", lines[0]), lines[0]
    assert "stage II epoch 3/3" in lines[2] and "test 52.10" in lines[2] and "many/med/few –/40.0/60.0" in lines[2]


def test_a_disabled_run_is_silent_unless_log_every_asks(capsys):
    cfg = Config(epochs=3)
    run_epochs(progress.TrainProgress(cfg.resolved(), 100, 3, enabled=False), [0])
    assert capsys.readouterr().err == ""
    progress.set_log_every(30)
    run_epochs(progress.TrainProgress(cfg.resolved(), 100, 3, enabled=False), [0])
    assert "epoch 1/3" in capsys.readouterr().err


def test_a_long_epoch_gets_lines_within_it(capsys):
    progress.set_log_every(0.05)
    p = progress.TrainProgress(Config(epochs=3).resolved(), 1000, 3)
    with p:
        for _ in range(3):
            time.sleep(0.06)
            p.batch(100, torch.tensor(2.0))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "300/1000 images  loss 2.000  ETA" in lines[-1], lines


def trial(trial_id, status, config, last_result=None, error_file=None):
    """What the callbacks read of Tune's Trial; `error_file` is where Tune wrote a failed trial's
    error (Ray 2.60's Trial has no error message attribute)."""
    return SimpleNamespace(trial_id=trial_id, status=status, config=config, last_result=last_result or {},
                           error_file=error_file)


def test_a_driver_prints_a_line_per_running_trial_every_so_often(capsys):
    progress.set_log_every(30)
    stage1 = trial("s1", "RUNNING", {"job": {"config": Config(epochs=200).to_dict()}},
                   dict(epochs_done=12, stage=1, train_loss=1.234, images_per_s=412.0, time_this_iter_s=10.0))
    stage2 = trial("t2", "RUNNING", {"epochs": 200, "alpha": 0.5}, dict(epochs_done=170, stage=2, train_loss=0.9,
                                                                         images_per_s=300.0, time_this_iter_s=2.0))
    cb = RichProgress(4, "val_error", ["alpha"])
    cb.on_step_end(0, [stage1, stage2, trial("t3", "TERMINATED", {})])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "1/4 finished, 2 running" in lines[0]
    assert lines[1].endswith("s1 alpha=None  stage I epoch 12/160  loss 1.234  412 img/s  ETA 24m40s"), lines[1]
    assert lines[2].endswith("t2 alpha=0.5  stage II epoch 170/200  loss 0.900  300 img/s  ETA 1m00s"), lines[2]
    cb.on_step_end(1, [stage1, stage2])  # within 30 s: nothing more
    assert capsys.readouterr().err == ""


def test_a_driver_prints_a_line_per_finished_and_failed_trial(capsys, tmp_path):
    cb = RichProgress(2, "val_error", ["alpha"])
    cb.on_trial_complete(0, [], trial("t1", "TERMINATED", {"alpha": 0.5}, dict(val_error=40.0, test_error=41.0,
                                                                                epochs_done=3)))
    error_file = tmp_path / "error.txt"  # as Tune writes it before it calls on_trial_error
    error_file.write_text("Failure # 1 (occurred at 2026-12-07_04-12-50)\nray::ImplicitFunc.train()\n  File \"x.py\", "
                          "line 1, in train\nDivergedError: diverged: nan\n")
    cb.on_trial_error(0, [], trial("t2", "ERROR", {"alpha": 1.5}, error_file=str(error_file)))
    cb.on_trial_error(0, [], trial("t3", "ERROR", {"alpha": 1.0}))  # no error file: the line without a cause
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("trials: done   t1 alpha=0.5  val_error 40  test 41  epochs 3"), lines[0]
    assert lines[1].endswith("trials: failed t2 alpha=1.5: DivergedError: diverged: nan"), lines[1]
    assert lines[2].endswith("trials: failed t3 alpha=1"), lines[2]


@pytest.mark.slow
def test_a_real_run_logs_each_epoch(tiny_config, capsys):
    from risda.trainer.cli import main
    cfg = tiny_config(epochs=2, n_max=60)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in dict(dataset=cfg.dataset, data_root=cfg.data_root, imbalance=10,
                                                             n_max=60, test_per_class=10, epochs=2, out=cfg.out,
                                                             device="cpu", precision="fp32").items()]
    assert main(flags + ["--no-progress", "--log-every", "60"]) == 0
    err = capsys.readouterr().err
    assert "stage I epoch 1/2" in err and "stage II epoch 2/2" in err and "test " in err


def test_a_driver_console_without_a_terminal_writes_one_line_per_message():
    from risda.runner.progress import driver_console
    console = driver_console()  # pytest captures stdout: not a terminal, as in a batch job's log
    assert not console.is_terminal
    with console.capture() as cap:
        console.log("data: " + "x" * 300)
        console.print("error: " + "y" * 300)
    lines = cap.get().splitlines()
    assert len(lines) == 2, lines  # neither wrapped at 80 columns
    assert lines[0].rstrip().endswith("x" * 300)  # no `progress.py:NN` source suffix after the message
