"""Per-class feature statistics: prototypes (eq. 1) and covariances (eq. 2), kept online.

The running mean and covariance of each class are merged with every batch by the exact
pooled update of ISDA's estimator. With m new samples of class c (batch mean m̄, batch
covariance S with 1/m normalisation) and n seen so far, w = m / (m + n):

    Σ ← (1−w) Σ + w S + w(1−w) (μ−m̄)(μ−m̄)ᵀ,      μ ← (1−w) μ + w m̄

so after any sequence of batches μ and Σ are exactly the mean and the biased (1/N)
covariance of everything fed in. Always fp32, whatever the training precision.
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 2 ** 24  # 64 MiB of fp32: the most any temporary here may hold


class ClassStatistics:
    """Running per-class mean `mean` (C,D), biased covariance `cov` (C,D,D) — or the
    variances (C,D) when `diagonal` — and sample `count` (C,) of detached features."""

    def __init__(self, num_classes: int, dim: int, device=None, diagonal: bool = False,
                 chunk_elements: int = CHUNK_ELEMENTS):
        self.num_classes, self.dim, self.diagonal = num_classes, dim, diagonal
        self.chunk_elements = chunk_elements
        cov_shape = (num_classes, dim) if diagonal else (num_classes, dim, dim)
        self.mean = torch.zeros(num_classes, dim, device=device)
        self.cov = torch.zeros(cov_shape, device=device)  # normalised by N (biased)
        self.count = torch.zeros(num_classes, dtype=torch.long, device=device)

    def reset(self) -> None:
        self.mean.zero_(), self.cov.zero_(), self.count.zero_()

    def initialise(self, features: torch.Tensor, labels: torch.Tensor) -> "ClassStatistics":
        """Start from one full pass over the training set (e.g. the trainer's extract())."""
        self.reset()
        self.update(features, labels)
        return self

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Merge one batch into the running statistics (eq. 1-2, ISDA's pooled update)."""
        with torch.autocast(features.device.type, enabled=False):
            x = features.detach().float()
            classes, inverse, m = torch.unique(labels, return_inverse=True, return_counts=True)
            batch_mean = torch.zeros(len(classes), self.dim, device=x.device).index_add_(0, inverse, x) / m[:, None]
            centered = x - batch_mean[inverse]
            w = (m / (m + self.count[classes])).float()
            shift = self.mean[classes] - batch_mean
            if self.diagonal:
                batch_var = torch.zeros_like(batch_mean).index_add_(0, inverse, centered ** 2) / m[:, None]
                self.cov[classes] = _merge(self.cov[classes], batch_var, shift ** 2, w[:, None])
            else:
                self._merge_full(classes, inverse, m, centered, shift, w)
            self.mean[classes] = (1 - w[:, None]) * self.mean[classes] + w[:, None] * batch_mean
            self.count[classes] += m

    def _merge_full(self, classes, inverse, m, centered, shift, w) -> None:
        d2 = self.dim * self.dim
        if len(inverse) * d2 <= self.chunk_elements:  # small D: sum the N outer products by class
            outer = centered[:, :, None] * centered[:, None, :]
            batch_cov = torch.zeros(len(classes), self.dim, self.dim, device=centered.device).index_add_(0, inverse, outer)
            shift_outer = shift[:, :, None] * shift[:, None, :]
            self.cov[classes] = _merge(self.cov[classes], batch_cov / m[:, None, None], shift_outer, w[:, None, None])
            return
        # Large D: samples sorted by class so a chunk of classes owns a contiguous run of them;
        # each chunk builds only its K×D×D batch covariances, never N×D×D outer products.
        step = max(1, min(self.chunk_elements // d2, self.chunk_elements // (len(inverse) * self.dim)))
        order = torch.argsort(inverse)
        starts = [0] + torch.cumsum(m, 0).tolist()
        for lo in range(0, len(classes), step):
            hi = min(lo + step, len(classes))
            rows = order[starts[lo]:starts[hi]]
            x = centered[rows]                                                   # (n_k, D)
            own = inverse[rows][None, :] == torch.arange(lo, hi, device=x.device)[:, None]  # (K, n_k)
            batch_cov = (own[:, :, None] * x).transpose(1, 2) @ x / m[lo:hi, None, None]   # (K, D, D)
            s = shift[lo:hi]
            c = classes[lo:hi]
            self.cov[c] = _merge(self.cov[c], batch_cov, s[:, :, None] * s[:, None, :], w[lo:hi, None, None])

    def correction(self, unbiased: bool) -> torch.Tensor:
        """(C,) factor from the stored 1/N covariance to the returned one: N/(N−1) for the
        paper's eq. 2 (0 for a class with N ≤ 1, whose covariance is undefined), else 1."""
        n = self.count.float()
        if not unbiased:
            return torch.ones_like(n)
        return torch.where(n > 1, n / (n - 1).clamp(min=1), torch.zeros_like(n))

    def covariance(self, unbiased: bool, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_c (eq. 2 when unbiased: 1/(N_c−1)), of every class or only of `classes`."""
        cov = self.cov if classes is None else self.cov[classes]
        if not unbiased:
            return cov
        scale = self.correction(True) if classes is None else self.correction(True)[classes]
        return cov * scale.view(-1, *[1] * (cov.dim() - 1))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "cov": self.cov, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean.copy_(state["mean"]), self.cov.copy_(state["cov"]), self.count.copy_(state["count"])


def _merge(cov, batch_cov, shift_outer, w):
    """Pooled covariance of two sample sets with weights (1−w, w): within-set parts plus the
    spread of the two means."""
    return (1 - w) * cov + w * batch_cov + w * (1 - w) * shift_outer


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Prototypes μ_c = (1/N_c) Σ_i f_i (eq. 1); a class with no sample gets zeros."""
    x = features.detach().float()
    sums = torch.zeros(num_classes, x.shape[1], device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1)
    return sums / counts[:, None]
