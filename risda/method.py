"""The RISDA arms as one Objective: risda, no_reweight, no_reasoning, cov_only, isda.

Paper variant (default). Stage I (epoch < stage1_epochs) is plain CE. At the first stage-II
epoch one pass over the training set (extract(): eval mode, no augmentation) gives the
prototypes μ_c (eq. 1), the knowledge graph ε (eq. 3) and the starting statistics. Every
stage-II batch then merges its features into the statistics (eq. 1-2), reasons a covariance
for the tail classes from the current Σ (eq. 4), and returns the (ρ-weighted) CE of the
augmented logits (eq. 11-12), with α and β scaled by t/T. Head classes get plain ISDA.

Scale: `covariance` full | diag | lowrank:K picks the form of Σ (risda.stats) that the
statistics, eq. 4 and eq. 11 share; `graph_topk` keeps ε as a TopKGraph built from the
(label, prediction) pairs (risda.graph). iNaturalist: lowrank:32 with a top-k graph is the
whole method (prototype and covariance terms) in 2.2 GB of statistics, where full needs 137 GB.

Reference variant: the authors' released CIFAR code, its seven departures listed in
METHOD.md; each is marked "behaviour N" where it happens below.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ConfigError
from .graph import (TopKGraph, compound_tail_covariance, displacement_prototype, keep_top_k, knowledge_graph,
                    reasoning_covariance, reasoning_prototype, scale_columns, topk_knowledge_graph)
from .loss import augmented_logits, class_balanced_weights
from .objectives import Objective
from .stats import ClassStatistics, add_covariance, class_means, parse_covariance, place_rows, scale_covariance


@dataclass(frozen=True)
class Arm:
    reweight: bool     # class-balanced ρ (eq. 12)
    reason_cov: bool   # Σʳ for tail classes (eq. 4)
    reason_mean: bool  # μʳ for tail classes (eq. 5)
    from_start: bool   # ISDA: no stage I; statistics and augmentation from epoch 0


ARMS = {  #             reweight reason_cov reason_mean from_start
    "risda":        Arm(True,    True,      True,       False),
    "no_reweight":  Arm(False,   True,      True,       False),
    "no_reasoning": Arm(True,    False,     False,      False),
    "cov_only":     Arm(True,    True,      False,      False),
    "isda":         Arm(False,   False,     False,      True),
}


def head_classes(counts, head_count: int, head_min_count: int | None = None, by_index: bool = False) -> torch.Tensor:
    """(C,) bool, the head classes: with more than head_min_count images if that is set, else
    the head_count largest (ties by index), or the first head_count indices if by_index."""
    counts = torch.as_tensor(counts)
    if head_min_count is not None:
        return counts > head_min_count
    order = torch.arange(len(counts)) if by_index else torch.sort(-counts, stable=True).indices
    head = torch.zeros(len(counts), dtype=torch.bool)
    head[order[:head_count]] = True
    return head


class RISDAObjective(Objective):
    def __init__(self, cfg, class_counts, feature_dim, device):
        super().__init__(cfg.resolved(), class_counts, feature_dim, device)
        cfg = self.cfg
        if cfg.arm not in ARMS:
            raise ConfigError(f"RISDAObjective has no arm {cfg.arm!r}: choose one of {', '.join(ARMS)}")
        self.arm = ARMS[cfg.arm]
        self.reference = cfg.variant == "reference" and not self.arm.from_start  # ISDA is ISDA in both variants
        form = parse_covariance(cfg.covariance)[0]
        self.low_rank = form == "lowrank"
        # Reasoning (eq. 4) for the tail rows present only costs a host sync to index them; masking
        # instead costs reasoning for every class present. The low-rank merge syncs anyway, and
        # with D×D per class at ResNet-50's D the gathers outweigh a sync by far.
        self.index_tail = self.low_rank or (form == "full" and feature_dim >= 512)
        if self.low_rank and self.reference and self.arm.reason_cov:
            raise ConfigError(f"--covariance {cfg.covariance} with --variant reference: the reference variant writes "
                              "ε[tail] @ Σ back into the estimator every step, which a rank-K factor cannot hold "
                              "without re-truncating it thousands of times; use --variant paper, or --covariance "
                              "full or diag with the reference variant")
        # eq. 2 divides by N−1; ISDA's estimator, and the authors' code built on it, keep 1/N.
        self.unbiased = cfg.variant == "paper" and not self.arm.from_start
        self.stats = ClassStatistics(self.num_classes, feature_dim, device, covariance=cfg.covariance)
        self.class_weights = class_balanced_weights(class_counts, cfg.cb_gamma).to(device) if self.arm.reweight else None
        head = head_classes(class_counts, cfg.head_count, cfg.head_min_count, by_index=self.reference)  # behaviour 4
        self.tail = (~head).to(device)
        self.ready = False       # stage-II state (graph, prototypes, statistics) in place
        self.graph = None        # ε that reasoning reads: (C,C), or a TopKGraph (paper variant with a top-k or low rank)
        self.prototypes = None   # μ_c (C,D), fixed through stage II
        self.mean_shift = None   # μʳ (C,D): eq. 5 for tail classes, 0 for head; δ for all (reference)
        # reference behaviour 5: ε and prototypes observed on the stage-I training batches
        self.best_train_accuracy = -1.0
        self.best_graph = None
        self._reset_observations()

    # --- the trainer's hooks ------------------------------------------------------------
    def begin_epoch(self, epoch, model, extract):
        if self.arm.from_start or not self.stage2(epoch) or self.ready:
            return
        if self.reference:
            self._prepare_reference(extract)
        else:
            self._prepare(extract)
        self.ready = True

    def loss(self, features, logits, labels, model, epoch):
        with torch.autocast(features.device.type, enabled=False):  # statistics and loss always in fp32
            if not (self.arm.from_start or self.stage2(epoch)):
                if self.reference:
                    self._observe(features, logits, labels, epoch)
                return F.cross_entropy(logits.float(), labels)
            if not (self.ready or self.arm.from_start):
                raise RuntimeError("RISDAObjective.loss in stage II before begin_epoch prepared it")
            t = epoch / self.cfg.epochs  # α and β grow as t/T
            alpha, beta = self.cfg.alpha * t, self.cfg.beta * t
            weight = model.classifier.weight
            if self.reference:
                z = self._reference_logits(features, logits, labels, weight, alpha, beta)
            else:
                z = self._logits(features, logits, labels, weight, alpha, beta)
            return F.cross_entropy(z, labels, weight=self.class_weights)

    def end_epoch(self, epoch):
        if self.reference and not self.stage2(epoch):
            self._finish_observations(epoch)

    # --- paper ----------------------------------------------------------------------------
    def _prepare(self, extract):
        features, logits, labels = extract()
        predictions = logits.argmax(1)
        del logits  # (N, C): the largest thing here at iNaturalist scale
        self.prepare(*(t.to(self.device) for t in (features, predictions, labels)))

    def prepare(self, features, predictions, labels):
        """The stage-II state from one pass over the training set: prototypes (eq. 1), ε (eq. 3)
        from the stage-I classifier's predictions, the starting statistics."""
        self.prototypes = class_means(features, labels, self.num_classes)
        if self.cfg.graph_topk is not None:  # never C×C: what makes C = 8,142 cheap
            self.graph = topk_knowledge_graph(predictions, labels, self.num_classes, self.cfg.graph_topk)
        else:
            self.graph = knowledge_graph(predictions, labels, self.num_classes)
            if self.low_rank:  # the neighbours' factors are gathered per class: a lossless list form
                self.graph = TopKGraph.from_dense(self.graph)
                self._warn_if_wide(self.graph.k)
        self.stats.initialise(features, labels)
        self.mean_shift = reasoning_prototype(self.graph, self.prototypes) * self.tail[:, None]
        self.ready = True

    def _warn_if_wide(self, neighbours):
        rank, width = self.stats.rank, (neighbours + 1) * self.stats.rank
        if width > self.feature_dim:
            warnings.warn(f"--covariance lowrank:{rank} with a dense knowledge graph: a tail class borrows from up "
                          f"to {neighbours} classes, so its reasoning covariance has {width} columns, more than "
                          f"D = {self.feature_dim} (full would be cheaper); bound it with --graph-topk")

    def _logits(self, features, logits, labels, weight, alpha, beta):
        self.stats.update(features, labels)
        classes = labels.unique()
        cov = self.stats.covariance(self.unbiased, classes)
        if self.arm.reason_cov:
            # eq. 4 from the current Σ, eq. 2's N/(N−1) folded into ε's columns, tail classes only
            scaled_graph = scale_columns(self.graph, self.stats.correction(self.unbiased))
            if self.index_tail:
                rows = self.tail[classes].nonzero().squeeze(1)
                reasoned = reasoning_covariance(scaled_graph, self.stats.cov, classes[rows])
                reasoned = place_rows(reasoned, rows, len(classes))
            else:
                reasoned = scale_covariance(reasoning_covariance(scaled_graph, self.stats.cov, classes), self.tail[classes])
            cov = add_covariance(cov, reasoned)
        mu_r = self.mean_shift[classes] if self.arm.reason_mean else None
        return augmented_logits(logits, labels, weight, cov, mu_r, alpha, beta, classes=classes)

    # --- reference (the authors' released code) -----------------------------------------------
    def _observe(self, features, logits, labels, epoch):
        """Behaviour 5: confusion of every stage-I epoch and features of the last, from the
        training batches (augmentation on, train mode)."""
        self._confusion.index_put_((labels, logits.detach().argmax(1)), torch.ones_like(labels, dtype=torch.float),
                                   accumulate=True)
        if epoch == self.cfg.stage1_epochs - 1:
            self._feature_sum.index_add_(0, labels, features.detach().float())
            self._feature_count += torch.bincount(labels, minlength=self.num_classes)

    def _finish_observations(self, epoch):
        seen = self._confusion.sum()
        if seen > 0:
            accuracy = (self._confusion.trace() / seen).item()
            if accuracy > self.best_train_accuracy:  # strictly better, as in their script
                self.best_train_accuracy = accuracy
                rows = self._confusion / self._confusion.sum(1, keepdim=True).clamp(min=1)
                self.best_graph = torch.round(rows, decimals=2)  # behaviour 4
        if epoch == self.cfg.stage1_epochs - 1 and self._feature_count.sum() > 0:
            self.prototypes = self._feature_sum / self._feature_count.clamp(min=1)[:, None]
        self._reset_observations()

    def _reset_observations(self):
        C, D = self.num_classes, self.feature_dim
        self._confusion = torch.zeros(C, C, device=self.device)
        self._feature_sum = torch.zeros(C, D, device=self.device)
        self._feature_count = torch.zeros(C, dtype=torch.long, device=self.device)

    def _prepare_reference(self, extract):
        if self.best_graph is None or self.prototypes is None:
            warnings.warn("reference variant: no stage-I observations (stage1_epochs=0 or a resumed run "
                          "without them); taking ε and the prototypes from one pass over the training set")
            features, logits, labels = (t.to(self.device) for t in extract())
            if self.best_graph is None:
                self.best_graph = torch.round(knowledge_graph(logits.argmax(1), labels, self.num_classes), decimals=2)
            if self.prototypes is None:
                self.prototypes = class_means(features, labels, self.num_classes)
        self.graph = self._sparsify(self.best_graph)
        self.mean_shift = displacement_prototype(self.graph, self.prototypes)  # behaviour 2
        self.stats.reset()  # their estimator starts empty at stage II

    def _reference_logits(self, features, logits, labels, weight, alpha, beta):
        mu_r = self.mean_shift if self.arm.reason_mean else None
        x = features.detach().float()
        if mu_r is not None:  # their model shifts the feature by αδ_y and the estimator sees the shifted one
            x = x + alpha * mu_r[labels]
        self.stats.update(x, labels)
        if self.arm.reason_cov:  # behaviour 3: written back, so the mixing compounds step after step
            tail = self.tail.nonzero().squeeze(1)
            self.stats.cov[tail] = compound_tail_covariance(self.graph, self.stats.cov, tail)
        # Behaviour 1: the shifted feature adds α w_jᵀδ_y to logit j, which equals α Δw_jᵀδ_y up to a
        # constant over j that softmax ignores, on top of the explicit α Δw_jᵀδ_y: 2α in total.
        return augmented_logits(logits, labels, weight, self.stats.cov, mu_r, 2 * alpha, beta)

    def _sparsify(self, graph):
        return graph if self.cfg.graph_topk is None else keep_top_k(graph, self.cfg.graph_topk)

    # --- checkpoints ----------------------------------------------------------------------
    def state_dict(self):
        graph = self.graph.state_dict() if isinstance(self.graph, TopKGraph) else self.graph
        return {"ready": self.ready, "stats": self.stats.state_dict(), "graph": graph,
                "prototypes": self.prototypes, "mean_shift": self.mean_shift,
                "best_train_accuracy": self.best_train_accuracy, "best_graph": self.best_graph}

    def load_state_dict(self, state):
        if not state:
            return
        to = lambda t: None if t is None else t.to(self.device)
        self.ready = bool(state["ready"])
        self.stats.load_state_dict({k: v.to(self.device) for k, v in state["stats"].items()})
        graph = state["graph"]
        self.graph = TopKGraph(**{k: v.to(self.device) for k, v in graph.items()}) if isinstance(graph, dict) else to(graph)
        self.prototypes, self.mean_shift = to(state["prototypes"]), to(state["mean_shift"])
        self.best_train_accuracy = float(state["best_train_accuracy"])
        self.best_graph = to(state["best_graph"])
