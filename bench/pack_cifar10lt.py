"""Pack the CIFAR-10-LT subset into one small .npz that travels to a GPU machine, and unpack it
there into torchvision's CIFAR pickle folder, which `--dataset cifar10lt` reads as it is.

    python bench/pack_cifar10lt.py                        # -> data/cifar10lt_r100.npz (~21 MB)
    python bench/pack_cifar10lt.py --unpack data/cifar10lt_r100.npz --to /tmp/c10lt
    python -m risda.train --dataset cifar10lt --data-root /tmp/c10lt --imbalance 100 ...
    python bench/pack_cifar10lt.py --smoke                # pack a tiny subset and unpack it, in a temp folder

The pack holds the JPEG bytes (as they are in ../shared/data/cifar10-jpeg, ~0.9 kB each) of
only the training images that risda.trainer.data's LDAM-DRW subsampling can pick for this imbalance
and subset seed with any --val-per-class up to --val-max, plus the test images. The unpacked
folder has all 50,000 training slots in the JPEG tree's order (class by class, file name
order), the unused ones black, so the trainer's own subsampling with the same --imbalance,
--subset-seed, --n-max and --val-per-class <= val-max picks exactly the images it would pick
from the JPEG tree, with the same pixels (decoded by the same torchvision call). Unpacking
checks that, and refuses settings the pack does not cover.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

from risda.trainer.data import list_image_tree, long_tail_counts, long_tail_indices

REPO = Path(__file__).resolve().parents[1]

PER_BATCH = 10_000  # images per data_batch_N file (torchvision's CIFAR-10 layout)


def jpeg_blob(files) -> tuple[np.ndarray, np.ndarray]:
    data = [Path(f).read_bytes() for f in files]
    offsets = np.cumsum([0] + [len(d) for d in data]).astype(np.int64)
    return np.frombuffer(b"".join(data), dtype=np.uint8), offsets


def packed_positions(labels: np.ndarray, imbalance: float, n_max: int | None, seed: int, val_max: int) -> np.ndarray:
    """Every training index risda.trainer.data can pick with --val-per-class 0..val_max: per class the
    first val_max + n_c of its seeded shuffle, n_c from the largest n_max any of them uses."""
    num_classes = int(labels.max()) + 1
    n_top = n_max if n_max is not None else int(np.bincount(labels).min())
    counts = long_tail_counts(n_top, num_classes, imbalance)
    train, val = long_tail_indices(labels, counts, val_max, seed)
    return np.sort(np.concatenate([train, val]))


def pack(src: Path, out: Path, imbalance: float, n_max: int | None, seed: int, val_max: int,
         test_per_class: int | None) -> None:
    t0 = time.time()
    train_files, train_labels, classes = list_image_tree(src / "train")
    test_files, test_labels, test_classes = list_image_tree(src / "test")
    assert classes == test_classes, "train and test class folders differ"
    positions = packed_positions(train_labels, imbalance, n_max, seed, val_max)
    test_idx = np.arange(len(test_labels))
    if test_per_class is not None:
        test_idx = np.concatenate([np.where(test_labels == c)[0][:test_per_class] for c in range(len(classes))])
    train_jpeg, train_offsets = jpeg_blob([train_files[i] for i in positions])
    test_jpeg, test_offsets = jpeg_blob([test_files[i] for i in test_idx])
    meta = dict(source=str(src), imbalance=imbalance, n_max=n_max, subset_seed=seed, val_max=val_max,
                test_per_class=test_per_class, train_pool=len(train_labels), packed_train=len(positions),
                test=len(test_idx), classes=classes)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, train_jpeg=train_jpeg, train_offsets=train_offsets, train_positions=positions,
             train_labels=train_labels.astype(np.uint8), test_jpeg=test_jpeg, test_offsets=test_offsets,
             test_labels=test_labels[test_idx].astype(np.uint8), meta=np.array(json.dumps(meta)))
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB, {len(positions)} of {len(train_labels)} training images "
          f"(λ={imbalance:g}, n_max={n_max}, subset seed {seed}, val-per-class <= {val_max}), {len(test_idx)} test "
          f"({time.time() - t0:.1f}s)")


def decode(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The same call risda.trainer.data.decode_images makes on each file's bytes -> N×3×32×32 uint8."""
    import torch
    from torchvision.io import ImageReadMode, decode_image
    out = np.empty((len(offsets) - 1, 3, 32, 32), dtype=np.uint8)
    for i in range(len(out)):
        data = torch.from_numpy(blob[offsets[i]:offsets[i + 1]].copy())
        out[i] = decode_image(data, mode=ImageReadMode.RGB).numpy()
    return out


