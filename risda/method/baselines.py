"""The field's long-tail losses as plug-in modules, each checked against numpy in
tests/test_baselines.py: LDAM (with DRW's weights as an option) and its cosine classifier, the
logit-adjusted loss (= Balanced Softmax at τ = 1), post-hoc logit adjustment. Pure torch."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .loss import class_balanced_weights


def log_prior(class_counts) -> torch.Tensor:
    """log π_j, the training label frequencies (Menon et al. 2021)."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    return (counts / counts.sum()).log().float()


def posthoc_logit_adjustment(logits: torch.Tensor, class_counts, tau: float = 1.0) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al., ICLR 2021, eq. 9): f_j(x) − τ log π_j, the logits
    of a model trained with plain CE, adjusted at prediction time. Trains nothing."""
    return logits + adjustment(class_counts, tau).to(logits.device)


def adjustment(class_counts, tau: float = 1.0) -> torch.Tensor:
    """(C,) the term post-hoc logit adjustment adds to the logits: −τ log π_j."""
    return -tau * log_prior(class_counts)


class LogitAdjustedLoss(nn.Module):
    """The logit-adjusted loss (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021,
    eq. 11): CE of f_j(x) + τ log π_j, trained from epoch 0, τ = 1. At τ = 1 it is also Balanced
    Softmax (Ren et al., NeurIPS 2020: CE of f_j(x) + log n_j), since log n_j and log π_j differ by
    log N, a constant over j that softmax ignores. Evaluate on the plain logits, as both papers do."""

    def __init__(self, class_counts, tau: float = 1.0):
        super().__init__()
        self.register_buffer("offset", tau * log_prior(class_counts))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float() + self.offset, labels)


def ldam_margins(class_counts, max_margin: float = 0.5) -> torch.Tensor:
    """LDAM's per-class margins Δ_j = C / n_j^{1/4}, with C such that the largest is max_margin
    (Cao et al. 2019, eq. 13; the authors' `LDAMLoss`)."""
    m = torch.as_tensor(class_counts, dtype=torch.float64) ** -0.25
    return (m * (max_margin / m.max())).float()


class LDAMLoss(nn.Module):
    """LDAM (Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss",
    NeurIPS 2019; their released `cifar_train.py`): CE of s·(z_j − Δ_y·[j = y]) with the margins of
    `ldam_margins` (largest 0.5) and s = 30, on cosine logits z (use `NormedLinear` as the
    classifier). `drw=True` in a call weights it with the class-balanced weights of β = 0.9999
    (eq. 12 of RISDA, Cui et al. 2019): LDAM-DRW passes drw=True from 80% of the epochs on."""

    def __init__(self, class_counts, max_margin: float = 0.5, scale: float = 30.0, cb_gamma: float = 0.9999):
        super().__init__()
        self.scale = scale
        self.register_buffer("margins", ldam_margins(class_counts, max_margin))
        self.register_buffer("drw_weights", class_balanced_weights(class_counts, cb_gamma))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, drw: bool = False) -> torch.Tensor:
        z = logits.float() - F.one_hot(labels, len(self.margins)) * self.margins[labels, None]
        return F.cross_entropy(self.scale * z, labels, weight=self.drw_weights if drw else None)


class NormedLinear(nn.Module):
    """The cosine classifier of LDAM-DRW's released code (`NormedLinear`): z_j = cos(f, w_j), no
    bias, initialised as theirs (uniform, rows renormalised). `weight` is (C, D) as nn.Linear's."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-1, 1).renorm_(2, 0, 1e-5).mul_(1e5))

    def forward(self, x):
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).T
