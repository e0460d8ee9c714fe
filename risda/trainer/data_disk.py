"""ImageNet-LT and iNaturalist 2018: long-tailed datasets read from disk, too large for memory.

Images are decoded and augmented by DataLoader workers (`cfg.num_workers`) with the usual
ResNet-50 transforms and reach the trainer through `DiskSplit`, which has the interface of
`risda.trainer.data.TensorSplit`: `labels` (on the device), `len()`, and
`batches(batch_size, train, generator)` yielding normalised float (x, y) on the device.

Training order AND augmentation come from the generator the trainer passes: it draws the
permutation and one seed per image, and each image's RandomResizedCrop/flip is drawn from
its own seed, so a run is reproducible whatever the number of workers.

Layouts (paths in the list/JSON files are relative to --data-root):
- imagenetlt: <root>/ImageNet_LT_{train,val,test}.txt, lines `train/n01440764/n01440764_10026.JPEG 0`
  (the lists of Liu et al. 2019: train and val are drawn from ILSVRC-2012 train, test is its val).
  train list -> train, val list -> val (for tuning), test list -> test.
- inat2018: <root>/train2018.json and <root>/val2018.json (COCO style: images[{id, file_name}],
  annotations[{image_id, category_id}], categories[{id, name}]), images under
  <root>/train_val2018/<supercategory>/<category>/<hash>.jpg. train2018 -> train,
  val2018 -> test; val is held out of train (balanced, `--val-per-class`) or None.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from .augment import normalize
from .config import Config, ConfigError
from .longtail import LongTailData, cap_per_class, long_tail_indices

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENETLT_LISTS = {"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt", "test": "ImageNet_LT_test.txt"}
INAT_JSONS = {"train": "train2018.json", "test": "val2018.json"}
LAYOUTS = {
    "imagenetlt": ("<root>/ImageNet_LT_train.txt, ImageNet_LT_val.txt, ImageNet_LT_test.txt (lines "
                   "'train/n01440764/n01440764_10026.JPEG 0', paths relative to <root>, e.g. the ILSVRC-2012 "
                   "folder holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)"),
    "inat2018": ("<root>/train2018.json and <root>/val2018.json (COCO-style 'images', 'annotations', "
                 "'categories'; each file_name relative to <root>, e.g. "
                 "train_val2018/Plantae/7477/3b60c9486db1d2ee875f11a669fbde4b.jpg)"),
}
PATHS_CHECKED = 64  # listed images checked for existence per split, before any training


# --- transforms (run in the DataLoader workers) ------------------------------------------
def random_resized_crop_params(height: int, width: int, g: torch.Generator,
                               scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `g` instead of the global RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=g).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (1,), generator=g))
            j = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return i, j, h, w
    in_ratio = width / height  # fallback: central crop of the extreme allowed ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def load_rgb(path: str):
    from PIL import Image
    with open(path, "rb") as fh:
        img = Image.open(fh)
        return img.convert("RGB")


def load_checked(path: str):
    """load_rgb, with a ConfigError naming the file and the fix for an unreadable image."""
    from PIL import Image
    try:
        return load_rgb(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"cannot read image {path}: {type(e).__name__}: {why}; delete or replace the file, "
                          "or remove its entry from the list/JSON file") from None


def _unwrap_worker_error(e: ConfigError) -> ConfigError:
    """A DataLoader worker re-raises a ConfigError with its whole traceback in the message;
    keep the one line the worker raised."""
    lines = str(e).strip().splitlines()
    if len(lines) < 2:
        return e
    last = lines[-1]
    return ConfigError(last.split("ConfigError: ", 1)[1] if "ConfigError: " in last else last)


def train_transform(img, size: int, seed: int) -> torch.Tensor:
    """RandomResizedCrop(size) + horizontal flip -> uint8 3×size×size."""
    import torchvision.transforms.v2.functional as F
    g = torch.Generator().manual_seed(seed)
    i, j, h, w = random_resized_crop_params(img.height, img.width, g)
    img = F.resized_crop(img, i, j, h, w, [size, size], antialias=True)
    if torch.rand(1, generator=g).item() < 0.5:
        img = F.horizontal_flip(img)
    return F.pil_to_tensor(img)


def eval_transform(img, size: int) -> torch.Tensor:
    """Resize the shorter side to size·256/224 (256 for 224), centre crop size -> uint8."""
    import torchvision.transforms.v2.functional as F
    img = F.resize(img, [int(round(size * 256 / 224))], antialias=True)
    img = F.center_crop(img, [size, size])
    return F.pil_to_tensor(img)


class _DiskImages(torch.utils.data.Dataset):
    """Map-style dataset indexed by (index, seed) pairs; paths kept as one bytes array so that
    forked workers share them without copy-on-write growth."""

    def __init__(self, root: str, files: np.ndarray, labels: np.ndarray, size: int, train: bool):
        self.root, self.files, self.labels, self.size, self.train = root, files, labels, size, train

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        index, seed = item
        img = load_checked(os.path.join(self.root, self.files[index].decode()))
        x = train_transform(img, self.size, seed) if self.train else eval_transform(img, self.size)
        return x, int(self.labels[index])


class _PairSampler(torch.utils.data.Sampler):
    def __init__(self, order: list[int], seeds: list[int]):
        self.order, self.seeds = order, seeds

    def __len__(self):
        return len(self.order)

    def __iter__(self):
        return iter(zip(self.order, self.seeds))


class DiskSplit:
    """Images on disk behind a DataLoader; the interface of TensorSplit."""

    def __init__(self, root: str, files: list[str], labels: np.ndarray, device: torch.device,
                 image_size: int, num_workers: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.root = str(root)
        self.files = np.array([f.encode() for f in files], dtype=np.bytes_)
        self._labels = np.asarray(labels, dtype=np.int64)
        self.labels = torch.from_numpy(self._labels).to(device)
        self.device = torch.device(device)
        self.image_size, self.num_workers = image_size, num_workers
        self.mean, self.std = mean, std

    def __len__(self):
        return len(self._labels)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.files[i].decode())

    def loader(self, batch_size: int, train: bool, generator: torch.Generator | None = None, shuffle: bool | None = None):
        n = len(self)
        if train if shuffle is None else shuffle:
            gdev = generator.device if generator is not None else torch.device("cpu")
            order = torch.randperm(n, generator=generator, device=gdev).tolist()
            seeds = torch.randint(0, 2**62, (n,), generator=generator, device=gdev).tolist()
        else:
            order, seeds = list(range(n)), [0] * n
        dataset = _DiskImages(self.root, self.files, self._labels, self.image_size, train)
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=_PairSampler(order, seeds), num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", drop_last=False)

    def batches(self, batch_size: int, train: bool, generator: torch.Generator | None = None, shuffle: bool | None = None):
        try:
            for x, y in self.loader(batch_size, train, generator, shuffle):
                x = x.to(self.device, non_blocking=True)
                yield normalize(x, self.mean, self.std), y.to(self.device, non_blocking=True)
        except ConfigError as e:  # an unreadable image met during the run (a sample is checked before)
            raise _unwrap_worker_error(e) from None


# --- parsing the public annotation formats --------------------------------------------
def _need_file(root: Path, name: str, dataset: str) -> Path:
    path = root / name
    if not path.is_file():
        raise ConfigError(f"{path} is missing: --dataset {dataset} expects {LAYOUTS[dataset]}")
    return path


def read_imagenetlt_list(path: Path) -> tuple[list[str], np.ndarray]:
    files, labels = [], []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ConfigError(f"{path}, line {n}: expected 'relative/path.JPEG label', got {line.strip()!r}")
            files.append(parts[0])
            labels.append(int(parts[1]))
    if not files:
        raise ConfigError(f"{path} lists no images: expected lines 'relative/path.JPEG label'")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.min() < 0:
        raise ConfigError(f"{path}: labels must be >= 0, found {labels.min()}")
    return files, labels


def read_inat_json(path: Path) -> tuple[list[str], list[int], dict[int, str]]:
    """(file_names, category_ids, {category_id: name}) of one COCO-style iNaturalist file."""
    try:
        with open(path) as fh:
            d = json.load(fh)
        file_of = {im["id"]: im["file_name"] for im in d["images"]}
        pairs = [(file_of[a["image_id"]], int(a["category_id"])) for a in d["annotations"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not an iNaturalist 2018 annotation file ({type(e).__name__}: {e}): "
                          "expected COCO-style 'images' [{id, file_name}], 'annotations' [{image_id, category_id}]") from e
    if not pairs:
        raise ConfigError(f"{path} has no annotated images")
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in d.get("categories", [])}
    return [p[0] for p in pairs], [p[1] for p in pairs], names


def check_paths(root: Path, files: list[str], what: str, dataset: str, k: int = PATHS_CHECKED) -> None:
    """Fail early if a sample of the listed images (first, last, random) is missing or unreadable."""
    n = len(files)
    idx = {0, n - 1} | set(np.random.RandomState(0).choice(n, size=min(k, n), replace=False).tolist())
    missing = [files[i] for i in sorted(idx) if not (root / files[i]).is_file()]
    if missing:
        raise ConfigError(f"{len(missing)} of {len(idx)} checked images of the {what} are missing, e.g. "
                          f"{root / missing[0]}: --data-root must be the folder the paths are relative to; "
                          f"--dataset {dataset} expects {LAYOUTS[dataset]}")
    for i in sorted(idx):  # the same sample decodes: a wrong or corrupt file stops the run here, not in epoch 0
        load_checked(str(root / files[i]))


def read_disk_source(cfg: Config) -> dict:
    """Files and labels of every split, with labels in 0..C-1; no subsampling."""
    root = Path(cfg.data_root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data root {root} does not exist: --dataset {cfg.dataset} expects {LAYOUTS[cfg.dataset]}")
    splits = {}
    if cfg.dataset == "imagenetlt":
        for split, name in IMAGENETLT_LISTS.items():
            path = _need_file(root, name, cfg.dataset)
            splits[split] = (*read_imagenetlt_list(path), name)
        num_classes = 1 + max(int(s[1].max()) for s in splits.values())
        names = {}
        for f, y in zip(*splits["train"][:2]):
            names.setdefault(int(y), Path(f).parent.name or str(y))
        class_names = [names.get(c, str(c)) for c in range(num_classes)]
    elif cfg.dataset == "inat2018":
        raw = {split: read_inat_json(_need_file(root, name, cfg.dataset)) + (name,) for split, name in INAT_JSONS.items()}
        cat_names = {**raw["test"][2], **raw["train"][2]}
        ids = sorted(set(cat_names) | set(raw["train"][1]) | set(raw["test"][1]))
        index = {cid: i for i, cid in enumerate(ids)}  # identity for iNat2018's ids 0..8141
        for split, (files, cats, _, name) in raw.items():
            splits[split] = (files, np.asarray([index[c] for c in cats], dtype=np.int64), name)
        num_classes = len(ids)
        class_names = [cat_names.get(cid, str(cid)) for cid in ids]
    else:
        raise ValueError(f"not an on-disk dataset: {cfg.dataset!r}")
    for split, (files, _, name) in splits.items():
        check_paths(root, files, f"{split} split ({name})", cfg.dataset)
    return dict(root=root, splits=splits, num_classes=num_classes, class_names=class_names)


def load_disk_dataset(cfg: Config, device: torch.device) -> LongTailData:
    """ImageNet-LT / iNaturalist 2018 as a LongTailData of DiskSplits (see the module docstring).

    --n-max caps every class's training images (a seeded per-class shuffle picks which);
    --test-per-class caps the test and val splits (the first images of each class);
    --imbalance is ignored: these datasets are long-tailed as they come."""
    src = read_disk_source(cfg)
    root, splits, num_classes = src["root"], src["splits"], src["num_classes"]
    train_files, y_train, train_name = splits["train"]
    counts_all = np.bincount(y_train, minlength=num_classes)
    v = cfg.val_per_class if cfg.dataset == "inat2018" else 0  # ImageNet-LT has its own val list
    pool = counts_all - v
    if pool.min() <= 0:
        c = int(np.argmin(pool))
        what = f"after holding out --val-per-class {v}; lower it" if v else f"in {train_name}; every class needs one"
        raise ConfigError(f"class {c} ({src['class_names'][c]}) has {counts_all[c]} training images, none left {what}")
    counts = np.minimum(pool, cfg.n_max) if cfg.n_max is not None else pool
    train_idx, val_idx = long_tail_indices(y_train, counts.tolist(), v, cfg.subset_seed)
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)

    def split(files, labels, idx):
        return DiskSplit(str(root), [files[i] for i in idx], labels[idx], device, cfg.image_size, cfg.num_workers)

    test_files, y_test, _ = splits["test"]
    test_idx = cap_per_class(y_test, cfg.test_per_class)
    test = split(test_files, y_test, test_idx)
    if cfg.dataset == "imagenetlt":
        val_files, y_val, _ = splits["val"]
        caps = [c for c in (cfg.test_per_class, cfg.val_per_class) if c]  # --val-per-class caps the val list
        val_idx = cap_per_class(y_val, min(caps) if caps else None)
        val = split(val_files, y_val, val_idx)
    else:
        val = split(train_files, y_train, val_idx) if v else None
    train = split(train_files, y_train, train_idx)
    class_counts = np.bincount(y_train[train_idx], minlength=num_classes).tolist()
    info = dict(source=f"{cfg.dataset}:{root}", subset_seed=cfg.subset_seed, train_size=len(train),
                val_size=0 if val is None else len(val), test_size=len(test),
                mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), image_size=cfg.image_size)
    return LongTailData(train, val, test, class_counts, src["class_names"], info)
