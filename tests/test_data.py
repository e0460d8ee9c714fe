"""Long-tailed subsets, sources and batch augmentation."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from risda.trainer.augment import CIFAR_MEAN, CIFAR_STD, normalize, random_crop_flip
from risda.trainer.config import Config, ConfigError
from risda.trainer.data import load_long_tail, long_tail_counts, long_tail_indices
from risda.trainer.evaluate import shot_groups


def test_cifar100_lt_counts_match_ldam_drw():
    counts = long_tail_counts(500, 100, 100)
    assert sum(counts) == 10847 and counts[0] == 500 and counts[-1] == 5
    assert [sum(long_tail_counts(500, 100, lam)) for lam in (200, 50, 10)] == [9502, 12608, 19573]


def test_cifar10_lt_count():
    assert sum(long_tail_counts(5000, 10, 100)) == 12406


def test_subset_is_ldam_drw_procedure_and_reproducible():
    labels = np.repeat(np.arange(10), 50)
    np.random.default_rng(3).shuffle(labels)
    counts = long_tail_counts(50, 10, 10)
    train, val = long_tail_indices(labels, counts, 0, seed=0)
    # LDAM-DRW's own code: np.random.seed(0), then per class np.random.shuffle(idx)[:n].
    np.random.seed(0)
    expected = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        expected.append(idx[:n])
    assert np.array_equal(train, np.concatenate(expected)) and len(val) == 0
    again, _ = long_tail_indices(labels, counts, 0, seed=0)
    other, _ = long_tail_indices(labels, counts, 0, seed=1)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_validation_split_is_balanced_and_disjoint():
    labels = np.repeat(np.arange(5), 40)
    train, val = long_tail_indices(labels, long_tail_counts(30, 5, 10), 8, seed=0)
    assert np.bincount(labels[val]).tolist() == [8] * 5
    assert not set(train) & set(val)
    assert np.bincount(labels[train]).tolist() == long_tail_counts(30, 5, 10)


def test_shot_groups_cifar100_lt():
    groups = shot_groups(long_tail_counts(500, 100, 100))
    assert [len(groups[g]) for g in ("many", "medium", "few")] == [35, 35, 30]


def write_cifar100_pickle(root, n_train=600, n_test=200, seed=0):
    """A small CIFAR-100 in torchvision's exact python-pickle format."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 100
        entry = {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": f"{name} batch",
                 "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(),
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)],
                     "coarse_label_names": [f"super{i}" for i in range(20)]}, fh, protocol=2)
    return folder


def test_cifar100_pickle_source(tmp_path):
    folder = write_cifar100_pickle(tmp_path)
    cfg = Config(dataset="cifar100lt", data_root=str(tmp_path), imbalance=6, device="cpu")
    data = load_long_tail(cfg.resolved(), torch.device("cpu"))
    assert data.class_counts == long_tail_counts(6, 100, 6) and data.num_classes == 100
    assert len(data.test) == 200 and data.class_names[3] == "class3"
    with open(folder / "train", "rb") as fh:  # pixel layout: row-major 3x32x32 per image
        raw = pickle.load(fh, encoding="latin1")
    first = data.train.images[0].numpy()
    matches = (raw["data"].reshape(-1, 3, 32, 32) == first).all(axis=(1, 2, 3))
    assert matches.any()


def test_real_cifar10_tree(cifar10_root):
    cfg = Config(dataset="cifar10lt", data_root=str(cifar10_root), imbalance=100, val_per_class=10, device="cpu")
    data = load_long_tail(cfg.resolved(), torch.device("cpu"))
    assert sum(data.class_counts) == len(data.train) == sum(long_tail_counts(4990, 10, 100))
    assert len(data.val) == 100 and len(data.test) == 10000
    assert data.train.images.dtype == torch.uint8 and tuple(data.train.images.shape[1:]) == (3, 32, 32)
    assert data.class_names[0] == "airplane" and data.class_names[-1] == "truck"
    x = normalize(data.test.images, CIFAR_MEAN, CIFAR_STD)
    # The field's std constants are per-image-mean stds, so the pixel std lands near 1.2.
    assert x.mean((0, 2, 3)).abs().max() < 0.05 and ((x.std((0, 2, 3)) > 1) & (x.std((0, 2, 3)) < 1.35)).all()


