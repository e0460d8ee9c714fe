"""--tracker mlflow|wandb (risda.runner.trackers): Ray Tune's own logger callbacks log each trial's
config, its per-epoch metrics and its final errors; read back from an MLflow file store and from a
W&B offline run. Without the extra installed, the flag is one line and exit 2."""
from __future__ import annotations

import json
import struct
import sys

import pandas as pd
import pytest

from risda.runner import search
from risda.runner.ablation import cli as run


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_tracker_without_its_extra_is_one_line_naming_the_extra(tracker, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import mlflow` now fails as if it were not installed
    common = ["--tracker", tracker, "--storage", str(tmp_path / "ray"), "--results", str(tmp_path / "results")]
    assert search.main(["--data-root", str(tmp_path), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f'pip install -e ".[{tracker}]"' in err
    assert run.main(["--data-root", str(tmp_path), "--dry-run", *common]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert f'--tracker {tracker}: {tracker} is not installed; install the extra: pip install -e ".[{tracker}]"' in out
    assert not (tmp_path / "ray").exists()  # nothing started


def tiny_search(cifar10_root, tmp_path, name, *extra):
    return ["--dataset", "cifar10lt", "--data-root", str(cifar10_root), "--imbalance", "100", "--n-max", "100",
            "--val-per-class", "10", "--test-per-class", "50", "--epochs", "3", "--stage1-epochs", "1", "--eval-every", "1",
            "--batch-size", "50",
            "--lr", "0.02", "--num-samples", "2", "--max-concurrent", "2", "--scheduler", "none", "--storage",
            str(tmp_path / "ray"), "--results", str(tmp_path / "results"), "--name", name, "--num-cpus", "2", *extra]


@pytest.mark.slow
def test_mlflow_logs_each_trial_s_config_epochs_and_final_errors(cifar10_root, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()  # a local file store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.x keeps the file store behind this switch
    assert search.main(tiny_search(cifar10_root, tmp_path, "tracked", "--tracker", "mlflow")) == 0
    trials = pd.read_parquet(tmp_path / "results" / "tracked" / "trials.parquet").set_index("trial_id")
    epochs = pd.read_parquet(tmp_path / "results" / "tracked" / "epochs.parquet")
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert len(runs) == len(trials) == 2
    for r in runs:
        trial_id = next(t for t in trials.index if t in r.info.run_name)
        trial = trials.loc[trial_id]
        assert r.info.status == "FINISHED"
        params = r.data.params  # the config
        assert float(params["alpha"]) == trial.alpha and float(params["beta"]) == trial.beta
        assert int(params["head_count"]) == trial.head_count and params["arm"] == "risda" and params["epochs"] == "3"
        history = client.get_metric_history(r.info.run_id, "val_error")  # every evaluated epoch
        ours = epochs[epochs.trial_id == trial_id].sort_values("epoch")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(list(ours.val_error))
        assert len(history) == len(ours) >= 2
        final = r.data.metrics  # the last value of each metric: the trainer's final errors
        assert final["summary_test_error"] == pytest.approx(trial.final_test_error)
        assert final["summary_best_val_error"] == pytest.approx(trial.best_val_error)
        print(f"mlflow run {r.info.run_name}: " + ", ".join(f"{k}={final[k]:.2f}" for k in sorted(final) if k.startswith("summary_")
                                                            and k.endswith("error")))


def wandb_records(path):
    """The protobuf records of a W&B run's transaction log (run-<id>.wandb): LevelDB's log format,
    32 KiB blocks of chunks (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last) after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, block, pos, parts = path.read_bytes(), 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def wandb_run(path) -> tuple[dict, list[dict]]:
    """(config, history rows) of an offline W&B run."""
    config, history = {}, []
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return config, history


@pytest.mark.slow
def test_wandb_offline_logs_each_cell_s_config_epochs_and_final_errors(cifar10_root, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no account, no network: the run stays on disk
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    args = ["--dataset", "cifar10lt", "--data-root", str(cifar10_root), "--arms", "risda,ce", "--imbalance", "10",
            "--seeds", "0", "--epochs", "3", "--stage1-epochs", "1", "--eval-every", "1", "--lr", "0.02", "--n-max", "100", "--test-per-class", "50", "--head-count", "2",
            "--val-per-class", "10", "--storage", str(tmp_path / "ray"), "--results", str(tmp_path / "results"),
            "--name", "tracked", "--no-progress", "--num-cpus", "2", "--tracker", "wandb"]
    assert run.main(args) == 0
    results = tmp_path / "results" / "tracked"
    runs = pd.read_parquet(results / "runs.parquet").set_index("trial_id")
    epochs = pd.read_parquet(results / "epochs.parquet")
    # TensorBoard needs no flag: Ray Tune wrote each trial's event file into its folder (README)
    assert len(list((tmp_path / "ray" / "tracked").glob("*/events.out.tfevents.*"))) == len(runs)
    logs = sorted(results.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == len(runs) == 2
    for log in logs:
        config, history = wandb_run(log)
        trial_id = config["trial_id"]
        cell = runs.loc[trial_id]
        assert config["arm"] == cell.arm and config["imbalance"] == 10 and config["epochs"] == 3 and config["seed"] == 0
        ours = epochs[epochs.trial_id == trial_id].sort_values("epoch")
        logged = [h for h in history if "val_error" in h]
        assert [h["val_error"] for h in logged] == pytest.approx(list(ours.val_error)) and len(logged) >= 2
        assert [h["epoch"] for h in logged] == list(ours.epoch)
        assert history[-1]["summary_test_error"] == pytest.approx(cell.test_error)  # the final errors, on the last report
        assert history[-1]["summary_few_error"] == pytest.approx(cell.few_error)
