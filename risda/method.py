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
docs/method.md; each is marked "behaviour N" where it happens below.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .diagnostics import covariance_traces, mean_feature_norms, reasoning_size
from .graph import (GRAPH_SOURCES, TopKGraph, compound_tail_covariance, displacement_prototype, keep_top_k,
                    knowledge_graph, reasoning_covariance, reasoning_prototype, scale_columns, topk_knowledge_graph)
from .loss import augmented_logits, class_balanced_weights
from .objectives import Objective
from .stats import ClassStatistics, add_covariance, class_means, parse_covariance, place_rows, scale_covariance


@dataclass(frozen=True)
class Parts:
    """Which of RISDA's parts an arm keeps (each arm's are declared in risda.arms)."""
    reweight: bool     # class-balanced ρ (eq. 12)
    reason_cov: bool   # Σʳ for tail classes (eq. 4)
    reason_mean: bool  # μʳ for tail classes (eq. 5)
    from_start: bool   # ISDA: no stage I; statistics and augmentation from epoch 0


def head_classes(counts, head_count: int | None, head_min_count: int | None = None, by_index: bool = False) -> torch.Tensor:
    """(C,) bool, the head classes: with more than head_min_count images if that is set, else
    the head_count largest (ties by index), or the first head_count indices if by_index.
    head_count None: 20% of the classes, at least 1 (the paper's 20 of CIFAR-100's 100)."""
    counts = torch.as_tensor(counts)
    if head_min_count is not None:
        return counts > head_min_count
    if head_count is None:
        head_count = max(1, round(0.2 * len(counts)))
    order = torch.arange(len(counts)) if by_index else torch.sort(-counts, stable=True).indices
    head = torch.zeros(len(counts), dtype=torch.bool)
    head[order[:head_count]] = True
    return head


