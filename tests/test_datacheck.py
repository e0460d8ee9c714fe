"""Issue 18, item 7: ablations/run.py checks the data of every planned cell (layout and
long-tailed subset) before Ray starts, with tune/search.py's own check: one line, exit 2."""
from __future__ import annotations

import pytest

from risda.trainer.config import Config
from risda.runner import datacheck


@pytest.fixture
def no_ray(monkeypatch):
    import ray
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before the data was checked"))


def ablation(tmp_path, *flags) -> int:
    from risda.runner.ablation.cli import main
    return main(["--storage", str(tmp_path / "ray"), "--results", str(tmp_path / "res"), "--arms", "ce", "--seeds", "0",
                 "--epochs", "2", "--no-progress", *flags])


def one_line(capsys) -> str:
    out = capsys.readouterr()
    errors = [line for line in (out.out + out.err).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.out + out.err, out
    return errors[0]


def test_a_missing_cifar100_is_one_line_before_ray(tmp_path, capsys, no_ray):
    (tmp_path / "data").mkdir()
    rc = ablation(tmp_path, "--dataset", "cifar100lt", "--data-root", str(tmp_path / "data"), "--imbalance", "100")
    line = one_line(capsys)
    assert rc == 2 and "wrong layout for dataset 'cifar100lt'" in line and "--download" in line


def test_a_cells_long_tailed_subset_is_checked_and_named(cifar10_root, tmp_path, capsys, no_ray):
    rc = ablation(tmp_path, "--dataset", "cifar10lt", "--data-root", str(cifar10_root), "--imbalance", "10,100",
                  "--n-max", "50", "--test-per-class", "10")
    line = one_line(capsys)
    assert rc == 2 and "leaves classes with no image" in line and "the cell with --imbalance 100.0" in line


def test_each_distinct_data_configuration_is_built_once(monkeypatch):
    built = []
    monkeypatch.setattr(datacheck, "load_long_tail", lambda cfg, device: built.append(cfg.imbalance) or _Data())
    cells = [Config(imbalance=i, arm=a, seed=0) for i in (10, 100) for a in ("ce", "risda")]
    assert datacheck.check_cells_data(cells, address=None) == 2 and sorted(built) == [10, 100]


def test_on_a_cluster_data_absent_here_is_left_to_the_nodes(monkeypatch, tmp_path):
    monkeypatch.setattr(datacheck, "load_long_tail", lambda *a: pytest.fail("checked data the driver cannot see"))
    cells = [Config(data_root=str(tmp_path / "only-on-the-nodes"))]
    assert datacheck.check_cells_data(cells, address="10.0.0.1:6379") == 0


class _Data:
    info, num_classes, val = {}, 10, None
