"""Training objectives. The trainer's loop never changes: it asks the objective for a loss
every batch and tells it when epochs begin and end.

Each arm is declared once, in `risda.trainer.arms`, with its objective class. These are thin
adapters from a resolved Config to the method layer's public losses (risda.method): CE, CE-DRW,
logit adjustment and Balanced Softmax, LDAM-DRW, post-hoc logit adjustment here; the RISDA arms
in `risda.trainer.risda_objective`. One implementation of each equation, in risda.method.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..method.baselines import LDAMLoss, LogitAdjustedLoss, adjustment
from ..method.loss import class_balanced_weights

# extract(augment=False) -> (features (N,D) fp32, logits (N,C) fp32, labels (N,)) over the
# training set in eval mode (with the training augmentation if asked, from a generator of its
# own); computed only when an objective asks for it.
Extractor = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class Objective:
    """Plain cross-entropy; the base of every arm. cfg is the run's RunConfig (resolved once where
    the run entered): arms read its derived fields as given."""

    # (C,) added to the logits at evaluation (post-hoc logit adjustment), or None
    eval_adjustment: torch.Tensor | None = None

    def __init__(self, cfg, class_counts: list[int], feature_dim: int, device: torch.device):
        self.cfg = cfg
        self.class_counts = list(class_counts)
        self.num_classes = len(class_counts)
        self.feature_dim = feature_dim
        self.device = device

    def stage2(self, epoch: int) -> bool:
        return epoch >= self.cfg.stage1_epochs

    def begin_epoch(self, epoch: int, model: torch.nn.Module, extract: Extractor) -> None:
        pass

    def loss(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
             model: torch.nn.Module, epoch: int) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)

    def end_epoch(self, epoch: int, model: torch.nn.Module, extract: Extractor) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def load_stage1(self, state: dict) -> None:
        """Take what this arm needs from the objective state of a shared stage I (risda.trainer.stage1)."""


class DeferredReweighting(Objective):
    """CE, then class-balanced weighted CE from stage II on (DRW, Cao et al. 2019; eq. 12's weights)."""

    def __init__(self, cfg, class_counts, feature_dim, device):
        super().__init__(cfg, class_counts, feature_dim, device)
        self.class_weights = class_balanced_weights(class_counts, cfg.cb_gamma).to(device)

    def loss(self, features, logits, labels, model, epoch):
        weight = self.class_weights if self.stage2(epoch) else None
        return F.cross_entropy(logits.float(), labels, weight=weight)


class LogitAdjustedObjective(Objective):
    """`la_loss`: risda.method.LogitAdjustedLoss (Menon et al. 2021; Balanced Softmax at τ = 1) from
    epoch 0, τ = --la-tau. `balanced_softmax` is declared (risda.trainer.arms) as this at τ = 1."""

    def __init__(self, cfg, class_counts, feature_dim, device):
        super().__init__(cfg, class_counts, feature_dim, device)
        self.criterion = LogitAdjustedLoss(class_counts, cfg.la_tau).to(device)

    def loss(self, features, logits, labels, model, epoch):
        return self.criterion(logits, labels)


class DeferredLogitAdjustedObjective(LogitAdjustedObjective):
    """Plain CE in stage I (the shared CE stage I), the logit-adjusted loss from stage II on: the
    loss deferred as DRW defers its weights (Cao et al. 2019). Ours as a named arm, not Menon et
    al.'s or Ren et al.'s method, which both train the adjusted loss from epoch 0 (`la_loss`)."""

    def loss(self, features, logits, labels, model, epoch):
        return self.criterion(logits, labels) if self.stage2(epoch) else F.cross_entropy(logits.float(), labels)


class LDAMDRWObjective(Objective):
    """LDAM-DRW (Cao et al. 2019): risda.method.LDAMLoss (margins up to --ldam-max-margin, scale
    --ldam-scale) from epoch 0 on the cosine classifier (NormedLinear, which the arm registry asks the
    model for), with DRW's class-balanced weights from stage II on (their epoch 160 of 200). Its
    stage I is LDAM, not CE: keyed and shared apart."""

    def __init__(self, cfg, class_counts, feature_dim, device):
        super().__init__(cfg, class_counts, feature_dim, device)
        self.criterion = LDAMLoss(class_counts, cfg.ldam_max_margin, cfg.ldam_scale, cfg.cb_gamma).to(device)

    def loss(self, features, logits, labels, model, epoch):
        return self.criterion(logits, labels, drw=self.stage2(epoch))


class PosthocLogitAdjusted(Objective):
    """Post-hoc logit adjustment (Menon et al. 2021, eq. 9; risda.method.posthoc_logit_adjustment):
    a plain CE model, evaluated on f_j(x) − τ log π_j, τ = 1. Training is exactly `ce`'s, so the
    runner trains nothing for it: its cell is read from the `ce` cell's evaluation (risda.trainer.arms:
    derived_from="ce"), where the trainer records these errors beside CE's own, and τ tuned on the
    validation split over POSTHOC_TAUS."""

    def __init__(self, cfg, class_counts, feature_dim, device):
        super().__init__(cfg, class_counts, feature_dim, device)
        self.eval_adjustment = adjustment(class_counts, cfg.la_tau).to(device)


POSTHOC_TAUS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
