"""Training objectives. The trainer's loop never changes: it asks the objective for a loss
every batch and tells it when epochs begin and end.

Each arm is declared once, in `risda.arms`, with its objective class. The plain baselines and the
field's strong, simple ones live here (CE, CE-DRW, logit adjustment and Balanced Softmax, LDAM-DRW,
post-hoc logit adjustment); the RISDA arms live in `risda.method`. Each loss is checked against
numpy in tests/test_baselines.py.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# extract(augment=False) -> (features (N,D) fp32, logits (N,C) fp32, labels (N,)) over the
# training set in eval mode (with the training augmentation if asked, from a generator of its
# own); computed only when an objective asks for it.
Extractor = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class Objective:
    """Plain cross-entropy; the base of every arm. cfg is the run's resolved Config
    (`Config.resolved()`, which the trainer calls once per run): arms read its derived fields as given."""

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
        """Take what this arm needs from the objective state of a shared stage I (risda.stage1)."""


class DeferredReweighting(Objective):
    """CE, then class-balanced weighted CE from stage II on (DRW, Cao et al. 2019)."""

    def __init__(self, cfg, class_counts, feature_dim, device):
        from .loss import class_balanced_weights
        super().__init__(cfg, class_counts, feature_dim, device)
        self.class_weights = class_balanced_weights(torch.tensor(class_counts), cfg.cb_gamma).to(device)

    def loss(self, features, logits, labels, model, epoch):
        weight = self.class_weights if self.stage2(epoch) else None
        return F.cross_entropy(logits.float(), labels, weight=weight)


def log_prior(class_counts) -> torch.Tensor:
    """log π_j, the training label frequencies."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    return (counts / counts.sum()).log().float()


class LogitAdjustedLoss(Objective):
    """The logit-adjusted loss (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021,
    eq. 11): CE of f_j(x) + τ log π_j, from epoch 0, τ = 1. At τ = 1 it is also Balanced Softmax
    (Ren et al., NeurIPS 2020: CE of f_j(x) + log n_j), since log n_j and log π_j differ by log N, a
    constant over j that softmax ignores: `balanced_softmax` is declared (risda.arms) as this class at
    τ = 1, not written twice. Evaluation uses the plain logits, as both papers do."""

    def __init__(self, cfg, class_counts, feature_dim, device):
        super().__init__(cfg, class_counts, feature_dim, device)
        self.offset = (cfg.la_tau * log_prior(class_counts)).to(device)

    def loss(self, features, logits, labels, model, epoch):
        return F.cross_entropy(logits.float() + self.offset, labels)


class DeferredLogitAdjustedLoss(LogitAdjustedLoss):
    """Plain CE in stage I (the shared CE stage I), the logit-adjusted loss of `LogitAdjustedLoss`
    (τ log π_j added to the logits; Balanced Softmax at τ = 1) from stage II on: the loss deferred
    as DRW defers its weights (Cao et al. 2019). Ours as a named arm, not Menon et al.'s or Ren et
    al.'s method, which both train the adjusted loss from epoch 0 (that is `la_loss`)."""

    def loss(self, features, logits, labels, model, epoch):
        return F.cross_entropy(logits.float() + self.offset if self.stage2(epoch) else logits.float(), labels)


def ldam_margins(class_counts, max_margin: float) -> torch.Tensor:
    """LDAM's per-class margins Δ_j = C / n_j^{1/4}, with C such that the largest is max_margin
    (Cao et al. 2019, eq. 13; the authors' `LDAMLoss`)."""
    m = torch.as_tensor(class_counts, dtype=torch.float64) ** -0.25
    return (m * (max_margin / m.max())).float()


class LDAMDRW(Objective):
    """LDAM-DRW (Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin
    Loss", NeurIPS 2019; their released `cifar_train.py`): CE of s·(z_j − Δ_y·[j = y]) with the
    margins of `ldam_margins` (largest 0.5) and s = 30, from epoch 0, on a cosine classifier (their
    `NormedLinear`, which the registry asks the model for: z_j = cos(f, w_j)); from stage II on
    (their epoch 160 of 200) the class-balanced weights of β = 0.9999, normalised to sum to C
    (`DeferredReweighting`'s, eq. 12 here). Its stage I is LDAM, not CE: keyed and shared apart."""

    def __init__(self, cfg, class_counts, feature_dim, device):
        from .loss import class_balanced_weights
        super().__init__(cfg, class_counts, feature_dim, device)
        self.margins = ldam_margins(class_counts, cfg.ldam_max_margin).to(device)
        self.class_weights = class_balanced_weights(torch.tensor(class_counts), cfg.cb_gamma).to(device)

    def loss(self, features, logits, labels, model, epoch):
        z = logits.float() - F.one_hot(labels, self.num_classes) * self.margins[labels, None]
        weight = self.class_weights if self.stage2(epoch) else None
        return F.cross_entropy(self.cfg.ldam_scale * z, labels, weight=weight)


class PosthocLogitAdjusted(Objective):
    """Post-hoc logit adjustment (Menon et al. 2021, eq. 9): a plain CE model, evaluated on
    f_j(x) − τ log π_j, τ = 1. Training is exactly `ce`'s, so the runner trains nothing for it: its
    cell is read from the `ce` cell's evaluation (risda.arms: derived_from="ce"), where the trainer
    records these errors beside CE's own, and τ tuned on the validation split over POSTHOC_TAUS."""

    def __init__(self, cfg, class_counts, feature_dim, device):
        super().__init__(cfg, class_counts, feature_dim, device)
        self.eval_adjustment = (-cfg.la_tau * log_prior(class_counts)).to(device)


POSTHOC_TAUS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
