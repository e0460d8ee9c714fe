"""RISDA's stage-II loss as a plug-in module for any PyTorch training loop.

    criterion = RISDALoss(class_counts, feature_dim=64, alpha=0.5, beta=0.75)
    criterion.prepare(features, logits, labels)      # once, after stage I: one pass over the training set
    loss = criterion(features, logits, labels, model.fc, progress=epoch / epochs)

`prepare` builds what stage II needs from the stage-I model's outputs on the (un-augmented)
training set: the prototypes μ_c (eq. 1), the knowledge graph ε (eq. 3, or another
`graph_source`), the starting class statistics (eq. 1-2) and the reasoned mean shift μʳ (eq. 5).
Every call then merges the batch's features into the statistics (eq. 1-2), reasons a covariance
for the tail classes from the current Σ (eq. 4), and returns the class-balanced (eq. 12) CE of
the augmented logits (eq. 11), with α and β scaled by progress = t/T. Head classes get plain ISDA.

Switches: `reweight`, `reason_cov`, `reason_mean` are the paper's ablations (Table 5);
`RISDALoss.isda(...)` is ISDA (Wang et al. 2019): no reasoning, no weights, statistics from the
first batch with ISDA's 1/N estimator, no `prepare`. `variant="reference"` is the authors'
released code (docs/method.md, behaviours 1-5), prepared with `prepare_observed` from
`risda.method.reference.ReferenceObservations`.

The statistics, ε and the loss are always fp32, whatever autocast is active. The state
(statistics, ε, prototypes) is `state_dict()` / `load_state_dict()`, plain tensors, so a user's
checkpoint can hold it. Pure torch: nothing here reads a config or a file.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .diagnostics import covariance_traces, mean_feature_norms, reasoning_size
from .graph import (DEFAULT_TEMPERATURE, GRAPH_SOURCES, TopKGraph, compound_tail_covariance, displacement_prototype,
                    keep_top_k, knowledge_graph, reasoning_covariance, reasoning_prototype, scale_columns,
                    topk_knowledge_graph)
from .loss import augmented_logits, class_balanced_weights
from .stats import ClassStatistics, add_covariance, class_means, parse_covariance, place_rows, scale_covariance

VARIANTS = ("paper", "reference")


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


class RISDALoss:
    """RISDA's robust loss (eq. 11-12 over the statistics of eq. 1-5). Module docstring: usage.

    class_counts: training images per class (C,); feature_dim: D of the classifier's input.
    alpha, beta: strength of the reasoned prototype and of the covariance (eq. 6; Table 2).
    head_count / head_min_count: the head classes, which borrow nothing (default 20% of C).
    covariance: "full" | "diag" | "lowrank:K" (risda.method.stats). graph_source: "confusion"
    (eq. 3) | "soft" | "prototype" (ours, risda.method.graph); graph_topk keeps k neighbours.
    unbiased: eq. 2's 1/(N−1); default True for the paper, False (ISDA's 1/N) for the reference.
    """

    def __init__(self, class_counts, feature_dim: int, alpha: float = 0.5, beta: float = 0.75, *,
                 head_count: int | None = None, head_min_count: int | None = None, covariance: str = "full",
                 graph_source: str = "confusion", graph_topk: int | None = None,
                 graph_temperature: float | None = None, reweight: bool = True, reason_cov: bool = True,
                 reason_mean: bool = True, cb_gamma: float = 0.9999, variant: str = "paper",
                 unbiased: bool | None = None, device=None):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}: choose paper or reference")
        if graph_source not in GRAPH_SOURCES:
            raise ValueError(f"unknown graph_source {graph_source!r}: choose one of {', '.join(GRAPH_SOURCES)}")
        self.class_counts = [int(n) for n in class_counts]
        self.num_classes, self.feature_dim = len(self.class_counts), feature_dim
        self.alpha, self.beta = alpha, beta
        self.reweight, self.reason_cov, self.reason_mean = reweight, reason_cov, reason_mean
        self.reference = variant == "reference"
        self.device = torch.device(device or "cpu")
        self.graph_source, self.graph_topk = graph_source, graph_topk
        self.graph_temperature = DEFAULT_TEMPERATURE.get(graph_source, 1.0) if graph_temperature is None else graph_temperature
        form = parse_covariance(covariance)[0]
        self.low_rank = form == "lowrank"
        if self.low_rank and self.reference and reason_cov:
            raise ValueError(f"covariance {covariance} with the reference variant: it writes ε[tail] @ Σ back into "
                             "the estimator every step, which a rank-K factor cannot hold without re-truncating it "
                             "thousands of times; use the paper variant, or covariance full or diag with the reference")
        # Reasoning (eq. 4) for the tail rows present only costs a host sync to index them; masking
        # instead costs reasoning for every class present. The low-rank merge syncs anyway, and
        # with D×D per class at ResNet-50's D the gathers outweigh a sync by far.
        self.index_tail = self.low_rank or (form == "full" and feature_dim >= 512)
        # eq. 2 divides by N−1; ISDA's estimator, and the authors' code built on it, keep 1/N.
        self.unbiased = (not self.reference) if unbiased is None else unbiased
        self.stats = ClassStatistics(self.num_classes, feature_dim, self.device, covariance=covariance)
        self.class_weights = class_balanced_weights(self.class_counts, cb_gamma).to(self.device) if reweight else None
        head = head_classes(self.class_counts, head_count, head_min_count, by_index=self.reference)  # behaviour 4
        self.tail = (~head).to(self.device)
        self.ready = False       # prepared: graph, prototypes and statistics in place
        self.graph = None        # ε that reasoning reads: (C,C), or a TopKGraph
        self.prototypes = None   # μ_c (C,D), fixed through stage II
        self.mean_shift = None   # μʳ (C,D): eq. 5 for tail classes, 0 for head; δ for all (reference)
        self.diagnostics = {}    # what the graph lends (risda.method.diagnostics): measure()

    @classmethod
    def isda(cls, class_counts, feature_dim: int, beta: float = 0.5, *, covariance: str = "full", device=None):
        """ISDA (Wang et al., NeurIPS 2019): the covariance term alone, no reasoning, no class
        weights, statistics from the first batch on with ISDA's 1/N estimator; no prepare()."""
        return cls(class_counts, feature_dim, 0.0, beta, covariance=covariance, reweight=False, reason_cov=False,
                   reason_mean=False, unbiased=False, device=device)

    # --- stage I -> stage II ---------------------------------------------------------------
    def prepare(self, features, logits, labels, *, predictions=None) -> "RISDALoss":
        """The stage-II state from one pass of the stage-I model over the training set (paper
        variant): prototypes (eq. 1), ε (eq. 3, or graph_source's), the starting statistics
        (eq. 1-2), μʳ (eq. 5); and the diagnostics of the switch. features (N,D), logits (N,C),
        labels (N,). At a very large C pass logits=None and predictions = the argmax (N,); only
        the soft graph needs the logits themselves."""
        if self.reference:
            raise ValueError("the reference variant is prepared from its stage-I observations: use prepare_observed()")
        features, labels = features.to(self.device), labels.to(self.device)
        if predictions is None:
            predictions = logits.argmax(1)
        predictions = predictions.to(self.device)
        logits = logits.to(self.device) if logits is not None and self.graph_source == "soft" else None
        self.prototypes = class_means(features, labels, self.num_classes)
        self.graph = self._graph(predictions, labels, logits)
        self.stats.initialise(features, labels)
        self.mean_shift = reasoning_prototype(self.graph, self.prototypes) * self.tail[:, None]
        self.ready = True
        self.diagnostics["graph_train_error"] = 100 * (predictions != labels).double().mean().item()
        return self

    def prepare_observed(self, graph, prototypes, train_error: float | None = None) -> "RISDALoss":
        """The reference variant's stage-II state (the authors' code): ε and the prototypes as
        observed during stage I (reference.ReferenceObservations), the displacement δ as μʳ
        (behaviour 2), and an empty estimator (their statistics start at stage II)."""
        self.prototypes = prototypes.to(self.device)
        self.graph = graph.to(self.device) if self.graph_topk is None else keep_top_k(graph.to(self.device), self.graph_topk)
        self.mean_shift = displacement_prototype(self.graph, self.prototypes)  # behaviour 2
        self.stats.reset()
        self.ready = True
        if train_error is not None:
            self.diagnostics["graph_train_error"] = train_error
        return self

    def _graph(self, predictions, labels, logits):
        C, k, source = self.num_classes, self.graph_topk, self.graph_source
        if source == "confusion" and k is not None:  # never C×C: what makes C = 8,142 cheap
            return topk_knowledge_graph(predictions, labels, C, k)
        if source == "confusion":
            graph = knowledge_graph(predictions, labels, C)
        elif source == "soft" and logits is None:
            raise ValueError("graph_source soft needs the stage-I logits: pass them to prepare()")
        else:
            graph = GRAPH_SOURCES[source](logits, labels, self.prototypes, C, self.graph_temperature)
        if k is not None:
            return TopKGraph.from_dense(graph, k)
        if self.low_rank:  # the neighbours' factors are gathered per class: a lossless list form
            graph = TopKGraph.from_dense(graph)
            self._warn_if_wide(graph.k)
        return graph

    def _warn_if_wide(self, neighbours):
        rank, width = self.stats.rank, (neighbours + 1) * self.stats.rank
        if width > self.feature_dim:
            warnings.warn(f"covariance lowrank:{rank} with a dense knowledge graph: a tail class borrows from up "
                          f"to {neighbours} classes, so its reasoning covariance has {width} columns, more than "
                          f"D = {self.feature_dim} (full would be cheaper); bound it with graph_topk (--graph-topk)")

    # --- the loss ---------------------------------------------------------------------------
    def __call__(self, features, logits, labels, classifier, progress: float) -> torch.Tensor:
        return self.forward(features, logits, labels, classifier, progress)

    def forward(self, features, logits, labels, classifier, progress: float) -> torch.Tensor:
        """The loss of a batch: features (N,D) (detached here: the statistics are constants),
        logits (N,C) = classifier(features), labels (N,), classifier the last layer (its
        `.weight` (C,D), or that matrix), progress = t/T in [0, 1] (α and β grow with it).
        Merges the batch into the class statistics (eq. 1-2) as a side effect, as ISDA does."""
        if not self.ready and (self.reason_cov or self.reason_mean or self.reference):
            raise RuntimeError("RISDALoss: call prepare() with the stage-I model's outputs before the first "
                               "stage-II batch (reasoning needs the knowledge graph and the prototypes)")
        weight = classifier if isinstance(classifier, torch.Tensor) else classifier.weight
        with torch.autocast(features.device.type, enabled=False):  # statistics and loss always in fp32
            alpha, beta = self.alpha * progress, self.beta * progress
            if self.reference:
                z = self._reference_logits(features, logits, labels, weight, alpha, beta)
            else:
                z = self.augmented(features, logits, labels, weight, alpha, beta)
            return F.cross_entropy(z, labels, weight=self.class_weights)

    def augmented(self, features, logits, labels, weight, alpha, beta):
        """Eq. 11's Z for a batch (paper variant), after merging it into the statistics."""
        self.stats.update(features, labels)
        classes = labels.unique()
        cov = self.stats.covariance(self.unbiased, classes)
        if self.reason_cov:
            # eq. 4 from the current Σ, eq. 2's N/(N−1) folded into ε's columns, tail classes only
            scaled_graph = scale_columns(self.graph, self.stats.correction(self.unbiased))
            if self.index_tail:
                rows = self.tail[classes].nonzero().squeeze(1)
                reasoned = reasoning_covariance(scaled_graph, self.stats.cov, classes[rows])
                reasoned = place_rows(reasoned, rows, len(classes))
            else:
                reasoned = scale_covariance(reasoning_covariance(scaled_graph, self.stats.cov, classes), self.tail[classes])
            cov = add_covariance(cov, reasoned)
        mu_r = self.mean_shift[classes] if self.reason_mean else None
        return augmented_logits(logits, labels, weight, cov, mu_r, alpha, beta, classes=classes)

    def _reference_logits(self, features, logits, labels, weight, alpha, beta):
        mu_r = self.mean_shift if self.reason_mean else None
        x = features.detach().float()
        if mu_r is not None:  # their model shifts the feature by αδ_y and the estimator sees the shifted one
            x = x + alpha * mu_r[labels]
        self.stats.update(x, labels)
        if self.reason_cov:  # behaviour 3: written back, so the mixing compounds step after step
            tail = self.tail.nonzero().squeeze(1)
            self.stats.cov[tail] = compound_tail_covariance(self.graph, self.stats.cov, tail)
        # Behaviour 1: the shifted feature adds α w_jᵀδ_y to logit j, which equals α Δw_jᵀδ_y up to a
        # constant over j that softmax ignores, on top of the explicit α Δw_jᵀδ_y: 2α in total.
        return augmented_logits(logits, labels, weight, self.stats.cov, mu_r, 2 * alpha, beta)

    # --- diagnostics (ours: risda.method.diagnostics) ------------------------------------------
    def measure(self, when: str, alpha: float, features, labels) -> dict:
        """The size of the reasoned terms (eq. 4-5) at reasoning strength `alpha` (as applied:
        the reference variant's 2α is the caller's), recorded as diagnostics[..._{when}]."""
        mean_shift = self.mean_shift if self.reason_mean else None
        traces = covariance_traces(self.stats.covariance(self.unbiased)) if self.reason_cov else None
        norms = mean_feature_norms(features.to(self.device), labels.to(self.device), self.num_classes)
        size = reasoning_size(self.graph, traces if traces is not None else torch.zeros(self.num_classes),
                              mean_shift, alpha, norms, self.tail)
        self.diagnostics[f"reason_cov_ratio_{when}"] = size["cov_ratio"] if self.reason_cov else None
        self.diagnostics[f"reason_mean_ratio_{when}"] = size["mean_ratio"]
        return self.diagnostics

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        graph = self.graph.state_dict() if isinstance(self.graph, TopKGraph) else self.graph
        return {"ready": self.ready, "stats": self.stats.state_dict(), "graph": graph,
                "prototypes": self.prototypes, "mean_shift": self.mean_shift, "diagnostics": dict(self.diagnostics)}

    def load_state_dict(self, state: dict) -> None:
        to = lambda t: None if t is None else t.to(self.device)
        self.ready = bool(state["ready"])
        self.stats.load_state_dict({k: v.to(self.device) for k, v in state["stats"].items()})
        graph = state["graph"]
        self.graph = TopKGraph(**{k: v.to(self.device) for k, v in graph.items()}) if isinstance(graph, dict) else to(graph)
        self.prototypes, self.mean_shift = to(state["prototypes"]), to(state["mean_shift"])
        self.diagnostics = dict(state.get("diagnostics", {}))
