"""Training objectives ("arms"). The trainer's loop never changes: it asks the objective
for a loss every batch and tells it when epochs begin and end.

`risda.trainer.make_objective(cfg, ...)` picks the arm. The plain baselines live here; the RISDA arms
(risda, no_reweight, no_reasoning, cov_only, isda) live in `risda.method`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .config import Config

# extract(augment=False) -> (features (N,D) fp32, logits (N,C) fp32, labels (N,)) over the
# training set in eval mode (with the training augmentation if asked, from a generator of its
# own); computed only when an objective asks for it.
Extractor = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class Objective:
    """Plain cross-entropy; the base of every arm. cfg is the run's resolved Config
    (`Config.resolved()`, which the trainer calls once per run): arms read its derived fields as given."""

    def __init__(self, cfg: Config, class_counts: list[int], feature_dim: int, device: torch.device):
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
