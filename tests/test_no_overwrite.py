"""Issue 25, item 2: nothing replaces a finished or partial result unasked. `python -m risda.train`
refuses an --out that holds a run (exit 2, one line: --resume, a new --out, or --overwrite); a
search or an ablation refuses a results folder of another experiment, or of one that cannot be
resumed any more, unless --restart. Nothing here trains: the trainer and Ray are stubbed."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from risda import train as cli
from risda.trainer.config import ConfigError


@pytest.fixture
def stub_train(monkeypatch):
    """risda.trainer.train replaced: records the calls, writes a new summary."""
    calls = []

    def fake(cfg, **kw):
        calls.append(cfg)
        from pathlib import Path
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text('{"new": true}')
        return {k: 1.0 for k in ("test_error", "many_error", "medium_error", "few_error")}
    import risda.trainer.loop
    monkeypatch.setattr(risda.trainer.loop, "train", fake)
    return calls


def a_run(folder, finished=True):
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"the old run's weights")
    if finished:
        (folder / "summary.json").write_text('{"old": true}')
        (folder / "epochs.parquet").write_bytes(b"old epochs")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("finished, what", [(True, "a finished run (summary.json)"), (False, "a partial run (checkpoint.pt)")])
def test_a_run_is_not_replaced_without_a_word(tmp_path, capsys, stub_train, finished, what):
    out = tmp_path / "R"
    before = a_run(out, finished)
    rc = cli.main(["--arm", "risda", "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and stub_train == [], err
    assert err == (f"error: --out {out} already holds {what}: pass --resume to continue it, a new --out, or "
                   f"--overwrite to replace it")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched


def test_overwrite_replaces_it_on_purpose(tmp_path, capsys, stub_train):
    out = tmp_path / "R"
    a_run(out)
    assert cli.main(["--arm", "risda", "--out", str(out), "--device", "cpu", "--overwrite"]) == 0
    assert len(stub_train) == 1 and json.loads((out / "summary.json").read_text()) == {"new": True}
    assert not (out / "checkpoint.pt").exists() and not (out / "epochs.parquet").exists()  # the old run's, removed first
    assert "--overwrite: removed the earlier run's checkpoint.pt, summary.json, epochs.parquet" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()  # a new or empty --out needs no flag
    assert cli.main(["--out", str(tmp_path / "empty"), "--device", "cpu"]) == 0
    assert cli.main(["--out", str(tmp_path / "new"), "--device", "cpu"]) == 0 and len(stub_train) == 3


def test_overwrite_and_resume_contradict(tmp_path, capsys, stub_train):
    a_run(tmp_path / "R")
    assert cli.main(["--out", str(tmp_path / "R"), "--device", "cpu", "--overwrite", "--resume"]) == 2
    assert "pass one of them" in capsys.readouterr().err and stub_train == []


def test_stage1_only_is_refused_too(tmp_path, capsys, stub_train):
    a_run(tmp_path / "R", finished=False)
    assert cli.main(["--arm", "ce", "--out", str(tmp_path / "R"), "--device", "cpu", "--stage1-only"]) == 2
    assert "already holds a partial run" in capsys.readouterr().err and stub_train == []


# --- results folders of searches and ablations -----------------------------------------------
def results(folder, experiment, table="trials.parquet"):
    folder.mkdir(parents=True)
    pd.DataFrame({"experiment": [experiment], "x": [1]}).to_parquet(folder / table)
    (folder / "best.json").write_text("{}")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_the_owner_rule(tmp_path):
    from risda.runner.results_owner import check_results_owner
    folder = tmp_path / "res" / "x"
    check_results_owner(folder, "/s/x", new=True)  # nothing there yet
    results(folder, "/s/x")
    check_results_owner(folder, "/s/x", new=False)  # resumed: re-collated
    check_results_owner(folder, "/s/x", new=True, restart=True)  # replaced on purpose
    with pytest.raises(ConfigError, match="cannot be resumed .* pass --restart to replace them on purpose"):
        check_results_owner(folder, "/s/x", new=True)
    with pytest.raises(ConfigError, match=r"another experiment \(/s/x\), not of /elsewhere/x: they are kept"):
        check_results_owner(folder, "/elsewhere/x", new=False, restart=True)


def no_ray(monkeypatch):
    import ray
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))


@pytest.mark.parametrize("storage", ["ray-gone", "ray-other"])
def test_a_search_keeps_the_results_of_another_or_a_lost_experiment(cifar10_root, tmp_path, capsys, monkeypatch, storage):
    """results/<name>/ of a finished search, and no Ray experiment to resume in --storage (it was
    removed, or the search ran in another --storage): a new search of that name is refused."""
    from risda.runner import search
    no_ray(monkeypatch)
    recorded = str(tmp_path / storage / "x") if storage == "ray-gone" else "/somewhere/else/x"
    before = results(tmp_path / "res" / "x", recorded)
    rc = search.main(["--dataset", "cifar10lt", "--data-root", str(cifar10_root), "--n-max", "50", "--epochs", "2",
                      "--storage", str(tmp_path / storage), "--results", str(tmp_path / "res"), "--name", "x"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "they are kept" in lines[0], err
    assert {p.name: p.read_bytes() for p in (tmp_path / "res" / "x").iterdir()} == before
    assert not (tmp_path / storage).exists()  # refused before anything was written, the lock included


def test_an_ablation_keeps_the_results_of_a_lost_experiment(cifar10_root, tmp_path, capsys, monkeypatch):
    from risda.runner.ablation import cli as ablation
    no_ray(monkeypatch)
    before = results(tmp_path / "res" / "t", str(tmp_path / "ray" / "t"), table="runs.parquet")
    rc = ablation.main(["--arms", "ce", "--seeds", "0", "--imbalance", "10", "--dataset", "cifar10lt",
                        "--data-root", str(cifar10_root), "--n-max", "50", "--epochs", "2", "--storage",
                        str(tmp_path / "ray"), "--results", str(tmp_path / "res"), "--name", "t"])
    out = capsys.readouterr().out
    assert rc == 2 and "pass --restart to replace them on purpose" in out, out
    assert {p.name: p.read_bytes() for p in (tmp_path / "res" / "t").iterdir()} == before


def test_from_runs_keeps_the_results_of_a_ray_study(tmp_path, capsys):
    """`--from-runs` into a results folder that a Ray study collated: refused (it defaults to the spec's name)."""
    from risda.runner.ablation import cli as ablation
    before = results(tmp_path / "res" / "table5", "/work/ray_results/table5", table="runs.parquet")
    (tmp_path / "runs").mkdir()
    rc = ablation.main(["--from-runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res")])
    out = capsys.readouterr().out
    assert rc == 2 and "holds the results of another experiment (/work/ray_results/table5)" in out, out
    assert {p.name: p.read_bytes() for p in (tmp_path / "res" / "table5").iterdir()} == before
