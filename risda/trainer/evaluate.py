"""Top-1 error overall and on the many/medium/few-shot groups (>100, 20-100, <20 training images)."""
from __future__ import annotations

import torch

GROUPS = ("many", "medium", "few")


# --- the names of the errors: the one list every table, summary and report derives from ----------
def error_names(prefix: str = "") -> tuple[str, ...]:
    """The fields `evaluate(..., prefix=prefix)` returns: the overall error, then each group's
    (`test_error`, `test_many_error`, `test_medium_error`, `test_few_error` for "test_")."""
    return (f"{prefix}error", *(f"{prefix}{g}_error" for g in GROUPS))


# A run's summary (risda.trainer.loop.summarize) holds the test errors, overall and per group, of three
# evaluated epochs: the last one, the one with the lowest validation error, and the one with the
# lowest test error (model selection on test: what the literature reports, never used for a choice).
_LAST = ("test_error", *(f"{g}_error" for g in GROUPS))
SELECTIONS = {"last": _LAST,
              "best_val": tuple(f"{name}_at_best_val" for name in _LAST),
              "best_test": tuple(f"best_{name}" for name in error_names("test_"))}
# Every error of a summary: the three selections and the best validation error.
SUMMARY_ERRORS = (*SELECTIONS["last"], *SELECTIONS["best_val"], "best_val_error", *SELECTIONS["best_test"])


def selected_errors(record, selection: str) -> dict:
    """One evaluated epoch's test errors (its `test_*` fields; a dict or a pandas row) under the
    summary's names for `selection` ("last", "best_val", "best_test"); all None without a record."""
    return {name: None if record is None else record.get(field)
            for name, field in zip(SELECTIONS[selection], error_names("test_"))}


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
def split_logits(model, split, autocast, batch_size: int = 500) -> torch.Tensor:
    """(N, C) fp32 logits of a split in eval mode, the model left as it was."""
    was_training = model.training
    model.eval()
    logits = []
    with autocast():
        for x, _ in split.batches(batch_size, train=False):
            logits.append(model(x)[1].float())
    model.train(was_training)
    return torch.cat(logits)


def evaluate(model, split, groups: dict, autocast, prefix: str = "", batch_size: int = 500,
             adjustment: torch.Tensor | None = None) -> dict:
    """Errors in percent: `error` over all images, `<group>_error` = 100 - mean per-class accuracy;
    `adjustment` (C,) is added to the logits first (post-hoc logit adjustment)."""
    logits = split_logits(model, split, autocast, batch_size)
    return logit_errors(logits if adjustment is None else logits + adjustment, split.labels, groups, prefix)


def logit_errors(logits: torch.Tensor, labels: torch.Tensor, groups: dict, prefix: str = "") -> dict:
    """`evaluate`'s errors from logits already computed."""
    predictions, labels = logits.argmax(1).cpu(), labels.cpu()
    num_classes = sum(len(g) for g in groups.values())
    accuracy = per_class_accuracy(predictions, labels, num_classes)
    overall, *per_group = error_names(prefix)
    result = {overall: 100 * (1 - (predictions == labels).double().mean().item())}
    for group, name in zip(GROUPS, per_group):
        acc = accuracy[groups[group]]
        acc = acc[~acc.isnan()]
        result[name] = 100 * (1 - acc.mean().item()) if len(acc) else None
    return result
