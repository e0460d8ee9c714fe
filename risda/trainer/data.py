"""Long-tailed datasets kept in memory as uint8 tensors on the training device.

CIFAR-LT is built exactly as LDAM-DRW builds it (Cao et al. 2019): n_i = int(n_max * (1/λ)^(i/(C-1)))
and, for each class in label order, one numpy stream seeded once shuffles that class's indices
and keeps the first n_i. With a validation split the first `val_per_class` shuffled indices of
each class are held out *before* the long-tail subsampling, so validation is balanced and
disjoint from both the training subset and the test set.

Sources: torchvision's CIFAR pickle format (`cifar-10-batches-py/`, `cifar-100-python/`, which
`--download` fetches), or any ImageFolder tree `<root>/{train,test}/<class>/*`.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .augment import CIFAR_MEAN, CIFAR_STD, normalize, random_crop_flip
from .config import Config, ConfigError, RunConfig, require_resolved
from .longtail import LongTailData, cap_per_class, long_tail_counts, long_tail_indices

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CIFAR_FOLDERS = {"cifar10lt": ("cifar-10-batches-py", 10), "cifar100lt": ("cifar-100-python", 100)}
# CIFAR-100's 20 superclasses (the coarse labels of Krizhevsky's 2009 report, "Learning Multiple Layers of
# Features from Tiny Images", Appendix D), each of 5 fine classes: what "a semantically close class" means
# in the report's graph section. The shared copy has no coarse labels, so they are written down here.
CIFAR100_SUPERCLASSES = {
    "aquatic mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit and vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household electrical devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large man-made outdoor things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large natural outdoor scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large omnivores and herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium-sized mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles 1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles 2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
# Classes of the datasets whose class count is fixed, for whoever cannot look at the data.
NUM_CLASSES = {name: n for name, (_, n) in CIFAR_FOLDERS.items()}


# --- sources ---------------------------------------------------------------------------
def read_cifar_pickle(folder: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's CIFAR python format -> (uint8 N×3×32×32, int64 labels)."""
    if folder.name == "cifar-10-batches-py":
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    else:
        files = ["train" if train else "test"]
    images, labels = [], []
    for name in files:
        with open(folder / name, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    return np.concatenate(images), np.asarray(labels, dtype=np.int64)


def cifar_class_names(folder: Path) -> list[str]:
    meta = folder / ("batches.meta" if folder.name == "cifar-10-batches-py" else "meta")
    with open(meta, "rb") as fh:
        entry = pickle.load(fh, encoding="latin1")
    return list(entry.get("label_names") or entry["fine_label_names"])


def list_image_tree(split_dir: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    files, labels = [], []
    for c, name in enumerate(classes):
        found = [f for f in sorted((split_dir / name).iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not found:
            raise ConfigError(f"class folder {split_dir / name} has no images ({', '.join(IMAGE_EXTENSIONS)}): add its images, "
                              f"or remove the class from both {split_dir.parent / 'train'} and {split_dir.parent / 'test'}")
        files.extend(found)
        labels.extend([c] * len(found))
    return files, np.asarray(labels, dtype=np.int64), classes


def decode_images(files: list[Path], size: int) -> np.ndarray:
    """Decode to RGB uint8 (grey, palette and RGBA images converted) and resize to size×size."""
    from PIL import Image
    out = np.empty((len(files), 3, size, size), dtype=np.uint8)
    unreadable = []
    for i, f in enumerate(files):
        try:
            with Image.open(f) as img:
                img = img.convert("RGB")
                if img.size != (size, size):
                    img = img.resize((size, size), Image.BILINEAR)
                out[i] = np.asarray(img).transpose(2, 0, 1)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
            unreadable.append((f, e))
    if unreadable:
        raise unreadable_error(unreadable)
    return out


def unreadable_error(unreadable: list) -> ConfigError:
    """A ConfigError naming the first unreadable image (and how many): skipping them would
    silently change the class counts, so the run stops before training."""
    f, e = unreadable[0]
    why = (str(e).strip().splitlines() or [""])[0][:200]
    more = f" (and {len(unreadable) - 1} more image(s) in the tree)" if len(unreadable) > 1 else ""
    return ConfigError(f"cannot read image {f}{more}: {type(e).__name__}: {why}; delete or replace the file "
                       "(every image of the tree is used, skipping one would change the class counts)")


def read_image_tree(split_dir: Path, size: int, cache_dir: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An ImageFolder split decoded once, then cached (keyed by paths, sizes, mtimes and size)."""
    files, labels, classes = list_image_tree(split_dir)
    key = hashlib.sha1(f"{split_dir.resolve()}|{size}".encode())
    for f in files:
        st = f.stat()
        key.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    cache = Path(os.path.expanduser(cache_dir)) / f"{split_dir.name}-{key.hexdigest()[:16]}.npz"
    if cache.exists():
        try:
            with np.load(cache) as z:
                return z["images"], z["labels"], classes
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):  # a damaged cache: decode again
            cache.unlink(missing_ok=True)
    images = decode_images(files, size)
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Trials on one node may decode the same tree at once: each writes its own temporary file.
    tmp = cache.with_name(f"{cache.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.npz")
    np.savez(tmp, images=images, labels=labels)
    os.replace(tmp, cache)
    return images, labels, classes


def _layout_error(root: Path, dataset: str) -> ConfigError:
    expected = "<root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg"
    if dataset in CIFAR_FOLDERS:
        expected = f"<root>/{CIFAR_FOLDERS[dataset][0]}/ (torchvision's CIFAR format; add --download to fetch it) or " + expected
    return ConfigError(f"data root {root} has the wrong layout for dataset {dataset!r}: expected {expected}")


def download_cifar(cls, root: Path) -> None:
    """torchvision's download of CIFAR-10/100 into root; DownloadFailed (one line) when it cannot."""
    from .failures import DownloadFailed, StorageFault, one_line, writing
    try:
        with writing(root, "free space (about 170 MB) and rerun the same command"):
            cls(str(root), train=True, download=True)
            cls(str(root), train=False, download=True)
    except StorageFault:
        raise
    except (OSError, RuntimeError) as e:  # URLError, HTTPError, timeouts; RuntimeError: a corrupt archive
        why = one_line(getattr(e, "reason", None) or e)[:200]
        raise DownloadFailed(f"--download could not fetch {cls.__name__} into {root} ({type(e).__name__}: {why}): "
                             f"check the network, or copy torchvision's CIFAR folder (or an ImageFolder tree) there "
                             f"yourself and drop --download") from e


def read_source(cfg: Config) -> dict:
    """Raw train/test images and labels for cfg.dataset from cfg.data_root (no subsampling)."""
    root = Path(cfg.data_root).expanduser()
    folder_name, expected_classes = CIFAR_FOLDERS.get(cfg.dataset, (None, None))
    if folder_name and cfg.download and not (root / folder_name).exists():
        import torchvision
        cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10lt" else torchvision.datasets.CIFAR100
        root.mkdir(parents=True, exist_ok=True)
        download_cifar(cls, root)
    if not root.is_dir():
        hint = " (or add --download)" if folder_name else ""
        raise ConfigError(f"data root {root} does not exist: pass --data-root pointing at your data{hint}")
    if folder_name and (root / folder_name).is_dir():
        folder = root / folder_name
        try:
            x_train, y_train = read_cifar_pickle(folder, train=True)
            x_test, y_test = read_cifar_pickle(folder, train=False)
            classes = cifar_class_names(folder)
        except (OSError, EOFError, KeyError, pickle.UnpicklingError, ValueError) as e:
            from .failures import one_line
            raise ConfigError(f"{folder} is incomplete or not in torchvision's CIFAR format ({type(e).__name__}: "
                              f"{one_line(e)[:160]}): unpack its archive again into {root} (a half-unpacked copy "
                              f"lacks files or ends early), or delete it and rerun with --download") from e
        source = f"cifar-pickle:{folder}"
    elif (root / "train").is_dir() and (root / "test").is_dir():
        x_train, y_train, classes = read_image_tree(root / "train", cfg.image_size, cfg.cache_dir)
        x_test, y_test, test_classes = read_image_tree(root / "test", cfg.image_size, cfg.cache_dir)
        if test_classes != classes:
            raise ConfigError(f"{root}/train and {root}/test have different class folders; they must match")
        if len(x_train) == 0 or len(x_test) == 0:
            raise _layout_error(root, cfg.dataset)
        source = f"imagefolder:{root}"
    else:
        raise _layout_error(root, cfg.dataset)
    if expected_classes and len(classes) != expected_classes:
        raise ConfigError(f"dataset {cfg.dataset!r} has {expected_classes} classes but {root} has {len(classes)}; use --dataset imagefolder for other trees")
    return dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=classes, source=source)


# --- in-memory splits ------------------------------------------------------------------
@dataclass
class TensorSplit:
    """uint8 images on the training device; yields normalised (augmented) float batches."""
    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple
    std: tuple
    pad_mode: str = "zeros"

    def __len__(self):
        return len(self.labels)

    def batches(self, batch_size: int, train: bool, generator: torch.Generator | None = None, shuffle: bool | None = None):
        """Normalised batches; train: shuffled and augmented, else in order and plain (shuffle
        overrides the order: the train-mode statistics pass wants mixed, plain batches)."""
        n = len(self.labels)
        shuffle = train if shuffle is None else shuffle
        order = torch.randperm(n, device=self.labels.device, generator=generator) if shuffle else None
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size] if shuffle else slice(start, start + batch_size)
            x, y = self.images[idx], self.labels[idx]
            if train:
                x = random_crop_flip(x, generator, pad=4, pad_mode=self.pad_mode)
            yield normalize(x, self.mean, self.std), y


def load_long_tail(cfg: RunConfig, device: torch.device) -> LongTailData:
    """Builds the long-tailed training subset, the balanced validation split and the test set."""
    require_resolved(cfg, "load_long_tail")
    if cfg.dataset in ("imagenetlt", "inat2018"):
        from .data_disk import load_disk_dataset
        return load_disk_dataset(cfg, device)
    src = read_source(cfg)
    y_train = src["y_train"]
    num_classes = len(src["classes"])
    pool = np.bincount(y_train, minlength=num_classes) - cfg.val_per_class
    if pool.min() <= 0:
        raise ConfigError(f"--val-per-class {cfg.val_per_class} leaves no training images in some class (smallest class has {pool.min() + cfg.val_per_class}); lower it")
    if cfg.imbalance == 1 and cfg.n_max is None:
        counts = pool.tolist()  # the tree as it is
    else:
        n_max = cfg.n_max if cfg.n_max is not None else int(pool.min())
        counts = long_tail_counts(n_max, num_classes, cfg.imbalance)
        short = [c for c in range(num_classes) if counts[c] > pool[c]]
        if short:
            c = short[0]
            raise ConfigError(f"n_max={n_max} is larger than the data: class {c} needs {counts[c]} training images but has {pool[c]} (after {cfg.val_per_class} validation images); lower --n-max")
        if min(counts) < 1:
            raise ConfigError(f"imbalance {cfg.imbalance} with n_max={n_max} leaves classes with no image; raise --n-max or lower --imbalance")
    train_idx, val_idx = long_tail_indices(y_train, counts, cfg.val_per_class, cfg.subset_seed)
    test_idx = cap_per_class(src["y_test"], cfg.test_per_class)

    if cfg.dataset in CIFAR_FOLDERS:
        mean, std = CIFAR_MEAN, CIFAR_STD
    else:  # any other tree: its own training-subset statistics
        sub = src["x_train"][train_idx].astype(np.float64) / 255
        mean, std = tuple(sub.mean((0, 2, 3)).tolist()), tuple(sub.std((0, 2, 3)).tolist())

    def split(x, y, idx):
        return TensorSplit(torch.from_numpy(x[idx]).to(device), torch.from_numpy(y[idx]).to(device), mean, std, cfg.pad_mode)

    val = split(src["x_train"], y_train, val_idx) if cfg.val_per_class else None
    info = dict(source=src["source"], subset_seed=cfg.subset_seed, train_size=len(train_idx),
                val_size=len(val_idx), test_size=len(test_idx), mean=list(mean), std=list(std))
    return LongTailData(split(src["x_train"], y_train, train_idx), val,
                        split(src["x_test"], src["y_test"], test_idx), counts, src["classes"], info)