def test_generic_imagefolder_resizes_and_keeps_tree(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", (6, 3)), ("test", (2, 2))):
        for c, k in enumerate(n):
            d = tmp_path / split / f"cls{c}"
            d.mkdir(parents=True)
            for i in range(k):
                mode, shape = ("L", (20 + i, 28)) if i == 0 else ("RGB", (20 + i, 28, 3))  # grey and RGB
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(d / f"{i}.png")
    cfg = Config(dataset="imagefolder", data_root=str(tmp_path), imbalance=1, image_size=16,
                 cache_dir=str(tmp_path / "cache"), device="cpu")
    data = load_long_tail(cfg.resolved(), torch.device("cpu"))
    assert data.class_counts == [6, 3] and tuple(data.train.images.shape) == (9, 3, 16, 16)
    assert any((tmp_path / "cache").iterdir())  # decoded once, cached


def test_two_writers_of_one_decode_cache_do_not_collide(tmp_path, monkeypatch):
    """Two trials on one node decode the same tree at once (CI saw the second one's rename fail):
    a second writer saving and renaming between the first one's save and rename must not break it."""
    from PIL import Image
    import risda.trainer.data as data_module
    for c in range(2):
        (tmp_path / "train" / f"c{c}").mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 40 * c, np.uint8)).save(tmp_path / "train" / f"c{c}" / "0.png")
    real_savez, nested = np.savez, []

    def savez_then_other_writer(path, **arrays):
        real_savez(path, **arrays)
        if not nested:  # the other trial writes and renames its copy now
            nested.append(True)
            data_module.read_image_tree(tmp_path / "train", 8, str(tmp_path / "cache"))

    monkeypatch.setattr(data_module.np, "savez", savez_then_other_writer)
    images, labels, classes = data_module.read_image_tree(tmp_path / "train", 8, str(tmp_path / "cache"))
    assert nested and classes == ["c0", "c1"] and labels.tolist() == [0, 1] and images.shape == (2, 3, 8, 8)
    assert [p.name.endswith(".tmp.npz") for p in (tmp_path / "cache").iterdir()] == [False]  # one cache, no leftovers


def test_batch_augmentation_keeps_shapes_and_pixels():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(images, g, pad=4)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images.float(), (4, 4, 4, 4))
    for i in range(8):  # every output is a 32x32 window of the padded image, maybe mirrored
        windows = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    same = random_crop_flip(images, torch.Generator().manual_seed(0), pad=4)
    assert torch.equal(out, same)
    flips = random_crop_flip(images, g, pad=0)  # pad 0: only flips, pixel statistics unchanged
    assert torch.allclose(flips.mean((2, 3)), images.float().mean((2, 3)))
    assert 0 < (flips != images.float()).flatten(1).any(1).float().mean() < 1


def test_augmented_batches_keep_statistics(cifar10_root):
    cfg = Config(dataset="cifar10lt", data_root=str(cifar10_root), imbalance=1, n_max=200, device="cpu")
    data = load_long_tail(cfg.resolved(), torch.device("cpu"))
    plain = torch.cat([x for x, _ in data.train.batches(500, train=False)])
    aug = torch.cat([x for x, _ in data.train.batches(500, train=True, generator=torch.Generator().manual_seed(0))])
    assert aug.shape == plain.shape
    # A crop offset d ~ U{0..8} leaves |d-4| zero-padded rows (mean 20/9), the same for columns:
    # the expected padded fraction p mixes the zero pixel's normalised value into the mean.
    a = (20 / 9) / 32
    p = 1 - (1 - a) ** 2
    zero = -torch.tensor(CIFAR_MEAN) / torch.tensor(CIFAR_STD)
    expected = (1 - p) * plain.mean((0, 2, 3)) + p * zero
    assert (aug.mean((0, 2, 3)) - expected).abs().max() < 0.03


@pytest.mark.parametrize("overrides, message", [
    (dict(dataset="cifar1000lt"), "unknown dataset"),
    (dict(imbalance=0.5), "imbalance must be >= 1"),
    (dict(stage1_epochs=2, epochs=2), "stage-I epochs"),
])
def test_bad_config_is_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Config(**overrides).validate()


def test_missing_data_root(tmp_path):
    cfg = Config(dataset="cifar10lt", data_root=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="does not exist.*--download"):
        load_long_tail(cfg.resolved(), torch.device("cpu"))


def test_wrong_layout_names_expected_layout(tmp_path):
    (tmp_path / "images").mkdir()
    cfg = Config(dataset="cifar10lt", data_root=str(tmp_path))
    with pytest.raises(ConfigError, match=r"wrong layout.*cifar-10-batches-py.*<root>/train/<class>"):
        load_long_tail(cfg.resolved(), torch.device("cpu"))


def test_n_max_larger_than_data(cifar10_root):
    cfg = Config(dataset="cifar10lt", data_root=str(cifar10_root), n_max=6000)
    with pytest.raises(ConfigError, match="larger than the data.*--n-max"):
        load_long_tail(cfg.resolved(), torch.device("cpu"))


def test_wrong_class_count(cifar10_root):
    cfg = Config(dataset="cifar100lt", data_root=str(cifar10_root))
    with pytest.raises(ConfigError, match="100 classes.*has 10"):
        load_long_tail(cfg.resolved(), torch.device("cpu"))


@pytest.mark.parametrize("damage", ["no test file", "truncated train", "no meta"])
def test_a_half_unpacked_cifar100_is_one_line_exit_2_before_any_work(tmp_path, damage, capsys):
    """The shared copy unpacked only in part (tar stopped early): one line naming the folder and the
    fix, exit 2, from the command line, before any training."""
    from risda.trainer.cli import main
    folder = write_cifar100_pickle(tmp_path)
    if damage == "no test file":
        (folder / "test").unlink()
    elif damage == "truncated train":
        data = (folder / "train").read_bytes()
        (folder / "train").write_bytes(data[: len(data) // 2])
    else:
        (folder / "meta").unlink()
    code = main(["--dataset", "cifar100lt", "--data-root", str(tmp_path), "--imbalance", "6", "--epochs", "2",
                 "--device", "cpu", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert str(folder) in err[0] and "unpack its archive again" in err[0]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
