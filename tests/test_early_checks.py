"""Issue 25, item 4: every outside resource and the plan are checked before anything trains (the
Optuna storage, the storage, the stage-I cache, the data, a search with nothing to search), each
fault one line, exit 2, and a refusal leaves no results folder and no lock. Ray is never started
here: ray.init fails the test."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from risda.runner import search


@pytest.fixture
def no_ray(monkeypatch):
    import ray
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started: the fault was found too late"))


def argv(cifar10_root, tmp_path, *extra):
    return ["--dataset", "cifar10lt", "--data-root", str(cifar10_root), "--imbalance", "10", "--n-max", "50",
            "--val-per-class", "5", "--test-per-class", "10", "--epochs", "2", "--num-samples", "2",
            "--storage", str(tmp_path / "ray"), "--results", str(tmp_path / "res"), "--name", "x", *extra]


def one_error(capsys) -> str:
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in out.out + out.err, out
    return lines[0]


def nothing_left(tmp_path):
    """No results folder, no storage folder (so no lock file) after a refusal."""
    assert not (tmp_path / "res").exists() and not (tmp_path / "ray").exists(), sorted(
        str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


def optuna_db(path: Path) -> Path:
    import optuna
    optuna.create_study(storage=f"sqlite:///{path}", study_name="other")
    return path


def corrupt_sqlite(tmp_path):
    (tmp_path / "study.db").write_bytes(b"this is not a database" * 200)
    return f"sqlite:///{tmp_path / 'study.db'}", "file is not a database"


def truncated_sqlite(tmp_path):
    data = optuna_db(tmp_path / "full.db").read_bytes()
    (tmp_path / "study.db").write_bytes(data[: len(data) // 2])
    return f"sqlite:///{tmp_path / 'study.db'}", "malformed"


def corrupt_journal(tmp_path):
    (tmp_path / "study.log").write_text('{"op_code": 0, "worker_id": "w"\n{garbage\n')
    return str(tmp_path / "study.log"), "JSONDecodeError"


@pytest.mark.parametrize("damage", [corrupt_sqlite, truncated_sqlite, corrupt_journal])
def test_a_corrupt_optuna_storage_is_one_line_before_stage1(cifar10_root, tmp_path, capsys, no_ray, damage):
    spec, why = damage(tmp_path)
    file = Path(spec.removeprefix("sqlite:///"))
    before = file.read_bytes()
    rc = search.main(argv(cifar10_root, tmp_path, "--optuna-storage", spec))
    line = one_error(capsys)
    assert rc == 2 and line.startswith(f"error: --optuna-storage {spec} cannot be read (") and why in line, line
    assert line.endswith("move the file aside (Optuna cannot read it) or pass another --optuna-storage")
    assert file.read_bytes() == before  # left as it was
    nothing_left(tmp_path)


def test_a_new_optuna_file_is_not_created_by_a_refused_search(cifar10_root, tmp_path, capsys, no_ray):
    rc = search.main(argv(cifar10_root, tmp_path, "--optuna-storage", f"sqlite:///{tmp_path}/opt/new.db",
                          "--alpha", "0.5", "--beta", "0.5", "--head-count", "2"))
    assert rc == 2 and "nothing to search" in one_error(capsys)
    assert not (tmp_path / "opt").exists()


@pytest.mark.parametrize("flags, said", [
    (["--alpha", "0.1", "--beta", "0.1", "--head-count", "2"], "--alpha, --beta, --head-count fix every parameter"),
    (["--space", "alpha=0.5:0.5, head_count=2|2"], "--space 'alpha=0.5:0.5, head_count=2|2' gives one value for every"),
])
def test_a_search_with_nothing_to_search_is_refused_before_stage1(cifar10_root, tmp_path, capsys, no_ray, flags, said):
    """Every trial would train the same config with the same seeds: N copies of one run. Refused, not run as a grid."""
    rc = search.main(argv(cifar10_root, tmp_path, *flags))
    line = one_error(capsys)
    assert rc == 2 and line.startswith("error: nothing to search: ") and said in line, line
    assert "`python -m risda.train`" in line
    nothing_left(tmp_path)
    args = search.parse_args(["--alpha", "0.1", "--beta", "0.1"])  # one parameter left: a search
    assert search.search_space(args, {"alpha": 0.1, "beta": 0.1}, search.base_config(args), 10) == {"head_count": "1|2|3|4"}


@pytest.mark.parametrize("uri, why", [("nosuch://bucket/x", "ArrowInvalid: Unrecognized filesystem type")])
def test_an_unusable_storage_uri_is_one_line_before_anything(cifar10_root, tmp_path, capsys, no_ray, uri, why):
    rc = search.main([*argv(cifar10_root, tmp_path)[:-6], "--storage", uri, "--results", str(tmp_path / "res"),
                      "--name", "x"])
    line = one_error(capsys)
    assert rc == 2 and line.startswith(f"error: --storage {uri} cannot be used ({why}") and "credentials" in line, line
    assert not (tmp_path / "res").exists()


def test_an_unwritable_stage1_cache_is_one_line(cifar10_root, tmp_path, capsys, no_ray):
    (tmp_path / "a-file").write_text("")
    rc = search.main(argv(cifar10_root, tmp_path, "--stage1-cache", str(tmp_path / "a-file" / "cache")))
    line = one_error(capsys)
    assert rc == 2 and f"--stage1-cache {tmp_path / 'a-file' / 'cache'} is not writable" in line, line
    nothing_left(tmp_path)


@pytest.mark.parametrize("runner", ["search", "ablation"])
def test_a_refusal_after_the_lock_leaves_nothing_behind(tmp_path, capsys, no_ray, runner):
    """Bad data is found once the experiment is held: the results folder, the storage folder and
    the lock file are all gone again (before: an empty results folder and a .lock)."""
    (tmp_path / "data" / "train").mkdir(parents=True)  # an ImageFolder tree with no class folders
    (tmp_path / "data" / "test").mkdir()
    flags = ["--dataset", "cifar10lt", "--data-root", str(tmp_path / "data"), "--epochs", "2", "--storage",
             str(tmp_path / "ray"), "--results", str(tmp_path / "res"), "--name", "x"]
    if runner == "search":
        rc = search.main(flags)
    else:
        from risda.runner.ablation import cli
        rc = cli.main([*flags, "--arms", "ce", "--seeds", "0", "--imbalance", "10"])
    assert rc == 2 and one_error(capsys)
    nothing_left(tmp_path)


def test_a_bad_stage1_entry_is_moved_aside_before_ray_starts(cifar10_root, tmp_path, capsys, monkeypatch):
    import ray

    from risda.trainer.stage1 import Stage1Cache, stage1_key, stage1_training_config

    class RayStarts(Exception):
        pass

    def init(*a, **k):
        raise RayStarts
    monkeypatch.setattr(ray, "init", init)
    flags = argv(cifar10_root, tmp_path)
    cfg = search.base_config(search.parse_args(flags))
    cache = Stage1Cache(str(tmp_path / "ray" / "stage1"))
    (tmp_path / "w.pt").write_bytes(b"weights" * 1000)
    cache.store(stage1_training_config(cfg.resolved()), tmp_path / "w.pt", {"observations": False})
    entry = Path(cache.entry(stage1_key(cfg.resolved())))
    (entry / "stage1.json").write_text((entry / "stage1.json").read_text()[:40])  # cut short
    with pytest.raises(RayStarts):
        search.main(flags)
    err = capsys.readouterr().err
    assert f"stage-I cache entry {entry}: stage1.json is not readable JSON" in " ".join(err.split()), err
    assert not (entry / "stage1.json").exists() and len(list(entry.parent.glob(f"{entry.name}.bad-*/*"))) == 2


def test_a_sqlite_storage_that_is_fine_is_kept(tmp_path):
    db = optuna_db(tmp_path / "ok.db")
    assert search.check_optuna_storage(f"sqlite:///{db}") is not None
    assert sqlite3.connect(db).execute("select count(*) from studies").fetchone() == (1,)
