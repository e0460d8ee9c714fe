"""Issue 18, items 4 and 8: a runtime failure (divergence, storage fault, failed --download) is one
line `error: ...` with exit 1 in risda.train, tune/search.py and ablations/run.py (the traceback
with --debug); an empty many/medium/few group prints as `–`. Nothing here trains."""
from __future__ import annotations

import errno
import os
import urllib.error

import pytest

import risda.trainer.loop
from risda.trainer.display import EMPTY, error_text
from risda.trainer.failures import DownloadFailed, StorageFault, divergence_hint
from risda.runner.exits import driver_failure
from risda.trainer.cli import main, result_line
from risda.trainer.loop import DivergedError


def one_error_line(capsys, rc, expected_rc=1) -> str:
    err = capsys.readouterr().err
    assert rc == expected_rc, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def train_raising(monkeypatch, exc):
    def fake_train(*a, **k):
        raise exc
    monkeypatch.setattr(risda.trainer.loop, "train", fake_train)


@pytest.mark.parametrize("exc, words", [
    (DivergedError("diverged: the mean training loss became nan at epoch 3"), "diverged"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/epochs.parquet"), "/runs/x/epochs.parquet"),
    (StorageFault("cannot write /runs/x/checkpoint.pt: no space left"), "checkpoint.pt"),
])
def test_a_runtime_failure_of_a_run_is_one_line_exit_1(monkeypatch, capsys, tmp_path, exc, words):
    train_raising(monkeypatch, exc)
    line = one_error_line(capsys, main(["--device", "cpu", "--no-progress", "--out", str(tmp_path / "r")]))
    assert words in line


def test_debug_shows_the_runtime_failures_traceback(monkeypatch, tmp_path):
    train_raising(monkeypatch, DivergedError("diverged: x"))
    with pytest.raises(DivergedError):
        main(["--device", "cpu", "--no-progress", "--out", str(tmp_path / "r"), "--debug"])


def test_a_bug_still_shows_its_traceback(monkeypatch, tmp_path):
    train_raising(monkeypatch, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        main(["--device", "cpu", "--no-progress", "--out", str(tmp_path / "r")])


def test_a_failed_download_is_one_line(monkeypatch, capsys, tmp_path):
    import torchvision

    def offline(*a, **k):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    line = one_error_line(capsys, main(["--device", "cpu", "--no-progress", "--download", "--dataset", "cifar10lt",
                                        "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "r")]))
    assert "--download could not fetch" in line and "name resolution" in line and "drop --download" in line


def test_a_full_disk_during_the_download_is_a_storage_fault(monkeypatch, capsys, tmp_path):
    import torchvision

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", full)
    line = one_error_line(capsys, main(["--device", "cpu", "--no-progress", "--download", "--dataset", "cifar10lt",
                                        "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "r")]))
    assert "no space left on the device (ENOSPC)" in line and str(tmp_path / "data") in line


def test_the_divergence_hint_names_a_short_reference_stage1():
    hint = divergence_hint("reference", stage1_epochs=2, epochs=3, epoch=2)
    assert "stage I of only 2 epoch(s)" in hint and "--variant paper" in hint
    assert divergence_hint("paper", 2, 3, 2) == ""            # not the reference variant
    assert divergence_hint("reference", 160, 200, 170) == ""  # a real stage I
    assert divergence_hint("reference", 2, 3, 1) == ""        # diverged in stage I: not this cause


def test_the_divergence_message_carries_the_hint(tiny_config):
    import torch
    cfg = tiny_config(variant="reference", epochs=3).resolved()
    with pytest.raises(DivergedError, match="likely cause: the reference variant after a stage I of only 2"):
        risda.trainer.loop.check_diverged(torch.tensor(float("nan")), 1, cfg, 2, 0.1, risda.trainer.loop.Path("/x"))


# --- the drivers ------------------------------------------------------------------------------
@pytest.mark.parametrize("exc, words", [
    (DownloadFailed("--download could not fetch CIFAR100 into data"), "--download could not fetch"),
    (OSError(errno.EIO, "Input/output error", "/s/exp/trials.parquet"), "I/O error (EIO)"),
    (EOFError("Ran out of input"), "storage (--storage) is full or broken"),
])
@pytest.mark.parametrize("runner", ["search", "ablation"])
def test_a_runtime_failure_of_a_driver_is_one_line_exit_1(monkeypatch, capsys, tmp_path, runner, exc, words):
    def fail(*a, **k):
        raise exc
    if runner == "search":
        from risda.runner import search
        monkeypatch.setattr(search, "base_config", fail)
        rc = search.main(["--results", str(tmp_path / "res")])
    else:
        from risda.runner.ablation import cli
        monkeypatch.setattr(cli, "run", fail)
        rc = cli.main(["--results", str(tmp_path / "res")])
    out = capsys.readouterr()
    text = (out.err + out.out).strip()
    assert rc == 1, text
    assert len(text.splitlines()) == 1 and text.startswith("error: ") and words in text, text


def test_a_driver_shows_the_traceback_with_debug(monkeypatch):
    from risda.runner import search

    def fail(*a, **k):
        raise DownloadFailed("--download could not fetch")
    monkeypatch.setattr(search, "base_config", fail)
    with pytest.raises(DownloadFailed):
        search.main(["--debug"])


def test_a_bug_on_the_driver_is_not_disguised():
    assert driver_failure(KeyError("x")) is None


# Tune's own output for a failed trial: the traceback it logs ("Trial task failed ..."), the box of
# the trial's last result. A diverged trial (or a storage fault in one) put two tracebacks a trial in
# a search's log; the driver has its own line for it.
QUIET_TUNE = ("TUNE_PRINT_ALL_TRIAL_ERRORS", "RAY_AIR_NEW_OUTPUT")


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("runner", ["search", "ablation"])
def test_a_driver_turns_tunes_tracebacks_off_unless_debug(monkeypatch, tmp_path, runner, debug):
    for var in QUIET_TUNE:
        monkeypatch.delenv(var, raising=False)

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop
    argv = ["--results", str(tmp_path / "res"), *(["--debug"] if debug else [])]
    if runner == "search":
        from risda.runner import search
        monkeypatch.setattr(search, "base_config", stop)
        main_ = search.main
    else:
        from risda.runner.ablation import cli
        monkeypatch.setattr(cli, "run", stop)
        main_ = cli.main
    with pytest.raises(Stop):  # a bug: its traceback, either way
        main_(argv)
    for var in QUIET_TUNE:
        assert os.environ.get(var) == (None if debug else "0"), var



def test_an_ablations_failed_stage1_is_one_line(monkeypatch, capsys, tmp_path, cifar10_root):
    """A shared stage I that diverged (or hit a full disk) ends ablations/run.py with one line, exit 1,
    however long the message and whatever brackets it holds (it was wrapped at the console's width)."""
    from risda.runner.ablation import cli
    from risda.runner.stage1 import Stage1Failed
    message = ("1 of 1 shared stage I(s) did not finish (22fa777ec69e822d: risda.trainer.loop.DivergedError: diverged: "
               "the mean training loss exploded to 2.53e+18 (> 10000) at epoch 0 [lr 200000, arm ce]; lower --lr, "
               "--alpha or --beta. " + "x" * 200 + "); fix the cause and rerun the same command")

    def fail(*a, **k):
        raise Stage1Failed(message)
    monkeypatch.setattr(cli, "check_cells_data", lambda *a, **k: 0)
    monkeypatch.setattr(cli, "init_ray", lambda *a, **k: False)  # no Ray: run_experiment fails first
    monkeypatch.setattr(cli, "cluster_summary", lambda: "no cluster")
    monkeypatch.setattr(cli, "trial_resources", lambda *a, **k: {"cpu": 1, "gpu": 0})
    monkeypatch.setattr(cli.ray, "cluster_resources", lambda: {})
    monkeypatch.setattr(cli, "run_experiment", fail)
    rc = cli.main(["--spec", "cifar10lt_reduced", "--arms", "ce", "--data-root", str(cifar10_root), "--imbalance", "10",
                   "--n-max", "60", "--storage", str(tmp_path / "ray"), "--results", str(tmp_path / "res"),
                   "--name", "s1fail"])
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert rc == 1 and len(errors) == 1 and errors[0] == f"error: {message}", out
    assert out.rstrip().endswith(message), out


@pytest.mark.slow
def test_a_failed_trial_leaves_no_traceback_in_the_drivers_log(monkeypatch, tmp_path, capfd):
    import ray
    from ray import tune

    from risda.runner import cluster
    from risda.runner.progress import RichProgress
    for var in QUIET_TUNE:
        monkeypatch.delenv(var, raising=False)
    cluster.quiet_tune(debug=False)

    def trainable(config):
        tune.report({"epochs_done": 1})
        raise DivergedError("diverged: the mean training loss became nan at epoch 1")
    assert cluster.init_ray(num_cpus=1, num_gpus=0, include_dashboard=False, logging_level="warning")
    try:
        grid = tune.Tuner(trainable, run_config=tune.RunConfig(
            name="quiet", storage_path=str(tmp_path / "ray"), verbose=0,
            callbacks=[RichProgress(1, metric=None, label="trials")])).fit()
    finally:
        ray.shutdown()
    captured = capfd.readouterr()
    text = captured.out + captured.err
    assert "diverged: the mean training loss became nan" in str(grid[0].error)
    failed = [line for line in text.splitlines() if "trials: failed" in line]  # the driver's own line, with the cause
    assert len(failed) == 1 and "DivergedError: diverged: the mean training loss became nan" in failed[0], text
    # Tune's traceback of the trial (a logging error of Ray's logger, whose stream an earlier
    # test's capsys closed, may print one of its own in this process)
    assert "Trial task failed" not in text and "RayTaskError" not in text and "errored after" not in text, text
    assert "Configuration for experiment" not in text, text


# --- item 8: empty groups ------------------------------------------------------------------------
def test_an_empty_group_prints_as_a_dash():
    assert error_text(None) == EMPTY == "–" and error_text(float("nan")) == "–" and error_text(12.345) == "12.35"
    line = result_line(dict(test_error=88.0, many_error=None, medium_error=88.04, few_error=None), "runs/x")
    assert line == "test error 88.00%  (many –, medium 88.0, few –)  -> runs/x/summary.json"
    assert "None" not in line


def test_the_search_table_prints_an_empty_group_as_a_dash(capsys):
    import pandas as pd

    from risda.runner.progress import print_top
    nan = float("nan")
    trials = pd.DataFrame([dict(trial_id="t1", alpha=0.5, final_val_error=40.0, completed=True, final_test_error=41.0,
                                final_test_many_error=nan, final_test_medium_error=39.5, final_test_few_error=nan,
                                epochs_run=3, wall_time_s=12.0, error=None)])
    print_top(trials, "val_error", ["alpha"])
    out = capsys.readouterr().out
    assert "nan" not in out and out.count("–") == 2 and "39.5" in out


def test_table_md_and_the_report_print_an_empty_group_as_a_dash():
    from risda.runner import report
    from risda.runner.ablation import tables
    nan = float("nan")
    assert tables.cell_text(dict(status=tables.OK, few_error_mean=nan, few_error_std=nan), "few_error") == ("–", "")
    assert report.cell_text(dict(status=tables.OK, few_error_mean=nan, few_error_std=nan, few_error_count=0, n_ok=1),
                            "few_error") == "–"
