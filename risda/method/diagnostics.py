"""What the knowledge graph lends, measured: ours, not the paper's (which shows no graph).

Read once at the switch to stage II and once at the end of training (risda.trainer.risda_objective), never per
step. Three quantities tell apart why reasoning does or does not pay on a dataset:
  - how much of ε is off the diagonal (1 − ε_cc, what eq. 4-5 read), and how many tail rows
    borrow nothing at all (a memorised training set makes eq. 3 the identity);
  - how large the reasoned terms are next to the class's own: tr(Σʳ_c)/tr(Σ_c) for eq. 4, and
    ‖α μʳ_c‖ over the mean feature norm of class c for eq. 5;
  - the training error of the pass that built ε (0 means eq. 3 sees a memorised set).
"""
from __future__ import annotations

import torch

from .graph import TopKGraph, off_diagonal
from .stats import LowRank

NEIGHBOURS = 3  # top neighbours listed per tail class
# The diagnostics' columns in runs.parquet and trials.parquet: numbers, then JSON text.
DIAGNOSTICS = ("graph_offdiag_tail", "graph_offdiag_all", "graph_empty_tail", "graph_train_error",
               "reason_cov_ratio_first", "reason_cov_ratio_last", "reason_mean_ratio_first", "reason_mean_ratio_last")
DIAGNOSTIC_TEXT = ("graph_neighbours", "graph")
# Post-hoc logit adjustment's τ tuned on validation (risda.trainer.loop.tune_adjustment).
TUNED = ("tuned_tau", "tuned_val_error", "tuned_test_error", "tuned_test_many_error", "tuned_test_medium_error",
         "tuned_test_few_error")


def dense_graph(graph) -> torch.Tensor:
    return graph.dense() if isinstance(graph, TopKGraph) else graph


def graph_summary(graph, tail: torch.Tensor, class_names: list[str], train_error: float | None) -> dict:
    """Off-diagonal row mass over the tail and over all classes, the tail rows that borrow nothing,
    the pass's training error (%), and each tail class's top neighbours by name with their weights."""
    eps = dense_graph(graph).double().cpu()
    tail = tail.cpu()
    off = off_diagonal(eps)
    mass = off.sum(1)
    neighbours = {}
    for c in tail.nonzero().squeeze(1).tolist():
        w, idx = torch.sort(off[c], descending=True, stable=True)
        neighbours[class_names[c]] = [[class_names[i], round(float(v), 4)] for v, i in zip(w[:NEIGHBOURS], idx[:NEIGHBOURS]) if v > 0]
    return dict(graph_offdiag_tail=float(mass[tail].mean()) if tail.any() else None,
                graph_offdiag_all=float(mass.mean()),
                graph_empty_tail=int((mass[tail] == 0).sum()),
                graph_train_error=train_error,
                graph_neighbours=neighbours)


def covariance_traces(cov) -> torch.Tensor:
    """tr(Σ_c) for every class, from any form of Σ (full, diagonal, low rank)."""
    if isinstance(cov, LowRank):
        return cov.factor.pow(2).sum((1, 2)) + cov.diag.sum(1)
    return cov.diagonal(dim1=1, dim2=2).sum(1) if cov.dim() == 3 else cov.sum(1)


def mean_feature_norms(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) the mean ‖f‖ of each class's features (0 for a class with none)."""
    norms = torch.zeros(num_classes, dtype=torch.float64, device=features.device)
    norms.index_add_(0, labels, features.double().norm(dim=1))
    return (norms / torch.bincount(labels, minlength=num_classes).clamp(min=1)).float()


def reasoning_size(graph, traces: torch.Tensor, mean_shift: torch.Tensor | None, alpha: float,
                   feature_norms: torch.Tensor, tail: torch.Tensor) -> dict:
    """Means over the tail classes of tr(Σʳ_c)/tr(Σ_c), with tr(Σʳ_c) = Σ_{i≠c} ε[c,i] tr(Σ_i) (eq. 4
    is linear, so the trace of the reasoned covariance is the ε-weighted sum of traces), and of
    ‖α μʳ_c‖ / mean ‖f‖ of class c (eq. 5, α as applied at that epoch). `traces` is tr(Σ_c) as the
    loss reads it (eq. 2's N/(N−1) applied); classes with tr(Σ_c) = 0 are left out of the first."""
    eps = dense_graph(graph).double()
    traces, tail = traces.double().to(eps.device), tail.to(eps.device)
    reasoned = off_diagonal(eps) @ traces
    has_own = tail & (traces > 0)
    cov_ratio = float((reasoned[has_own] / traces[has_own]).mean()) if has_own.any() else None
    mean_ratio = None
    if mean_shift is not None:
        norms = (alpha * mean_shift.double().norm(dim=1)).to(eps.device)
        f = feature_norms.double().to(eps.device)
        ok = tail & (f > 0)
        mean_ratio = float((norms[ok] / f[ok]).mean()) if ok.any() else None
    return dict(cov_ratio=cov_ratio, mean_ratio=mean_ratio)
