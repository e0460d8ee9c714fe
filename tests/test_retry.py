"""Issue 18, item 5: on a cluster --max-failures defaults to 2; a diverged trial is never retried;
the driver does not echo Ray's own logs."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray

from risda.runner import cluster, retry
from risda.runner.retry import DIVERGED_KEY, NoRetryWhenDiverged, max_failures, reporting_divergence
from risda.trainer.loop import DivergedError


def test_max_failures_defaults_to_2_on_a_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert max_failures(None, None) == 0
    assert max_failures(None, "10.0.0.1:6379") == 2
    assert max_failures(0, "10.0.0.1:6379") == 0  # a typed flag wins
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert max_failures(None, None) == 2


def test_a_diverged_trial_reports_it_before_raising(monkeypatch):
    reports = []
    monkeypatch.setattr(retry.tune, "report", reports.append)
    with pytest.raises(DivergedError):
        with reporting_divergence({"trial": "t1"}):
            raise DivergedError("diverged: the mean training loss became nan")
    assert reports == [{DIVERGED_KEY: "diverged: the mean training loss became nan", "trial": "t1"}]
    with pytest.raises(KeyError):  # any other failure: nothing reported, retried as Tune likes
        with reporting_divergence():
            raise KeyError("x")
    assert len(reports) == 1


def test_the_driver_turns_off_retries_of_a_diverged_trial():
    trial = SimpleNamespace(max_failures=2)
    NoRetryWhenDiverged().on_trial_result(0, [], trial, {"epochs_done": 3})
    assert trial.max_failures == 2
    NoRetryWhenDiverged().on_trial_result(0, [], trial, {DIVERGED_KEY: "diverged: nan"})
    assert trial.max_failures == 0


def test_the_driver_does_not_echo_rays_logs(monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise Stop
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", fake_init)
    with pytest.raises(Stop):
        cluster.init_ray(num_cpus=1)
    assert seen["log_to_driver"] is False


# --- with Ray: the callback really stops the retry ---------------------------------------------
@pytest.fixture
def local_ray():
    assert cluster.init_ray(num_cpus=1, num_gpus=0, include_dashboard=False, logging_level="warning")
    try:
        yield
    finally:
        ray.shutdown()


def attempts_of(kind: str, tmp_path, local_ray_) -> tuple[int, object]:
    from ray import tune
    log = tmp_path / f"{kind}.attempts"

    def trainable(config):
        with open(log, "a") as f:
            f.write("x\n")
        tune.report({"epochs_done": 1})
        with reporting_divergence():
            raise DivergedError("diverged: nan") if kind == "diverged" else RuntimeError("a lost node")

    tuner = tune.Tuner(trainable, run_config=tune.RunConfig(
        name=kind, storage_path=str(tmp_path / "ray"), verbose=0, callbacks=[NoRetryWhenDiverged()],
        failure_config=tune.FailureConfig(max_failures=2)))
    grid = tuner.fit()
    return len(log.read_text().splitlines()), grid[0].error


@pytest.mark.slow
def test_tune_retries_other_failures_but_not_a_divergence(tmp_path, local_ray):
    n, error = attempts_of("other", tmp_path, local_ray)
    assert n == 3 and error is not None  # the first try and two retries
    n, error = attempts_of("diverged", tmp_path, local_ray)
    assert n == 1 and "diverged: nan" in str(error)