class RISDAObjective(Objective):
    """The RISDA arms, each a set of `Parts` (risda.arms); cfg is the run's resolved Config, as for
    every Objective."""

    def __init__(self, cfg, class_counts, feature_dim, device, *, parts: Parts):
        super().__init__(cfg, class_counts, feature_dim, device)
        self.arm = parts
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
        # reference behaviour 5: ε and prototypes from eval-mode passes after the stage-I epochs
        self.observations = ReferenceObservations(self.num_classes, cfg.stage1_epochs) if self.reference else None
        # what the graph lends, at the switch ("first") and after the last epoch ("last"): risda.diagnostics
        self.diagnostics = {}

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

    def end_epoch(self, epoch, model, extract):
        if self.reference and not self.stage2(epoch):
            self.observations.after_epoch(epoch, extract)
        if epoch == self.cfg.epochs - 1 and self.ready and not self.arm.from_start:
            features, _, labels = extract(batch_stats=True)
            self._measure("last", epoch, features.to(self.device), labels.to(self.device))

    # --- diagnostics (ours: risda.diagnostics) -----------------------------------------------
    def _measure(self, when, epoch, features, labels):
        """The size of the reasoned terms with the statistics and α of `epoch` (eq. 4-5)."""
        mean_shift = self.mean_shift if self.arm.reason_mean else None
        alpha = self.cfg.alpha * epoch / self.cfg.epochs * (2 if self.reference else 1)  # reference: 2α (behaviour 1)
        traces = covariance_traces(self.stats.covariance(self.unbiased)) if self.arm.reason_cov else None
        norms = mean_feature_norms(features, labels, self.num_classes)
        size = reasoning_size(self.graph, traces if traces is not None else torch.zeros(self.num_classes),
                              mean_shift, alpha, norms, self.tail)
        self.diagnostics[f"reason_cov_ratio_{when}"] = size["cov_ratio"] if self.arm.reason_cov else None
        self.diagnostics[f"reason_mean_ratio_{when}"] = size["mean_ratio"]

    # --- paper ----------------------------------------------------------------------------
    def _prepare(self, extract):
        # The features the stage-II loss sees: train-mode batch norm on plain images. An eval-mode
        # pass reads the running statistics instead, which after a short or unwarmed stage I are
        # far off (features 7x larger in norm, Σ ~50x, measured on a 2-epoch CIFAR-10-LT run) and
        # seeded Σ and μ so large that ½βΔwᵀΣΔw blew W up; with the paper's 160 epochs the two agree.
        features, logits, labels = extract(batch_stats=True)
        predictions = logits.argmax(1)
        logits = logits.to(self.device) if self.cfg.graph_source == "soft" else None  # (N, C): large at iNaturalist scale
        self.prepare(*(t.to(self.device) for t in (features, predictions, labels)), logits=logits)

    def prepare(self, features, predictions, labels, logits=None):
        """The stage-II state from one pass over the training set: prototypes (eq. 1), ε (eq. 3,
        or the --graph-source's) from the stage-I classifier's outputs, the starting statistics;
        and the diagnostics of the switch."""
        self.prototypes = class_means(features, labels, self.num_classes)
        self.graph = self._graph(predictions, labels, logits)
        self.stats.initialise(features, labels)
        self.mean_shift = reasoning_prototype(self.graph, self.prototypes) * self.tail[:, None]
        self.ready = True
        self.diagnostics["graph_train_error"] = 100 * (predictions != labels).double().mean().item()
        self._measure("first", self.cfg.stage1_epochs, features, labels)

    def _graph(self, predictions, labels, logits):
        C, k, source = self.num_classes, self.cfg.graph_topk, self.cfg.graph_source
        if source == "confusion" and k is not None:  # never C×C: what makes C = 8,142 cheap
            return topk_knowledge_graph(predictions, labels, C, k)
        if source == "confusion":
            graph = knowledge_graph(predictions, labels, C)
        elif source == "soft" and logits is None:
            raise ValueError("--graph-source soft needs the stage-I logits: pass logits to prepare()")
        else:
            graph = GRAPH_SOURCES[source](logits, labels, self.prototypes, C, self.cfg.graph_temperature)
        if k is not None:
            return TopKGraph.from_dense(graph, k)
        if self.low_rank:  # the neighbours' factors are gathered per class: a lossless list form
            graph = TopKGraph.from_dense(graph)
            self._warn_if_wide(graph.k)
        return graph

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
    def _prepare_reference(self, extract):
        obs = self.observations
        if obs.graph is None or obs.prototypes is None:  # stage1_epochs=0: nothing was observed
            warnings.warn("reference variant: no stage-I observations (stage1_epochs=0); taking ε and the "
                          "prototypes from one pass over the training set")
            obs.observe(self.cfg.stage1_epochs - 1, *extract())
        self.prototypes = obs.prototypes.to(self.device)
        self.graph = self._sparsify(obs.graph.to(self.device))
        self.mean_shift = displacement_prototype(self.graph, self.prototypes)  # behaviour 2
        self.stats.reset()  # their estimator starts empty at stage II
        self.diagnostics["graph_train_error"] = 100 * (1 - obs.best_accuracy)
        features, _, labels = extract(batch_stats=True)  # feature norms only: changes nothing
        self._measure("first", self.cfg.stage1_epochs, features.to(self.device), labels.to(self.device))

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
                "prototypes": self.prototypes, "mean_shift": self.mean_shift, "diagnostics": dict(self.diagnostics),
                **({"reference": self.observations.state_dict()} if self.reference else {})}

    def load_stage1(self, state):
        """Fork from a shared stage I (risda.stage1): stage I is plain CE for every RISDA arm but
        isda, so only the reference variant takes something from it, its observations."""
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
        to = lambda t: None if t is None else t.to(self.device)
        self.ready = bool(state["ready"])
        self.stats.load_state_dict({k: v.to(self.device) for k, v in state["stats"].items()})
        graph = state["graph"]
        self.graph = TopKGraph(**{k: v.to(self.device) for k, v in graph.items()}) if isinstance(graph, dict) else to(graph)
        self.prototypes, self.mean_shift = to(state["prototypes"]), to(state["mean_shift"])
        self.diagnostics = dict(state.get("diagnostics", {}))
        if self.reference:
            self.observations.load_state_dict(state["reference"])


class ReferenceObservations:
    """Reference behaviour 5, as the authors' script does it: after every stage-I epoch, one
    eval-mode pass over the training set with the training augmentation on. ε (eq. 3, the whole
    row, rounded to 2 decimals in float64 as numpy rounds) comes from the epoch whose pass is the
    most accurate (strictly better wins, so the first of equals); the prototypes (eq. 1) from the
    last stage-I epoch's pass. Neither is refreshed in stage II.

    Only the reference variant pays for the extra pass. The pass draws its augmentation from its
    own generator, in eval mode and without gradients: it leaves the training run untouched, so one
    shared stage I that observes serves both variants (risda.stage1)."""

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
