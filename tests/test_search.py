"""tune/search.py on real (tiny) CIFAR-10-LT runs with Ray: the outputs, failed trials,
resuming, two nodes, fractional GPUs. Every test that starts Ray shuts it down."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray

from risda.trainer.config import Config
from risda.runner import search, trainables

REPO = Path(__file__).resolve().parents[1]
SEARCH_PY = REPO / "tune" / "search.py"  # the command line, run as a subprocess below


def tiny_argv(cifar10_root, tmp_path, name, *extra) -> list[str]:
    """4 tiny RISDA trials: ~250 training images, 1 stage-I + 1 stage-II epoch, 1 CPU each.
    lr 0.02: at 0.1 with no warm-up, one epoch on so few images blows the features up
    (|f| ~ 1e6) and RISDA's ½βΔwᵀΣΔw term overflows."""
    return ["--dataset", "cifar10lt", "--data-root", str(cifar10_root), "--imbalance", "100", "--n-max", "100",
            "--val-per-class", "10", "--test-per-class", "50", "--epochs", "2", "--eval-every", "1",
            "--checkpoint-every", "1", "--batch-size", "50", "--lr", "0.02", "--num-samples", "4", "--max-concurrent", "2",
            "--storage", str(tmp_path / "ray"), "--results", str(tmp_path / "results"), "--name", name, *extra]


def failing_on_paper_point(config: dict) -> None:
    """The real trainable, except that the enqueued Table 2 point (λ=100: α 0.5, β 0.75)
    raises before its first report."""
    if config["alpha"] == 0.5 and config["beta"] == 0.75:
        raise RuntimeError("injected failure for the test")
    trainables.train_trial(config)


# Ray workers cannot import this test module: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def gpu_ray():
    """Four logical CPUs and one logical GPU: no real GPU needed for Ray's bookkeeping."""
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, logging_level="warning")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def two_nodes():
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="warning")
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def read_outputs(tmp_path, name):
    out = tmp_path / "results" / name
    return (pd.read_parquet(out / "trials.parquet"), pd.read_parquet(out / "epochs.parquet"),
            json.loads((out / "best.json").read_text()))


