"""Faults: a trial whose worker is killed is an ERROR with its cause, not a success nor an
unfinished trial; --retry-errored continues it and Optuna learns its real score; the scratch
folder the killed worker could not remove is removed by the driver."""
from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import ray

from risda.runner import cluster, collate, search
from risda.runner.trainables import scratch_prefix
from test_search import REPO, SEARCH_PY, read_outputs, tiny_argv


def make_search_alg(space: str = "alpha=0.25:1.5", max_concurrent: int = 1):
    """The searcher the search command builds (TPE behind the concurrency limiter), in a
    SearchGenerator as Tune holds it."""
    from ray.tune.search.search_generator import SearchGenerator
    args = argparse.Namespace(search_seed=0, num_samples=4, max_concurrent=max_concurrent)
    return SearchGenerator(search.make_search_alg(search.parse_space(space), args, None, None, "faults", None))


def optuna_trials(generator) -> list:
    searcher = generator.searcher
    while hasattr(searcher, "searcher"):
        searcher = searcher.searcher
    return searcher._ot_study.get_trials(deepcopy=False)


def test_an_errored_trial_is_told_to_optuna_only_when_its_retry_completes(tmp_path):
    import optuna
    States = optuna.trial.TrialState
    gen = make_search_alg()
    limiter = gen.searcher
    assert isinstance(limiter, search.RetryingConcurrencyLimiter)
    assert limiter.suggest("t1") is not None
    limiter.on_trial_result("t1", {"val_error": 60.0, "training_iteration": 1})
    limiter.on_trial_complete("t1", error=True)  # its worker died: not a result
    assert [t.state for t in optuna_trials(gen)] == [States.RUNNING]  # not FAIL, not COMPLETE at 60
    assert limiter.suggest("t2") is not None  # the failed trial no longer holds the concurrency slot
    limiter.on_trial_result("t2", {"epoch": 0, "training_iteration": 1})  # an epoch without evaluation
    limiter.on_trial_complete("t2", result={"val_error": 30.0, "training_iteration": 2})  # a normal end
    assert [(t.state, t.value) for t in optuna_trials(gen)] == [(States.RUNNING, None), (States.COMPLETE, 30.0)]

    # The driver stops; Tune restores the searcher from the experiment's checkpoint ...
    gen.save_to_dir(str(tmp_path), session_str="s")
    restored = make_search_alg()
    restored.restore_from_dir(str(tmp_path))
    # ... and --retry-errored continues t1 from its checkpoint to its end.
    restored.searcher.on_trial_result("t1", {"val_error": 25.0, "training_iteration": 2})
    restored.searcher.on_trial_complete("t1", result={"val_error": 25.0, "training_iteration": 2})
    assert [(t.state, t.value) for t in optuna_trials(restored)] == [(States.COMPLETE, 25.0), (States.COMPLETE, 30.0)]
    # an unknown trial (not from this searcher) is ignored rather than a KeyError in Tune's loop
    restored.searcher.on_trial_result("t9", {"val_error": 1.0, "training_iteration": 1})
    restored.searcher.on_trial_complete("t9", result={"val_error": 1.0})
    assert len(optuna_trials(restored)) == 2


def test_a_trial_with_an_error_is_an_error_whatever_status_tune_saved():
    """Tune saves a trial it was retrying (--max-failures) when the driver stopped as PENDING,
    its error beside it; the driver's own ResultGrid has no error for it (Tune marks it
    TERMINATED in memory), so collate takes the saved one."""
    died = RuntimeError("The actor is dead because its worker process has died.")
    result = SimpleNamespace(config={"epochs": 2}, metrics={"trial_id": "t1"}, error=None, metrics_dataframe=None,
                             path="/x/train_trial_t1")
    assert collate.trial_row(result, "PENDING")["status"] == "PENDING"  # unfinished, nothing failed
    row = collate.trial_row(result, "PENDING", error=died)
    assert (row["status"], row["error"], row["completed"]) == ("ERROR", str(died), False)
    assert collate.trial_row(SimpleNamespace(**{**vars(result), "error": died}), "RUNNING")["status"] == "ERROR"
    saved = lambda status: SimpleNamespace(status=status, get_pickled_error=lambda: died, get_error=lambda: None)  # noqa: E731
    assert collate.saved_error(saved("PENDING")) is died and collate.saved_error(saved("ERROR")) is died
    assert collate.saved_error(saved("TERMINATED")) is None and collate.saved_error(None) is None


def descendants(root: int) -> dict[int, str]:
    """pid -> command line of every process below `root` (the Ray this test process started)."""
    rows = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout.splitlines()
    children, args = {}, {}
    for row in rows:
        pid, ppid, cmd = (row.split(None, 2) + [""])[:3]
        children.setdefault(int(ppid), []).append(int(pid))
        args[int(pid)] = cmd
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = args[child]
            todo.append(child)
    return found


