"""The knowledge graph ε (eq. 3) and what reasoning borrows through it (eq. 4-5).

ε[c, j] is the fraction of class-c training images the stage-I classifier predicts as j.
Reasoning uses its off-diagonal entries: a class borrows from the classes it is confused
with, never from itself. The last two functions are the authors' released-code behaviour
("reference" variant, METHOD.md), kept apart so that the paper's equations stay plain.
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 2 ** 24  # 64 MiB of fp32: the most a gathered block of covariances may hold


def knowledge_graph(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """ε (C,C), eq. 3: the row-normalised confusion matrix; a class with no image gets a zero row."""
    confusion = torch.zeros(num_classes, num_classes, device=labels.device)
    confusion.index_put_((labels, predictions), torch.ones_like(labels, dtype=confusion.dtype), accumulate=True)
    return confusion / confusion.sum(1, keepdim=True).clamp(min=1)


def keep_top_k(eps: torch.Tensor, k: int) -> torch.Tensor:
    """ε with only the k largest off-diagonal entries of each row (the diagonal is kept)."""
    off = off_diagonal(eps)
    kept = torch.zeros_like(off).scatter_(1, off.topk(min(k, eps.shape[1]), dim=1).indices, 1.0)
    return off * kept + torch.diag_embed(eps.diagonal())


def off_diagonal(eps: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """The rows of ε for `classes` (default: all) with each class's own entry zeroed."""
    classes = torch.arange(eps.shape[0], device=eps.device) if classes is None else classes
    rows = eps[classes].clone()
    rows[torch.arange(len(classes), device=eps.device), classes] = 0
    return rows


def reasoning_covariance(eps: torch.Tensor, cov: torch.Tensor, classes: torch.Tensor | None = None,
                         chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Σʳ_c = Σ_{i≠c} ε[c,i] Σ_i (eq. 4) for `classes` (default all): (K,D,D), or (K,D) from
    variances. When Σ is large only neighbours with a non-zero weight are read, a chunk at a time."""
    weights = off_diagonal(eps, classes).to(cov.dtype)
    flat = cov.flatten(1)
    if flat.numel() <= chunk_elements:  # small (CIFAR): one dense product, no host sync
        return (weights @ flat).view(len(weights), *cov.shape[1:])
    neighbours = weights.any(0).nonzero().squeeze(1)  # a confusion graph is sparse: skip the rest
    out = torch.zeros(len(weights), flat.shape[1], dtype=cov.dtype, device=cov.device)
    step = max(1, chunk_elements // flat.shape[1])
    for lo in range(0, len(neighbours), step):
        idx = neighbours[lo:lo + step]
        out += weights[:, idx] @ flat[idx]
    return out.view(len(weights), *cov.shape[1:])


def reasoning_prototype(eps: torch.Tensor, mu: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """μʳ_c = Σ_{i≠c} ε[c,i] μ_i (eq. 5) for `classes` (default all): (K,D)."""
    return off_diagonal(eps, classes).to(mu.dtype) @ mu


# --- the authors' released code ("reference" variant) -----------------------------------
def displacement_prototype(eps: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Reference behaviour 2: δ_c = Σ_j ε[c,j] μ_j − μ_c over the whole row, for every class."""
    return eps.to(mu.dtype) @ mu - mu


def compound_tail_covariance(eps: torch.Tensor, cov: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """Reference behaviour 3: the new tail rows ε[tail] @ Σ (whole rows, a class's own
    covariance included). Written back into the estimator every step (`cov[tail] = ...`),
    it compounds towards the fixed point Σ_T* = (I − ε_TT)⁻¹ ε_TH Σ_H."""
    return (eps[tail].to(cov.dtype) @ cov.flatten(1)).view(-1, *cov.shape[1:])