# --- no Ray needed -------------------------------------------------------------------------
def test_the_command_line_is_thin(tmp_path):
    """tune/search.py is risda.runner.search.main; it runs from any folder (the installed package)."""
    done = subprocess.run([sys.executable, str(SEARCH_PY), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--num-samples" in done.stdout and "--cpus-per-trial" in done.stdout, done.stderr
    assert "from risda.runner.search import main" in SEARCH_PY.read_text()


def test_space_parsing_and_paper_point(tmp_path):
    space = search.parse_space(search.DEFAULT_SPACE)
    assert space == {"alpha": "0.25:1.5", "beta": "0.25:1.5", "head_count": "10|20|30|40"}
    assert search.optuna_distribution("head_count", "10|20").choices == (10, 20)
    assert type(search.optuna_distribution("head_count", "10:40")).__name__ == "IntDistribution"
    assert search.optuna_distribution("lr", "0.01:0.3:log").log
    f = tmp_path / "space.txt"
    f.write_text("alpha = 0.1:1.0   # a comment\nbeta=0.5|1.0\n")
    assert search.parse_space(str(f)) == {"alpha": "0.1:1.0", "beta": "0.5|1.0"}
    for bad in ("alpha=1", "nope=0:1", "out=a|b", "arm=0:1"):
        with pytest.raises(search.ConfigError):
            search.parse_space(bad)
    assert search.paper_point(100, space) == {"alpha": 0.5, "beta": 0.75, "head_count": 20}
    cifar10 = search.default_space(Config(dataset="cifar10lt").resolved(), 10)
    assert cifar10["head_count"] == "1|2|3|4" and search.paper_point(100, cifar10, 10)["head_count"] == 2
    assert search.default_space(Config(dataset="cifar100lt").resolved(), 100) == space
    assert "head_count" not in search.default_space(Config(dataset="imagenetlt").resolved(), 1000)  # head by size there
    assert search.paper_point(200, {"alpha": "0.25:1.5"}) == {"alpha": 0.5}
    assert search.paper_point(37, space) is None
    assert search.paper_point(100, {"alpha": "0.6:1.5", "beta": "0.25:1.5"}) == {"beta": 0.75}


def test_flags_fix_what_the_space_searches_and_validation_is_mandatory(cifar10_root, capsys):
    args = search.parse_args(["--data-root", str(cifar10_root), "--head-count", "30"])
    given = search.config_overrides(args)
    assert list(search.search_space(args, given, search.base_config(args), 10)) == ["alpha", "beta"]
    assert search.base_config(args).val_per_class == search.DEFAULT_VAL_PER_CLASS
    args = search.parse_args(["--head-count", "30", "--space", "head_count=10|20"])
    with pytest.raises(search.ConfigError, match="--head-count fixes"):
        search.search_space(args, search.config_overrides(args), search.base_config(args), 10)
    assert search.main(["--data-root", str(cifar10_root), "--val-per-class", "0"]) == 2
    assert "validation split is mandatory" in capsys.readouterr().err


# --- embedded Ray ----------------------------------------------------------------------------
@pytest.mark.slow
def test_search_writes_outputs_with_a_failed_trial(cifar10_root, tmp_path, local_ray):
    name = "e2e"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    rc = search.main(tiny_argv(cifar10_root, tmp_path, name, "--optuna-storage", storage), trainable=failing_on_paper_point)
    assert rc == 1  # one of the four trials failed: not a success
    trials, epochs, best = read_outputs(tmp_path, name)
    assert len(trials) == 4 and trials["trial_id"].is_unique
    # the searched values lie in the space
    assert trials["alpha"].between(0.25, 1.5).all() and trials["beta"].between(0.25, 1.5).all()
    assert set(trials["head_count"]) <= {1, 2, 3, 4}  # 10-40% of CIFAR-10's classes
    # the trial that raised is a row with its error; the others ran to the end
    failed = trials[trials["status"] == "ERROR"]
    assert len(failed) == 1 and "injected failure" in failed["error"].iloc[0]
    assert failed["alpha"].iloc[0] == 0.5 and failed["epochs_run"].iloc[0] == 0
    ok = trials[trials["status"] == "TERMINATED"]
    assert len(ok) == 3 and ok["completed"].all() and ok["error"].isna().all()
    assert ok["final_val_error"].between(0, 100).all() and ok["final_test_error"].between(0, 100).all()
    assert ok["device"].str.startswith("cpu").all() and (ok["seed"] == 0).all() and (ok["subset_seed"] == 0).all()
    assert (trials["search_seed"] == 0).all()
    # stage I was trained once, in its own experiment, and every trial forked stage II from it
    stage1 = pd.read_parquet(tmp_path / "results" / name / "stage1.parquet")
    assert len(stage1) == 1 and stage1["trained_now"].all() and (stage1["status"] == "ok").all()
    assert (ok["stage1_key"] == stage1["stage1_key"].iloc[0]).all() and ok["stage1_wall_time_s"].notna().all()
    assert len(list((tmp_path / "ray" / f"{name}-stage1").glob("train_stage1_trial_*"))) == 1
    # one row per trial per stage-II epoch (the stage-I epochs are the shared stage I's)
    assert len(epochs) == 3 * 1 and set(epochs["trial_id"]) == set(ok["trial_id"])
    assert {"val_error", "test_error", "test_many_error", "test_few_error", "epoch"} <= set(epochs.columns)
    # best.json: the lowest final validation error, a config the trainer accepts
    assert best["value"] == ok["final_val_error"].min() and best["trial_id"] in set(ok["trial_id"])
    assert (best["trials_completed"], best["trials_failed"], best["trials_requested"]) == (3, 1, 4)
    cfg = Config.from_dict(best["config"]).validate()
    assert (cfg.alpha, cfg.beta, cfg.head_count) == tuple(best["params"][k] for k in ("alpha", "beta", "head_count"))
    assert cfg.val_per_class == 10 and cfg.arm == "risda"
    # the figures beside trials.parquet
    for figure in ("alpha_beta.png", "history.png", "slice.png"):
        assert (tmp_path / "results" / name / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --optuna-storage: Optuna's own API (what optuna-dashboard reads) finds every finished trial's parameters and value
    import optuna
    study = optuna.load_study(study_name=name, storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == len(ok)
    stored = sorted((t.params["alpha"], t.params["beta"], t.params["head_count"], t.value) for t in complete)
    assert stored == sorted(zip(ok.alpha, ok.beta, ok.head_count, ok.final_val_error))


@pytest.mark.slow
def test_a_search_whose_stage1_diverges_fails_and_leaves_no_best_json(cifar10_root, tmp_path, local_ray, capsys):
    out = tmp_path / "results" / "diverge"
    out.mkdir(parents=True)
    (out / "best.json").write_text('{"stale": "from an earlier experiment of this name"}')
    # replacing an earlier experiment's results is asked for (--restart); without it they are kept (test_results_owner.py)
    assert search.main(tiny_argv(cifar10_root, tmp_path, "diverge", "--lr", "1e6", "--restart")) == 1
    assert not (out / "best.json").exists()  # no trial finished: nothing may look like a result
    captured = capsys.readouterr()
    assert "diverged" in " ".join((captured.out + captured.err).split())


@pytest.mark.slow
def test_more_gpus_than_the_cluster_has_is_an_error_at_start(cifar10_root, tmp_path, local_ray, capsys):
    rc = search.main(tiny_argv(cifar10_root, tmp_path, "no-gpu", "--gpus-per-trial", "0.5"))
    assert rc == 2 and "no node of the cluster has that many GPUs" in capsys.readouterr().err
    assert not (tmp_path / "ray" / "no-gpu").exists()


@pytest.mark.slow
def test_interrupted_search_resumes_without_rerunning_finished_trials(cifar10_root, tmp_path, local_ray):
    name = "resume"
    argv = tiny_argv(cifar10_root, tmp_path, name, "--num-samples", "2", "--max-concurrent", "1")
    address = ray.get_runtime_context().gcs_address
    # A second driver on the fixture's cluster, interrupted (Ctrl-C) once a trial has finished.
    log = open(tmp_path / "interrupted.log", "w")
    proc = subprocess.Popen([sys.executable, str(SEARCH_PY), *argv, "--address", address], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)
    experiment = tmp_path / "ray" / name
    try:
        finished = []
        deadline = time.time() + 240
        while not finished and time.time() < deadline and proc.poll() is None:
            time.sleep(1)
            finished = [p.parent.name for p in experiment.glob("*/result.json")
                        if any(json.loads(line).get("done") for line in p.read_text().splitlines() if line.strip())]
        assert finished, "no trial finished before the deadline:\n" + (tmp_path / "interrupted.log").read_text()[-3000:]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, (tmp_path / "interrupted.log").read_text()[-3000:]  # interrupted, not a success
    finally:
        if proc.poll() is None:
            proc.kill()
    results_before = {t: (experiment / t / "result.json").read_text() for t in finished}

    assert search.main(argv) == 0  # the same command again: resumes
    trials, epochs, _ = read_outputs(tmp_path, name)
    assert len(trials) == 2 and (trials["status"] == "TERMINATED").all() and trials["completed"].all()
    for t in finished:  # the finished trial was not run again: its reports are unchanged
        assert (experiment / t / "result.json").read_text() == results_before[t]
    assert len(epochs) == 2 * 1 and not epochs.duplicated(["trial_id", "epoch"]).any()  # stage-II epochs
    assert len(list(experiment.glob("train_trial_*"))) == 2

    # other settings under the same name are refused instead of silently ignored
    assert search.main([*argv, "--epochs", "3"]) == 2


# --- clusters -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_node_cluster_spreads_trials(cifar10_root, tmp_path, two_nodes):
    name = "two-nodes"
    argv = tiny_argv(cifar10_root, tmp_path, name, "--num-samples", "2", "--address", two_nodes.address,
                     "--scheduler", "none", "--arm", "ce", "--epochs", "1")  # placement is all this tests
    assert search.main(argv) == 0
    trials, _, _ = read_outputs(tmp_path, name)
    assert len(trials) == 2 and trials["completed"].all()
    # one CPU per node and one per trial: the two trials can only run side by side on both nodes
    assert trials["node_id"].nunique() == 2


@pytest.mark.slow
def test_fractional_gpus_pack_trials_on_one_gpu(cifar10_root, tmp_path, gpu_ray):
    name = "gpu-pack"
    argv = tiny_argv(cifar10_root, tmp_path, name, "--gpus-per-trial", "0.25", "--max-concurrent", "4",
                     "--scheduler", "none", "--arm", "ce", "--epochs", "1")  # placement is all this tests
    assert search.main(argv) == 0
    trials, _, _ = read_outputs(tmp_path, name)
    assert len(trials) == 4 and trials["completed"].all()
    # all four trials got Ray's one (logical) GPU; torch sees none here, so they trained on the CPU
    assert (trials["ray_gpu_ids"] == "0").all() and trials["device"].str.startswith("cpu").all()
    # ... at the same time: 0.25 GPU each, so nothing kept one waiting for another
    assert trials["started_at"].max() < trials["ended_at"].min()
