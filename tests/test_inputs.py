"""Issue 10: every input is checked before any work, and a bad one gives exit code 2 and one
line `error: <message>` naming the flag or file and the fix (the traceback only with --debug).
Nothing here trains: each error comes before the first epoch."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from risda.trainer.checkpoint import check_checkpoint, load_checkpoint, save_checkpoint
from risda.trainer.config import Config, ConfigError, parse_field
from risda.trainer.data import load_long_tail
from risda.runner.ablation.spec import apply_overrides, coerce, expand, load_spec
from risda.trainer.cli import main

CPU = torch.device("cpu")


def cli_error(capsys, *flags) -> str:
    """Run `python -m risda.train` in-process; assert exit 2 and one line `error: ...`; return it."""
    capsys.readouterr()
    rc = main(["--device", "cpu", "--no-progress", *flags])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# --- numbers: finite and in range -----------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr must be > 0"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--beta", "nan"], "--beta must be >= 0"),
    (["--alpha", "inf"], "--alpha must be >= 0"),
    (["--alpha", "-0.5"], "--alpha must be >= 0"),
    (["--weight-decay", "inf"], "--weight-decay must be >= 0"),
    (["--imbalance", "nan"], "--imbalance must be >= 1"),
    (["--imbalance", "0.5"], "imbalance must be >= 1"),
    (["--test-per-class", "0"], "--test-per-class must be an integer >= 1"),
    (["--test-per-class", "-1"], "--test-per-class must be an integer >= 1"),
    (["--n-max", "0"], "--n-max must be an integer >= 1"),
    (["--val-per-class", "-1"], "--val-per-class must be an integer >= 0"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--momentum", "nan"], "--momentum must be in [0, 1)"),
    (["--momentum", "0"], "--nesterov needs a momentum"),
    (["--lr-decay", "0"], "--lr-decay must be > 0"),
    (["--lr-decay", "nan"], "--lr-decay must be > 0"),
    (["--cb-gamma", "1"], "--cb-gamma must be in [0, 1)"),
    (["--cb-gamma", "nan"], "--cb-gamma must be in [0, 1)"),
    (["--image-size", "4"], "--image-size must be an integer >= 8"),
    (["--num-workers", "-1"], "--num-workers must be an integer >= 0"),
    (["--lr-milestones=-1,5"], "--lr-milestones must be epochs >= 0"),
    (["--stage1-epochs=-1"], "--stage1-epochs must be an integer >= 0"),
    (["--epochs", "10", "--stage1-epochs", "10"], "stage-I epochs"),
    (["--warmup-epochs=-1"], "--warmup-epochs must be an integer >= 0"),
    (["--head-count=-1"], "--head-count must be an integer >= 0"),
    (["--head-min-count=-1"], "--head-min-count must be an integer >= 0"),
    (["--graph-topk", "0"], "--graph-topk must be an integer >= 1"),
    (["--epochs", "0"], "--epochs must be an integer >= 1"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--eval-every", "0"], "--eval-every must be an integer >= 1"),
    (["--seed=-1"], "--seed must be an integer in [0, 4294967295]"),
    (["--subset-seed=-1"], "--subset-seed must be an integer in [0, 4294967295]"),
    (["--covariance", "lowrank:0"], "unknown covariance"),
    (["--device", "tpu9"], "--device tpu9"),
])
def test_bad_numbers_fail_before_any_work(capsys, tmp_path, flags, message):
    line = cli_error(capsys, "--data-root", str(tmp_path / "never-read"), *flags)
    assert message in line
    assert "does not exist" not in line  # the config is checked before the data is looked at


def test_config_without_the_cli_is_checked_the_same():
    for bad in (dict(lr=float("nan")), dict(epochs=2.0), dict(nesterov="false"), dict(test_per_class=0)):
        with pytest.raises(ConfigError, match="^--"):
            Config(**bad).validate()
    Config().validate()
    Config(test_per_class=1, lr_milestones=(), momentum=0.0, nesterov=False, alpha=0.0).validate()


def test_a_value_argparse_cannot_read_gets_argparses_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--lr", "fast"])
    assert e.value.code == 2 and "argument --lr: invalid float value: 'fast'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--lr-milestones", "160,1.5"])
    assert "argument --lr-milestones: invalid" in capsys.readouterr().err


def test_debug_shows_the_traceback():
    with pytest.raises(ConfigError, match="--lr must be > 0"):
        main(["--lr", "nan", "--debug"])


# --- the one field parser ---------------------------------------------------------------------
def test_parse_field():
    assert parse_field("lr", " 0.05 ") == 0.05 and parse_field("epochs", "20") == 20
    for word, value in (("true", True), ("Yes", True), ("on", True), ("1", True),
                        ("false", False), ("NO", False), ("off", False), ("0", False)):
        assert parse_field("nesterov", word) is value
    assert parse_field("graph_topk", "none") is None and parse_field("test_per_class", "None") is None
    assert parse_field("lr_milestones", "160,180") == (160, 180)
    assert parse_field("arm", "ce") == "ce"
    with pytest.raises(ConfigError, match=r"--nesterov 'flase': expected true or false"):
        parse_field("nesterov", "flase")
    with pytest.raises(ConfigError, match=r"--epochs '2.5': expected an integer"):
        parse_field("epochs", "2.5")
    with pytest.raises(ConfigError, match=r"--epochs 'none'"):  # not optional
        parse_field("epochs", "none")
    with pytest.raises(ConfigError, match="unknown config field 'lrr'.*valid fields are.*lr_milestones"):
        parse_field("lrr", "1")


def test_search_space_uses_the_field_parser():
    from risda.runner import search
    with pytest.raises(ConfigError, match=r"--space nesterov=true\|flase: --nesterov 'flase'"):
        search.parse_space("nesterov=true|flase")
    assert search.optuna_distribution("nesterov", "true|off").choices == (True, False)
    assert search.optuna_distribution("graph_topk", "none|5").choices == (None, 5)


@pytest.mark.parametrize("entry, message", [
    ("alpha=0:nan", "--space alpha=0:nan: --alpha must be >= 0 (paper: 0.5), got nan"),
    ("lr=0:0.1", "--space lr=0:0.1: --lr must be > 0 (paper: 0.1), got 0.0"),
    ("beta=-1:1", "--beta must be >= 0"),
    ("head_count=-2|3", "--head-count must be an integer >= 0, got -2"),
    ("cb_gamma=0.9:inf:log", "--cb-gamma must be in [0, 1)"),
    ("alpha=1:0.5", "low <= high"),
])
def test_search_space_bounds_are_checked_as_run_flags_are(entry, message):
    from risda.runner import search
    with pytest.raises(ConfigError) as e:
        search.parse_space(entry)
    assert message in str(e.value)


def test_ablation_grid_uses_the_field_parser():
    spec, flags, _ = apply_overrides(load_spec("table5"), {"graph_topk": ["none", "5"], "arm": ["risda"],
                                                            "imbalance": ["100"], "seed": ["0"]})
    assert spec.grid["graph_topk"] == [None, 5]
    cells, _ = expand(spec, flags)
    assert [c.config["graph_topk"] for c in cells] == [None, 5]
    with pytest.raises(ConfigError, match="grid axis 'nesterov': --nesterov 'flase'"):
        apply_overrides(load_spec("table5"), {"nesterov": ["true", "flase"]})
    # spec values that are already typed keep their meaning
    assert coerce("imbalance", 200) == 200.0 and isinstance(coerce("imbalance", 200), float)
    assert coerce("nesterov", True) is True and coerce("head_count", 20.0) == 20
    assert coerce("graph_topk", float("nan")) is None  # a parquet column of an optional field


@pytest.mark.parametrize("argv, message", [
    (["--imbalance", "0"], "--imbalance must be >= 1"),
    (["--imbalance=-5"], "--imbalance must be >= 1"),
    (["--seeds=-1"], "--seed must be an integer"),
    (["--grid", "nesterov=true,flase"], "--nesterov 'flase'"),
    (["--grid", "lr=nan"], "--lr must be > 0"),
])
def test_ablation_grid_values_are_validated_first(capsys, argv, message):
    from risda.runner.ablation import cli as run
    assert run.main([*argv, "--dry-run"]) == 2
    out = capsys.readouterr().out
    assert "error:" in out and message in " ".join(out.split()) and "Traceback" not in out


@pytest.mark.parametrize("runner", ["search", "ablation"])
@pytest.mark.parametrize("flag", ["--results", "--storage"])
def test_an_unwritable_output_path_is_an_error_before_ray_starts(cifar10_root, tmp_path, capsys, runner, flag):
    import ray
    from risda.runner import search
    from risda.runner.ablation import cli as ablation
    (tmp_path / "a-file").write_text("")
    paths = {"--results": str(tmp_path / "results"), "--storage": str(tmp_path / "ray"), flag: str(tmp_path / "a-file" / "x")}
    argv = ["--dataset", "cifar10lt", "--data-root", str(cifar10_root), "--imbalance", "10", "--n-max", "100",
            "--test-per-class", "5", "--epochs", "2", *[x for kv in paths.items() for x in kv]]
    if runner == "search":
        code = search.main([*argv, "--num-samples", "1"])
    else:
        code = ablation.main([*argv, "--arms", "ce", "--seeds", "0", "--no-progress"])
    captured = capsys.readouterr()
    out = " ".join((captured.out + captured.err).split())
    assert code == 2 and f"{flag} {tmp_path / 'a-file' / 'x'}" in out and "not writable" in out, out
    assert "Traceback" not in out and not ray.is_initialized()


def test_ablation_grid_none_for_an_optional_field(capsys):
    from risda.runner.ablation import cli as run
    assert run.main(["--grid", "graph_topk=none,3", "--arms", "risda", "--imbalance", "100", "--seeds", "0", "--dry-run"]) == 0
    assert "2 trials" in capsys.readouterr().out


# --- image trees ------------------------------------------------------------------------------
def image_tree(root: Path, src: Path, per_class=(4, 3)) -> Path:
    """A tiny ImageFolder tree of real CIFAR-10 JPEGs: train/<class>/*, test/<class>/*."""
    for split, n_test in (("train", None), ("test", 2)):
        for c, name in enumerate(("cat", "dog")):
            d = root / split / name
            d.mkdir(parents=True)
            for f in sorted((src / split / name).iterdir())[:n_test or per_class[c]]:
                shutil.copy(f, d / f.name)
    return root


def tree_flags(root: Path, tmp_path: Path) -> list[str]:
    return ["--dataset", "imagefolder", "--data-root", str(root), "--imbalance", "1", "--epochs", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_jpeg_names_the_file(cifar10_root, tmp_path, capsys, damage):
    root = image_tree(tmp_path / "tree", cifar10_root)
    bad = sorted((root / "train" / "dog").iterdir())[1]
    data = bad.read_bytes()
    bad.write_bytes({"garbage": b"not a jpeg at all" * 10, "truncated": data[:len(data) // 3], "empty": b""}[damage])
    line = cli_error(capsys, *tree_flags(root, tmp_path))
    assert f"cannot read image {bad}" in line and "delete or replace the file" in line
    assert not (tmp_path / "run").exists()  # stopped before the trainer made its output folder


def test_corrupt_jpeg_is_found_after_the_tree_was_cached(cifar10_root, tmp_path):
    root = image_tree(tmp_path / "tree", cifar10_root)
    cfg = Config(dataset="imagefolder", data_root=str(root), imbalance=1, cache_dir=str(tmp_path / "cache"))
    assert load_long_tail(cfg.resolved(), CPU).class_counts == [4, 3]
    caches = sorted((tmp_path / "cache").iterdir())
    assert len(caches) == 2
    for cache in caches:  # a damaged cache file is decoded again, not a traceback
        cache.write_bytes(b"PK\x03\x04 torn")
    assert load_long_tail(cfg.resolved(), CPU).class_counts == [4, 3]
    bad = sorted((root / "train" / "cat").iterdir())[0]
    bad.write_bytes(b"garbage")  # new size and mtime: the cache key changes, the tree is decoded again
    with pytest.raises(ConfigError, match=f"cannot read image {bad}"):
        load_long_tail(cfg.resolved(), CPU)


def test_empty_class_folder_is_named(cifar10_root, tmp_path, capsys):
    root = image_tree(tmp_path / "tree", cifar10_root)
    for f in (root / "train" / "dog").iterdir():
        f.unlink()
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    line = cli_error(capsys, *tree_flags(root, tmp_path))
    assert f"class folder {root / 'train' / 'dog'} has no images" in line
    assert "--val-per-class" not in line


def test_disk_dataset_unreadable_image_before_training_and_in_a_worker(cifar10_root, tmp_path):
    from risda.trainer.data_disk import DiskSplit
    root = tmp_path / "inlt"
    rows = {"train": [], "val": [], "test": []}
    for label, name in enumerate(("cat", "dog")):
        for k, f in enumerate(sorted((cifar10_root / "train" / name).iterdir())[:4]):
            rel = f"train/{name}/{f.name}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / rel)
            rows["train" if k < 2 else "val" if k == 2 else "test"].append(f"{rel} {label}")
    for split, lines in rows.items():
        (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(lines) + "\n")
    bad = root / rows["val"][1].split()[0]
    bad.write_bytes(b"garbage")
    cfg = Config(dataset="imagenetlt", data_root=str(root), model="resnet50", image_size=32, num_workers=0)
    with pytest.raises(ConfigError, match=f"cannot read image {bad}.*delete or replace"):
        load_long_tail(cfg.resolved(), CPU)
    # met during a run (outside the checked sample), in a DataLoader worker: still one line
    split = DiskSplit(str(root), [rows["train"][0].split()[0], rows["val"][1].split()[0]], torch.tensor([0, 1]).numpy(),
                      CPU, 32, num_workers=1)
    with pytest.raises(ConfigError) as e:
        list(split.batches(2, train=False))
    assert str(e.value).startswith(f"cannot read image {bad}") and "\n" not in str(e.value)


# --- --resume -------------------------------------------------------------------------------
def resume_flags(tmp_path: Path) -> list[str]:
    return ["--out", str(tmp_path / "run"), "--epochs", "2", "--data-root", str(tmp_path / "never-read")]


def write_checkpoint(tmp_path: Path) -> Path:
    """The checkpoint a CLI run with resume_flags would have written after epoch 0."""
    cfg = Config(out=str(tmp_path / "run"), epochs=2, data_root=str(tmp_path / "never-read"),
                 device="cpu", progress=False).resolved()
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint(path, cfg, epoch=0, elapsed=1.0, history=[], model={"w": torch.zeros(4096)},
                    optimizer={}, objective={}, stage1_info={})
    assert check_checkpoint(path, cfg.resolved())["epoch"] == 0
    return path


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "foreign"])
def test_unreadable_checkpoint_names_the_file(tmp_path, capsys, damage):
    path = write_checkpoint(tmp_path)
    data = path.read_bytes()
    if damage == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        path.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"\x00" * 64, "empty": b""}[damage])
    line = cli_error(capsys, *resume_flags(tmp_path), "--resume")
    assert str(path) in line and "delete it" in line and "drop --resume" in line


def test_resume_with_a_changed_flag_is_a_config_error(tmp_path, capsys):
    path = write_checkpoint(tmp_path)
    line = cli_error(capsys, *resume_flags(tmp_path), "--lr", "0.05", "--resume")
    assert f"cannot resume from {path}: the config changed (--lr: 0.1 -> 0.05)" in line
    cfg = Config(out=str(tmp_path / "run"), epochs=2, lr=0.05, data_root=str(tmp_path / "never-read")).resolved()
    with pytest.raises(ConfigError, match="config changed"):
        load_checkpoint(path, cfg.resolved())


def test_resume_without_a_checkpoint(tmp_path, capsys):
    line = cli_error(capsys, *resume_flags(tmp_path), "--resume")
    assert f"no checkpoint at {tmp_path / 'run' / 'checkpoint.pt'}" in line and "drop --resume" in line
