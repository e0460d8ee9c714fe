"""The reference variant's stage-I observations (the authors' released CIFAR code, behaviour 5
of docs/method.md): what `RISDALoss(variant="reference").prepare_observed` is prepared from."""
from __future__ import annotations

import torch

from .stats import class_means


class ReferenceObservations:
    """Reference behaviour 5, as the authors' script does it: after every stage-I epoch, one
    eval-mode pass over the training set with the training augmentation on. ε (eq. 3, the whole
    row, rounded to 2 decimals in float64 as numpy rounds) comes from the epoch whose pass is the
    most accurate (strictly better wins, so the first of equals); the prototypes (eq. 1) from the
    last stage-I epoch's pass. Neither is refreshed in stage II.

    Only the reference variant pays for the extra pass. The pass draws its augmentation from its
    own generator, in eval mode and without gradients: it leaves the training run untouched, so one
    shared stage I that observes serves both variants (risda.trainer.stage1)."""

    def __init__(self, num_classes: int, stage1_epochs: int):
        self.num_classes, self.stage1_epochs = num_classes, stage1_epochs
        self.best_accuracy = -1.0
        self.graph = None       # (C, C) float32, rounded
        self.prototypes = None  # (C, D) float32

    def after_epoch(self, epoch: int, extract) -> None:
        self.observe(epoch, *extract(augment=True))

    def observe(self, epoch: int, features, logits, labels) -> None:
        predictions = logits.argmax(1)
        accuracy = (predictions == labels).double().mean().item()
        if accuracy > self.best_accuracy:
            self.best_accuracy = accuracy
            C = self.num_classes
            confusion = torch.zeros(C, C, dtype=torch.float64, device=labels.device)
            confusion.index_put_((labels, predictions), torch.ones_like(labels, dtype=torch.float64), accumulate=True)
            rows = confusion / confusion.sum(1, keepdim=True).clamp(min=1)
            self.graph = torch.round(rows, decimals=2).float()  # behaviour 4, rounded in float64
        if epoch == self.stage1_epochs - 1:
            self.prototypes = class_means(features.float(), labels, self.num_classes)

    def state_dict(self) -> dict:
        return {"best_accuracy": self.best_accuracy, "graph": self.graph, "prototypes": self.prototypes}

    def load_state_dict(self, state: dict) -> None:
        self.best_accuracy = float(state["best_accuracy"])
        self.graph, self.prototypes = state["graph"], state["prototypes"]