def scratch_folders(trial_id: str) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(scratch_prefix(trial_id) + "*"))


@pytest.fixture
def loopback_ray():
    """An embedded Ray as the runner starts one (127.0.0.1 only), for a second driver to join."""
    assert cluster.init_ray(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="warning")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_killed_trial_is_an_error_and_retry_errored_completes_it(cifar10_root, tmp_path, loopback_ray):
    name = "faults"
    argv = tiny_argv(cifar10_root, tmp_path, name, "--num-samples", "2", "--max-concurrent", "1", "--scheduler", "none")
    assert loopback_ray.startswith("127.0.0.1:")
    experiment = tmp_path / "ray" / name
    log_path = tmp_path / "killed.log"
    log = open(log_path, "w")
    # --max-failures 0: on a cluster it defaults to 2, and Tune would restore the killed trial by itself
    # (tests/test_retry.py); here the kill must stay an error that only --retry-errored continues
    proc = subprocess.Popen([sys.executable, str(SEARCH_PY), *argv, "--address", loopback_ray, "--max-failures", "0"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    tail = lambda: log_path.read_text()[-3000:]  # noqa: E731
    try:
        # The first stage-II trial, once it runs in its scratch folder: SIGKILL its worker process.
        stage1_workers, killed, deadline = set(), None, time.time() + 180
        while killed is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            workers = {p for p, cmd in descendants(os.getpid()).items() if cmd.startswith("ray::ImplicitFunc")}
            trial_dirs = sorted(experiment.glob("train_trial_*"), key=lambda p: p.stat().st_mtime)
            if not trial_dirs:
                stage1_workers |= workers  # the shared stage I's trial runs first, in its own experiment
                continue
            killed = trial_dirs[0].name.removeprefix("train_trial_")
            if not scratch_folders(killed) or len(workers - stage1_workers) != 1:
                killed = None
                continue
            os.kill((workers - stage1_workers).pop(), signal.SIGKILL)
        assert killed, "no stage-II trial ran before the deadline:\n" + tail()
        assert scratch_folders(killed)  # the killed worker never removes its scratch folder
        # Once Tune has seen the trial die (it starts the next one: one at a time), interrupt the
        # driver (Ctrl-C), before that one ends (a Ctrl-C after the driver's last step is no test).
        deadline = time.time() + 60
        while len(list(experiment.glob("train_trial_*"))) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) in (1, 130), tail()  # failed or interrupted: never a success
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    trials = pd.read_parquet(tmp_path / "results" / name / "trials.parquet")
    row = trials.set_index("trial_id").loc[killed]
    assert row["status"] == "ERROR" and "actor is dead" in row["error"], tail()
    assert not row["completed"]
    assert not scratch_folders(killed)  # the driver removed it

    # The same command with --retry-errored: the killed trial continues to its end.
    assert search.main([*argv, "--retry-errored"]) == 0
    trials, epochs, best = read_outputs(tmp_path, name)
    assert len(trials) == 2 and (trials["status"] == "TERMINATED").all() and trials["completed"].all()
    assert trials["error"].isna().all()
    assert not epochs.duplicated(["trial_id", "epoch"]).any() and len(epochs) == 2 * 1  # one stage-II epoch each
    assert best["trials_completed"] == 2 and best["trials_failed"] == 0
    assert not any(scratch_folders(t) for t in trials["trial_id"])
    # Optuna heard both trials' final validation errors, the retried one included.
    state = sorted(experiment.glob("searcher-state-*.pkl"))[-1]  # the last session's (named by its start time)
    study = pickle.loads(state.read_bytes())["_ot_study"]
    told = sorted(t.value for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE")
    assert told == sorted(trials["final_val_error"]), json.dumps([str(t) for t in study.trials])


def test_the_best_epoch_skips_epochs_that_were_not_evaluated():
    """Tune's metrics frame holds NaN (not None) for an epoch reported without a validation
    error (eval_every > 1): the best is the lowest evaluated one, not NaN (a search's
    trials.parquet had best_val_error NaN beside final_val_error 68.0)."""
    frame = pd.DataFrame({"epoch": [24, 25, 26, 27], "epochs_done": [25, 26, 27, 28],
                          "val_error": [float("nan"), 72.0, float("nan"), 68.0]})
    result = SimpleNamespace(config={"epochs": 28}, metrics={"trial_id": "t1"}, error=None, metrics_dataframe=frame,
                             path="/x/train_trial_t1")
    row = collate.trial_row(result, "TERMINATED")
    assert (row["best_val_error"], row["best_val_error_epoch"], row["final_val_error"]) == (68.0, 27, 68.0)
    assert row["completed"]
