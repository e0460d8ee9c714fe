"""Top-1 error overall and on the many/medium/few-shot groups (>100, 20-100, <20 training images)."""
from __future__ import annotations

import torch

GROUPS = ("many", "medium", "few")


def shot_groups(class_counts: list[int]) -> dict[str, torch.Tensor]:
    """Class indices of each group, by training count (the convention of Liu et al. 2019)."""
    counts = torch.tensor(class_counts)
    return {"many": torch.where(counts > 100)[0], "medium": torch.where((counts >= 20) & (counts <= 100))[0],
            "few": torch.where(counts < 20)[0]}


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Accuracy of each class (nan for a class absent from the split)."""
    hits = torch.bincount(labels, weights=(predictions == labels).double(), minlength=num_classes)
    totals = torch.bincount(labels, minlength=num_classes).double()
    return hits / totals


@torch.no_grad()
def evaluate(model, split, groups: dict, autocast, prefix: str = "", batch_size: int = 500) -> dict:
    """Errors in percent: `error` over all images, `<group>_error` = 100 - mean per-class accuracy."""
    was_training = model.training
    model.eval()
    predictions = []
    with autocast():
        for x, _ in split.batches(batch_size, train=False):
            predictions.append(model(x)[1].argmax(1))
    model.train(was_training)
    predictions, labels = torch.cat(predictions).cpu(), split.labels.cpu()
    num_classes = sum(len(g) for g in groups.values())
    accuracy = per_class_accuracy(predictions, labels, num_classes)
    result = {f"{prefix}error": 100 * (1 - (predictions == labels).double().mean().item())}
    for name in GROUPS:
        acc = accuracy[groups[name]]
        acc = acc[~acc.isnan()]
        result[f"{prefix}{name}_error"] = 100 * (1 - acc.mean().item()) if len(acc) else None
    return result
