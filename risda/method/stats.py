"""Per-class feature statistics: prototypes (eq. 1) and covariances (eq. 2), kept online.

The running mean and covariance of each class are merged with every batch by the exact
pooled update of ISDA's estimator. With m new samples of class c (batch mean m̄, batch
covariance S with 1/m normalisation) and n seen so far, w = m / (m + n):

    Σ ← (1−w) Σ + w S + w(1−w) (μ−m̄)(μ−m̄)ᵀ,      μ ← (1−w) μ + w m̄

so after any sequence of batches μ and Σ are exactly the mean and the biased (1/N)
covariance of everything fed in. Always fp32, whatever the training precision.

Three representations of Σ_c (`covariance=`, the config field of the same name):
  full       (C,D,D)                                    C·D² floats
  diag       the variances (C,D): Σ_c's diagonal only   C·D
  lowrank:K  Σ_c ≈ U_c U_cᵀ + diag(d_c), U_c (D,K)      C·D·(K+1)
The low-rank merge is exact before truncation: the merged Σ above is F Fᵀ + diag((1−w) d) with
F = [√(1−w) U, √(w/m) X̃ᵀ, √(w(1−w)) (μ−m̄)] (X̃ the centred batch, rank K+m+1). F is cut back
to its best rank-K part and the discarded part's diagonal moves into d, so diag(Σ) is always
exact, and so is all of Σ for a class of at most K+1 samples (its rank is at most K).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK_ELEMENTS = 2 ** 24  # 64 MiB of fp32: the most any temporary here may hold


def parse_covariance(spec: str) -> tuple[str, int | None]:
    """'full' | 'diag' | 'lowrank:K' -> (form, K)."""
    if spec in ("full", "diag"):
        return spec, None
    if spec.startswith("lowrank:") and spec[8:].isdigit() and int(spec[8:]) > 0:
        return "lowrank", int(spec[8:])
    raise ValueError(f"unknown covariance {spec!r}: choose full, diag or lowrank:K with K > 0")


@dataclass
class LowRank:
    """A stack of covariances Σ_c = U_c U_cᵀ + diag(d_c): factor U (C,D,R), diag d (C,D).
    Indexing selects classes, as it does on a (C,D,D) tensor; nothing here forms a D×D matrix
    except `dense()`, which tests use."""
    factor: torch.Tensor
    diag: torch.Tensor

    def __len__(self):
        return self.diag.shape[0]

    def __getitem__(self, idx) -> "LowRank":
        return LowRank(self.factor[idx], self.diag[idx])

    def __setitem__(self, idx, value: "LowRank") -> None:
        self.factor[idx], self.diag[idx] = value.factor, value.diag

    def map(self, fn) -> "LowRank":
        """The same covariances with `fn` applied to both tensors (detach, .to(dtype), ...)."""
        return LowRank(fn(self.factor), fn(self.diag))

    def dense(self) -> torch.Tensor:
        return self.factor @ self.factor.mT + torch.diag_embed(self.diag)


def scale_covariance(cov, scale: torch.Tensor):
    """scale[c] · Σ_c for a (C,D,D) or (C,D) tensor or a LowRank; scale (C,) ≥ 0."""
    if isinstance(cov, LowRank):
        s = scale.to(cov.diag.dtype)
        return LowRank(cov.factor * s.sqrt()[:, None, None], cov.diag * s[:, None])
    return cov * scale.to(cov.dtype).view(-1, *[1] * (cov.dim() - 1))


def add_covariance(a, b):
    """Σ_a + Σ_b in their common form; two LowRanks concatenate their factors."""
    if isinstance(a, LowRank):
        return LowRank(torch.cat([a.factor, b.factor], -1), a.diag + b.diag)
    return a + b


def place_rows(cov, rows: torch.Tensor, n: int):
    """n covariances in cov's form: cov[i] at rows[i], zero elsewhere."""
    if isinstance(cov, LowRank):
        return LowRank(place_rows(cov.factor, rows, n), place_rows(cov.diag, rows, n))
    return cov.new_zeros(n, *cov.shape[1:]).index_copy_(0, rows, cov)


