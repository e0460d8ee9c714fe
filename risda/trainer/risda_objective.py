"""The RISDA arms (risda, no_reweight, no_reasoning, cov_only, isda) as the trainer's Objective: a
thin adapter from a resolved Config and the trainer's epoch hooks to `risda.method.RISDALoss`.

Paper variant (default). Stage I (epoch < stage1_epochs) is plain CE. At the first stage-II
epoch one pass over the training set (extract(batch_stats=True): train-mode batch norm, no
augmentation) prepares the loss (prototypes, ε, starting statistics; RISDALoss.prepare); every
stage-II batch is then RISDALoss's, with progress = epoch / epochs.

Reference variant: the authors' released CIFAR code, its departures listed in docs/method.md;
ε and the prototypes come from ReferenceObservations during stage I (behaviour 5).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..method.reference import ReferenceObservations
from ..method.risda_loss import RISDALoss
from .errors import ConfigError
from .objectives import Objective


@dataclass(frozen=True)
class Parts:
    """Which of RISDA's parts an arm keeps (each arm's are declared in risda.trainer.arms)."""
    reweight: bool     # class-balanced ρ (eq. 12)
    reason_cov: bool   # Σʳ for tail classes (eq. 4)
    reason_mean: bool  # μʳ for tail classes (eq. 5)
    from_start: bool   # ISDA: no stage I; statistics and augmentation from epoch 0


class RISDAObjective(Objective):
    """The RISDA arms, each a set of `Parts` (risda.trainer.arms) of one RISDALoss; cfg is the run's
    resolved Config, as for every Objective."""

    def __init__(self, cfg, class_counts, feature_dim, device, *, parts: Parts):
        super().__init__(cfg, class_counts, feature_dim, device)
        self.arm = parts
        self.reference = cfg.variant == "reference" and not parts.from_start  # ISDA is ISDA in both variants
        try:
            self.risda = RISDALoss(
                class_counts, feature_dim, cfg.alpha, cfg.beta, head_count=cfg.head_count,
                head_min_count=cfg.head_min_count, covariance=cfg.covariance, graph_source=cfg.graph_source,
                graph_topk=cfg.graph_topk, graph_temperature=cfg.graph_temperature, reweight=parts.reweight,
                reason_cov=parts.reason_cov, reason_mean=parts.reason_mean, cb_gamma=cfg.cb_gamma,
                variant="reference" if self.reference else "paper",
                unbiased=not (self.reference or parts.from_start), device=device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # reference behaviour 5: ε and prototypes from eval-mode passes after the stage-I epochs
        self.observations = ReferenceObservations(self.num_classes, cfg.stage1_epochs) if self.reference else None

    # the loss's state, as the trainer and the runner read it
    graph = property(lambda self: self.risda.graph)
    tail = property(lambda self: self.risda.tail)
    diagnostics = property(lambda self: self.risda.diagnostics)

    # --- the trainer's hooks ------------------------------------------------------------
    def begin_epoch(self, epoch, model, extract):
        if self.arm.from_start or not self.stage2(epoch) or self.risda.ready:
            return
        if self.reference:
            self._prepare_reference(extract)
        else:
            features, logits, labels = extract(batch_stats=True)
            predictions = logits.argmax(1)
            self.risda.prepare(features, logits if self.cfg.graph_source == "soft" else None, labels,
                               predictions=predictions)
            self._measure("first", self.cfg.stage1_epochs, features, labels)

    def loss(self, features, logits, labels, model, epoch):
        if not (self.arm.from_start or self.stage2(epoch)):
            with torch.autocast(features.device.type, enabled=False):
                return F.cross_entropy(logits.float(), labels)
        if not (self.risda.ready or self.arm.from_start):
            raise RuntimeError("RISDAObjective.loss in stage II before begin_epoch prepared it")
        return self.risda(features, logits, labels, model.classifier, epoch / self.cfg.epochs)

    def end_epoch(self, epoch, model, extract):
        if self.reference and not self.stage2(epoch):
            self.observations.after_epoch(epoch, extract)
        if epoch == self.cfg.epochs - 1 and self.risda.ready and not self.arm.from_start:
            features, _, labels = extract(batch_stats=True)
            self._measure("last", epoch, features, labels)

    def _measure(self, when, epoch, features, labels):
        """The size of the reasoned terms with the statistics and α of `epoch` (eq. 4-5)."""
        alpha = self.cfg.alpha * epoch / self.cfg.epochs * (2 if self.reference else 1)  # reference: 2α (behaviour 1)
        self.risda.measure(when, alpha, features, labels)

    def _prepare_reference(self, extract):
        obs = self.observations
        if obs.graph is None or obs.prototypes is None:  # stage1_epochs=0: nothing was observed
            warnings.warn("reference variant: no stage-I observations (stage1_epochs=0); taking ε and the "
                          "prototypes from one pass over the training set")
            obs.observe(self.cfg.stage1_epochs - 1, *extract())
        self.risda.prepare_observed(obs.graph, obs.prototypes, train_error=100 * (1 - obs.best_accuracy))
        features, _, labels = extract(batch_stats=True)  # feature norms only: changes nothing
        self._measure("first", self.cfg.stage1_epochs, features, labels)

    # --- checkpoints ----------------------------------------------------------------------
    def state_dict(self):
        return {**self.risda.state_dict(), **({"reference": self.observations.state_dict()} if self.reference else {})}

    def load_stage1(self, state):
        """Fork from a shared stage I (risda.trainer.stage1): stage I is plain CE for every RISDA arm
        but isda, so only the reference variant takes something from it, its observations."""
        if self.arm.from_start:
            raise ConfigError("--arm isda trains its augmentation from epoch 0: it has no shared stage I")
        if self.reference:
            if not state.get("reference"):
                raise ConfigError("this stage-I checkpoint was trained without the reference variant's observations "
                                  "(ε and prototypes); train its stage I with them (the runner does so when any of "
                                  "its trials uses --variant reference)")
            self.observations.load_state_dict(state["reference"])

    def load_state_dict(self, state):
        if not state:
            return
        self.risda.load_state_dict(state)
        if self.reference:
            self.observations.load_state_dict(state["reference"])


class SharedStage1(Objective):
    """Stage I as every arm but isda trains it: plain cross-entropy. With observe_reference it also
    records the reference variant's observations, which change nothing about the training itself."""

    def __init__(self, cfg, class_counts, feature_dim, device, observe_reference: bool = False):
        super().__init__(cfg, class_counts, feature_dim, device)  # cfg resolved, as for RISDAObjective
        self.observations = ReferenceObservations(self.num_classes, cfg.stage1_epochs) if observe_reference else None

    def end_epoch(self, epoch, model, extract):
        if self.observations is not None and not self.stage2(epoch):
            self.observations.after_epoch(epoch, extract)

    def state_dict(self):
        return {"reference": self.observations.state_dict()} if self.observations is not None else {}

    def load_state_dict(self, state):
        if self.observations is not None:
            self.observations.load_state_dict(state["reference"])
