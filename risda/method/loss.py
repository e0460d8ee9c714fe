"""The RISDA surrogate loss: CE on the augmented logits (eq. 11), class-balanced (eq. 12).

Every sample of class y shares its augmentation terms, so they are computed once per class
present in the batch, as (U, C) tables, and gathered per sample. The variance term needs
Δwᵀ Σ_y Δw for all C classes j, by the covariance's form:
  full (C,D,D)  chunks of K classes build K×C×D products, never the N×D×D covariances per
                sample or N×C×D×D products that ISDA's released code materialises;
  diag (C,D)    three (U,D)×(D,C) products of the expanded square, no Δw at all;
  LowRank       ‖Δwᵀ U_y‖² as W U_y − w_yᵀ U_y (C×R per class, chunked), plus the diag part.
"""
from __future__ import annotations

import torch

from .stats import LowRank

CHUNK_ELEMENTS = 2 ** 24  # 64 MiB of fp32: the most one chunk's temporaries may hold


def class_balanced_weights(counts, gamma: float = 0.9999) -> torch.Tensor:
    """ρ_c = (1−γ)/(1−γ^{n_c}) (eq. 12; Cui et al. 2019), normalised to sum to C.
    An empty class is counted as one image so that every weight stays finite."""
    n = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
    rho = (1 - gamma) / (1 - gamma ** n)
    return (rho * len(n) / rho.sum()).float()