def truncate_rank(factor: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (…,D,rank), r (…,D)) with F Fᵀ = U Uᵀ + E, U the best rank-`rank` part and r = diag(E),
    for F (…,D,W). Through the W×W Gram matrix, never D×D: F V (V its eigenvectors) has the
    same outer product as F, its columns ordered by energy."""
    width = factor.shape[-1]
    if width <= rank:
        pad = factor.new_zeros(*factor.shape[:-1], rank - width)
        return torch.cat([factor, pad], -1), factor.new_zeros(factor.shape[:-1])
    _, vectors = torch.linalg.eigh((factor.mT @ factor).double())  # fp64: a small W×W problem
    rotated = factor @ vectors.flip(-1).to(factor.dtype)  # decreasing energy
    return rotated[..., :rank].contiguous(), rotated[..., rank:].square().sum(-1)


class ClassStatistics:
    """Running per-class mean `mean` (C,D), biased covariance `cov` — a (C,D,D) tensor, the
    variances (C,D), or a LowRank (module docstring) — and sample `count` (C,) of detached
    features."""

    def __init__(self, num_classes: int, dim: int, device=None, covariance: str = "full",
                 chunk_elements: int = CHUNK_ELEMENTS):
        self.num_classes, self.dim = num_classes, dim
        self.form, self.rank = parse_covariance(covariance)
        self.chunk_elements = chunk_elements
        zeros = lambda *shape: torch.zeros(num_classes, *shape, device=device)
        if self.form == "lowrank":
            self.cov = LowRank(zeros(dim, self.rank), zeros(dim))  # normalised by N (biased)
        else:
            self.cov = zeros(dim, dim) if self.form == "full" else zeros(dim)
        self.mean = zeros(dim)
        self.count = torch.zeros(num_classes, dtype=torch.long, device=device)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor by name: the checkpoint, and what the statistics cost in memory."""
        cov = {"cov_factor": self.cov.factor, "cov_diag": self.cov.diag} if self.form == "lowrank" else {"cov": self.cov}
        return {"mean": self.mean, **cov, "count": self.count}

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values())

    def reset(self) -> None:
        for t in self.tensors().values():
            t.zero_()

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
            if self.form == "diag":
                batch_var = torch.zeros_like(batch_mean).index_add_(0, inverse, centered ** 2) / m[:, None]
                self.cov[classes] = _merge(self.cov[classes], batch_var, shift ** 2, w[:, None])
            elif self.form == "full":
                self._merge_full(classes, inverse, m, centered, shift, w)
            else:
                self._merge_lowrank(classes, inverse, m, centered, shift, w)
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

    def _merge_lowrank(self, classes, inverse, m, centered, shift, w) -> None:
        """The merge of the module docstring, for chunks of classes. Classes are taken in order
        of their batch count so that a chunk pads its classes' samples to similar widths."""
        by_size = torch.argsort(m)
        position = torch.empty_like(by_size)
        position[by_size] = torch.arange(len(by_size), device=m.device)
        sample_position = position[inverse]              # each sample's class, in size order
        order = torch.argsort(sample_position, stable=True)
        sizes = m[by_size].tolist()
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        # slot[i]: where sample order[i] sits among its class's samples
        slot = torch.arange(len(order), device=m.device) - torch.tensor(starts[:-1], device=m.device)[sample_position[order]]
        for lo, hi in self._size_chunks(sizes):
            rows = order[starts[lo]:starts[hi]]
            samples = centered.new_zeros(hi - lo, sizes[hi - 1], self.dim)
            samples[sample_position[rows] - lo, slot[starts[lo]:starts[hi]]] = centered[rows]
            idx = by_size[lo:hi]
            c, wc, mc = classes[idx], w[idx][:, None, None], m[idx][:, None, None]
            old = self.cov[c]
            merged = torch.cat([(1 - wc).sqrt() * old.factor,
                                (wc / mc).sqrt() * samples.mT,
                                (wc * (1 - wc)).sqrt() * shift[idx][:, :, None]], -1)  # (k, D, K+m+1)
            factor, dropped = truncate_rank(merged, self.rank)
            self.cov[c] = LowRank(factor, (1 - wc[:, :, 0]) * old.diag + dropped)

    def _size_chunks(self, sizes):
        """(lo, hi) runs of the ascending `sizes` whose merge factors and Gram matrices together
        stay within chunk_elements (a class alone may exceed it)."""
        lo = 0
        while lo < len(sizes):
            hi = lo + 1
            while hi < len(sizes):
                width = self.rank + sizes[hi] + 1
                if (hi + 1 - lo) * width * (self.dim + width) > self.chunk_elements:
                    break
                hi += 1
            yield lo, hi
            lo = hi

    def correction(self, unbiased: bool) -> torch.Tensor:
        """(C,) factor from the stored 1/N covariance to the returned one: N/(N−1) for the
        paper's eq. 2 (0 for a class with N ≤ 1, whose covariance is undefined), else 1."""
        n = self.count.float()
        if not unbiased:
            return torch.ones_like(n)
        return torch.where(n > 1, n / (n - 1).clamp(min=1), torch.zeros_like(n))

    def covariance(self, unbiased: bool, classes: torch.Tensor | None = None):
        """Σ_c (eq. 2 when unbiased: 1/(N_c−1)), of every class or only of `classes`, in the
        stored form."""
        cov = self.cov if classes is None else self.cov[classes]
        if not unbiased:
            return cov
        scale = self.correction(True) if classes is None else self.correction(True)[classes]
        return scale_covariance(cov, scale)

    def state_dict(self) -> dict:
        return dict(self.tensors())

    def load_state_dict(self, state: dict) -> None:
        for name, t in self.tensors().items():
            t.copy_(state[name])


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