def check_covered(z, meta: dict, val_per_class: int, n_max: int | None) -> None:
    """Raise unless risda.trainer.data's selection for these settings lies inside the pack."""
    labels = z["train_labels"].astype(np.int64)
    if val_per_class > meta["val_max"]:
        raise SystemExit(f"the pack covers --val-per-class <= {meta['val_max']}, not {val_per_class}: repack with --val-max")
    pool = np.bincount(labels) - val_per_class
    n = n_max if n_max is not None else int(pool.min())
    train, val = long_tail_indices(labels, long_tail_counts(n, len(pool), meta["imbalance"]), val_per_class, meta["subset_seed"])
    missing = np.setdiff1d(np.concatenate([train, val]), z["train_positions"])
    if len(missing):
        raise SystemExit(f"--n-max {n_max} / --val-per-class {val_per_class} pick {len(missing)} images the pack lacks "
                         f"(packed for n_max={meta['n_max']}); repack with matching settings")


def unpack(path: Path, to: Path, val_per_class: list[int]) -> dict:
    t0 = time.time()
    with np.load(path) as z:
        z = dict(z)
    meta = json.loads(str(z["meta"]))
    for v in val_per_class:
        check_covered(z, meta, v, meta["n_max"])
    labels = z["train_labels"].astype(np.int64)
    images = np.zeros((len(labels), 3 * 32 * 32), dtype=np.uint8)  # unused slots stay black
    images[z["train_positions"]] = decode(z["train_jpeg"], z["train_offsets"]).reshape(-1, 3072)
    test = decode(z["test_jpeg"], z["test_offsets"]).reshape(-1, 3072)
    folder = to / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for b in range(0, len(labels), PER_BATCH):
        with open(folder / f"data_batch_{b // PER_BATCH + 1}", "wb") as fh:
            pickle.dump({"data": images[b:b + PER_BATCH], "labels": labels[b:b + PER_BATCH].tolist()}, fh)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": test, "labels": z["test_labels"].astype(np.int64).tolist()}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": meta["classes"]}, fh)
    flags = f"--dataset cifar10lt --data-root {to} --imbalance {meta['imbalance']:g} --subset-seed {meta['subset_seed']}"
    if meta["n_max"] is not None:
        flags += f" --n-max {meta['n_max']}"
    print(f"{folder}: {meta['packed_train']} training images in {len(labels)} slots, {len(test)} test "
          f"({time.time() - t0:.1f}s); train with {flags} [--val-per-class <= {meta['val_max']}]")
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=REPO.parent / "shared" / "data" / "cifar10-jpeg", help="CIFAR-10 JPEG tree")
    p.add_argument("--out", type=Path, default=REPO / "data" / "cifar10lt_r100.npz")
    p.add_argument("--imbalance", type=float, default=100.0)
    p.add_argument("--n-max", type=int, default=None, help="as the trainer's --n-max (default: 5000, all)")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--val-max", type=int, default=50, help="largest --val-per-class the pack serves (tune/search.py uses 20)")
    p.add_argument("--test-per-class", type=int, default=None, help="cap the packed test set (default: all 1,000 per class)")
    p.add_argument("--unpack", type=Path, default=None, help="unpack this .npz instead of packing")
    p.add_argument("--to", type=Path, default=None, help="with --unpack: the --data-root to create")
    p.add_argument("--check-val", default="0,20", help="with --unpack: --val-per-class values to check the pack covers")
    p.add_argument("--smoke", action="store_true", help="pack a tiny subset (10 images a class, 5 test) into a temp "
                                                         "folder and unpack it there: checks the script (the test suite)")
    args = p.parse_args(argv)
    if args.unpack is not None:
        if args.to is None:
            p.error("--unpack needs --to DIR")
        unpack(args.unpack, args.to, [int(v) for v in args.check_val.split(",") if v])
        return 0
    if not (args.src / "train").is_dir():
        p.error(f"{args.src} is not the CIFAR-10 JPEG tree (train/<class>/*.jpg, test/<class>/*.jpg)")
    if args.smoke:
        return smoke(args.src)
    pack(args.src, args.out, args.imbalance, args.n_max, args.subset_seed, args.val_max, args.test_per_class)
    return 0


def smoke(src: Path) -> int:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        pack(src, Path(tmp) / "tiny.npz", 10.0, 10, 0, 2, 5)
        unpack(Path(tmp) / "tiny.npz", Path(tmp) / "unpacked", [0, 2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