def augmented_logits(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, cov: torch.Tensor,
                     mu_r: torch.Tensor | None, alpha: float, beta: float, classes: torch.Tensor | None = None,
                     chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Z (N,C) of eq. 11: Z_j = logit_j + α Δw_jᵀ μʳ_y + ½ β Δw_jᵀ cov_y Δw_j, Δw_j = w_j − w_y.

    weight: the classifier matrix W (C,D); gradients flow to it (through Δw) and to logits.
    cov: the covariance to use per class: (C,D,D), variances (C,D) for a diagonal one, or a
    LowRank (U Uᵀ + diag per class, risda.method.stats).
    mu_r: the mean shift per class (C,D), or None for none. cov and mu_r are constants.
    classes: if given (sorted), row r of cov and mu_r belongs to class classes[r] (it must
    hold every label), so a caller can pass only the classes in the batch.
    Computed in fp32 (fp64 if the inputs are), whatever autocast is active.
    """
    dtype = torch.promote_types(torch.promote_types(logits.dtype, weight.dtype), torch.float32)
    with torch.autocast(logits.device.type, enabled=False):
        present, inverse = torch.unique(labels, return_inverse=True)
        rows = present if classes is None else torch.searchsorted(classes, present)
        w = weight.to(dtype)
        table = torch.zeros(len(present), w.shape[0], dtype=dtype, device=w.device)
        if beta != 0:
            table = table + 0.5 * beta * variance_table(w, cov, present, rows, chunk_elements)
        if alpha != 0 and mu_r is not None:
            table = table + alpha * mean_shift_table(w, mu_r.detach()[rows].to(dtype), present)
        return logits.to(dtype) + table[inverse]


def variance_table(weight, cov, classes, rows, chunk_elements=CHUNK_ELEMENTS):
    """Q[u, j] = (w_j − w_c)ᵀ Σ_c (w_j − w_c) for c = classes[u], Σ_c = cov[rows[u]], any form:
    the (U,C) variance term of eq. 11. cov is a constant."""
    if isinstance(cov, LowRank):
        cov = cov.map(lambda t: t.detach().to(weight.dtype))
        order, plan = _width_plan(cov.factor, rows, weight.shape[0], chunk_elements)
        low_rank = LowRankQuadraticForm.apply(weight, cov.factor, classes[order], rows[order], plan)
        low_rank = torch.empty_like(low_rank).index_copy(0, order, low_rank)  # back to the order of classes
        return low_rank + diagonal_quadratic_form(weight, cov.diag[rows], classes)
    cov = cov.detach().to(weight.dtype)
    if cov.dim() == 2:
        return diagonal_quadratic_form(weight, cov[rows], classes)
    step = max(1, chunk_elements // (weight.numel() + cov[0].numel()))
    return QuadraticForm.apply(weight, cov, classes, rows, step)


def diagonal_quadratic_form(weight: torch.Tensor, var: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Q[u, j] = Σ_d var[u,d] (w_jd − w_cd)², c = classes[u]: eq. 11's variance term for a
    diagonal Σ, expanded into var·w_j² − 2 (var⊙w_c)·w_j + var·w_c², so that it is three
    (U,D)×(D,C) products and autograd keeps only (U,D) and (C,D) tensors."""
    anchor = weight[classes]
    return var @ weight.square().T - 2 * (var * anchor) @ weight.T + (var * anchor.square()).sum(1, keepdim=True)


def mean_shift_table(weight: torch.Tensor, mu: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """M[u, j] = (w_j − w_c)ᵀ μ_u for c = classes[u]: the mean term of eq. 11, (U,C)."""
    return mu @ weight.T - (weight[classes] * mu).sum(1, keepdim=True)


class QuadraticForm(torch.autograd.Function):
    """Q[u, j] = (w_j − w_c)ᵀ Σ_c (w_j − w_c) for c = classes[u], Σ_c = cov[rows[u]] (D,D): the
    (U,C) variance term of eq. 11. The backward pass recomputes each chunk's Σ_c Δw instead of
    keeping it, so memory stays at one chunk however many classes the batch holds."""

    @staticmethod
    def forward(ctx, weight, cov, classes, rows, step):
        ctx.save_for_backward(weight, cov, classes, rows)
        ctx.step = step
        out = weight.new_empty(len(classes), weight.shape[0])
        for lo, delta, cov_delta in _chunks(weight, cov, classes, rows, step):
            out[lo:lo + len(delta)] = (cov_delta * delta).sum(-1)
        ctx.kept = cov_delta if step >= len(classes) else None  # one chunk (small): keep, don't recompute
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, cov, classes, rows = ctx.saved_tensors
        grad_weight = torch.zeros_like(weight)
        with torch.autocast(weight.device.type, enabled=False):
            chunks = [(0, None, ctx.kept)] if ctx.kept is not None else _chunks(weight, cov, classes, rows, ctx.step)
            for lo, _, cov_delta in chunks:
                k = len(cov_delta)
                g = 2 * grad[lo:lo + k, :, None] * cov_delta  # ∂Q/∂Δw_j = 2 Σ_c Δw_j (Σ symmetric)
                grad_weight += g.sum(0)                        # through w_j
                grad_weight.index_add_(0, classes[lo:lo + k], -g.sum(1))  # through −w_c
        ctx.kept = None
        return grad_weight, None, None, None, None


def _chunks(weight, cov, classes, rows, step):
    """(first row, Δw (K,C,D), Σ_c Δw (K,C,D)) for chunks of K classes."""
    for lo in range(0, len(classes), step):
        delta = weight[None] - weight[classes[lo:lo + step]][:, None]
        yield lo, delta, delta @ cov[rows[lo:lo + step]]


class LowRankQuadraticForm(torch.autograd.Function):
    """Q[u, j] = ‖(w_j − w_c)ᵀ U_c‖² for c = classes[u], U_c = factor[rows[u]] (D,R): the
    low-rank part of eq. 11's variance term. `plan` chunks the rows [(lo, hi, width)]: per chunk
    one (C,D)×(D,K·width) product P = W [U_1 … U_K] minus each class's own row w_cᵀ U_c, over
    the first `width` columns only (the rest are zero: _width_plan); Δw (K,C,D) is never
    formed. The backward recomputes P, as QuadraticForm does its products."""

    @staticmethod
    def forward(ctx, weight, factor, classes, rows, plan):
        ctx.save_for_backward(weight, factor, classes, rows)
        ctx.plan = plan
        out = weight.new_zeros(len(classes), weight.shape[0])
        for lo, hi, projected, _, _ in _projections(weight, factor, classes, rows, plan):
            out[lo:hi] = projected.square().sum(-1).T
        ctx.kept = (lo, hi, projected) if len(plan) == 1 else None  # one chunk (small): keep, don't recompute
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, factor, classes, rows = ctx.saved_tensors
        grad_weight = torch.zeros_like(weight)
        with torch.autocast(weight.device.type, enabled=False):
            if ctx.kept is not None:
                lo, hi, projected = ctx.kept
                block = factor[rows[lo:hi], :, :projected.shape[-1]]
                chunks = [(lo, hi, projected, block, _side_by_side(block))]
            else:
                chunks = _projections(weight, factor, classes, rows, ctx.plan)
            for lo, hi, projected, block, stacked in chunks:
                g = 2 * grad[lo:hi].T[:, :, None] * projected   # ∂/∂P_uj = 2 g_uj P_uj, (C,K,width)
                grad_weight += g.flatten(1) @ stacked.T          # through w_j: Σ_u g_u U_cᵀ
                own = (g.sum(0)[:, None, :] @ block.mT).squeeze(1)  # (K,D)
                grad_weight.index_add_(0, classes[lo:hi], -own)  # through −w_c
        ctx.kept = None
        return grad_weight, None, None, None, None


def _width_plan(factor, rows, num_classes, chunk_elements):
    """(order, plan): the rows sorted by the width their factor uses (up to its last non-zero
    column), and chunks of them [(lo, hi, width)] within chunk_elements. The columns a head
    class's factor carries for reasoning it does not get, or a top-k row pads with, are zero:
    leaving them out of the products is most of the work saved at ImageNet-LT scale."""
    block = factor[rows]
    R, D = block.shape[-1], block.shape[-2]
    used = block.ne(0).any(-2) * torch.arange(1, R + 1, device=block.device)  # (U,R)
    width = used.amax(-1) if R else torch.zeros(len(rows), dtype=torch.long, device=block.device)
    order = torch.argsort(width)
    widths = width[order].tolist()  # the one host sync
    plan, lo = [], 0
    while lo < len(widths):
        hi = lo + 1
        while hi < len(widths) and (hi + 1 - lo) * widths[hi] * (2 * num_classes + D) <= chunk_elements:
            hi += 1
        if widths[hi - 1] > 0:  # a zero factor adds nothing
            plan.append((lo, hi, widths[hi - 1]))
        lo = hi
    return order, plan


def _side_by_side(factors: torch.Tensor) -> torch.Tensor:
    """(K,D,R) -> (D, K·R): the factors of K classes as one matrix, class by class."""
    return factors.permute(1, 0, 2).flatten(1)


def _projections(weight, factor, classes, rows, plan):
    """(lo, hi, P (C,K,width) with P[j,u] = (w_j − w_c)ᵀ U_c, [U_lo … U_hi) (K,D,width), the same
    side by side (D,K·width)) per chunk of the plan."""
    C = weight.shape[0]
    for lo, hi, width in plan:
        block = factor[rows[lo:hi], :, :width]                           # (K,D,width)
        stacked = _side_by_side(block)
        own = (weight[classes[lo:hi]][:, None, :] @ block).squeeze(1)  # w_cᵀ U_c, (K,width)
        yield lo, hi, (weight @ stacked).view(C, hi - lo, width) - own, block, stacked
