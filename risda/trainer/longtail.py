"""The long-tailed subset (LDAM-DRW's recipe, Cao et al. 2019) and what a dataset loader returns:
shared by the in-memory datasets (risda.trainer.data) and the on-disk ones (risda.trainer.data_disk), so that
each of those depends on this module and neither on the other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import numpy as np


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Images per class, largest first: n_i = int(n_max * (1/λ)^(i/(C-1))) (LDAM-DRW)."""
    if num_classes == 1:
        return [int(n_max)]
    return [int(n_max * (1.0 / imbalance) ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def long_tail_indices(labels: np.ndarray, counts: list[int], val_per_class: int, seed: int):
    """(train_idx, val_idx): per class in label order, shuffle its indices with one stream
    seeded once, hold out the first `val_per_class`, keep the next counts[c] for training."""
    rng = np.random.RandomState(seed)  # the legacy stream that np.random.seed + shuffle uses
    train, val = [], []
    for c, n_c in enumerate(counts):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        val.append(idx[:val_per_class])
        train.append(idx[val_per_class:val_per_class + n_c])
    return np.concatenate(train), np.concatenate(val)


def cap_per_class(labels: np.ndarray, cap: int | None) -> np.ndarray:
    """Indices of the first `cap` images of every class (all of them if cap is None)."""
    if cap is None:
        return np.arange(len(labels))
    return np.concatenate([np.where(labels == c)[0][:cap] for c in np.unique(labels)])


class Split(Protocol):
    """A split as the trainer reads it: risda.trainer.data.TensorSplit (in memory) or
    risda.trainer.data_disk.DiskSplit (on disk)."""
    labels: Any  # (N,) int64 on the training device

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, train: bool, generator=None, shuffle: bool | None = None) -> Iterator[tuple]:
        """Normalised (x, y) batches on the device; train: shuffled and augmented."""


@dataclass
class LongTailData:
    train: Split
    val: Split | None
    test: Split
    class_counts: list[int]
    class_names: list[str]
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)
