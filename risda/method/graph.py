"""The knowledge graph ε (eq. 3) and what reasoning borrows through it (eq. 4-5).

Where ε comes from is `--graph-source` (GRAPH_SOURCES): `confusion` is the paper's eq. 3; `soft`
and `prototype` are ours, not the paper's (their docstrings say how each sets its diagonal, i.e.
how much a class lends of its row, since eq. 4-5 read only the off-diagonal part). Every source
gives rows that sum to 1 (0 for a class with no image), and the top-k and low-rank paths take it.

ε[c, j] is the fraction of class-c training images the stage-I classifier predicts as j.
Reasoning uses its off-diagonal entries: a class borrows from the classes it is confused
with, never from itself. The last two functions are the authors' released-code behaviour
("reference" variant, docs/method.md), kept apart so that the paper's equations stay plain.

Two forms of ε: dense (C,C), and TopKGraph, each row's k strongest off-diagonal entries as
(C,k) indices and weights, built straight from the (label, prediction) pairs so that
iNaturalist's 8,142 classes cost O(C·k), not C². The kept weights are ε's own entries, not
renormalised to sum to the row's off-diagonal mass: top-k then only drops the weakest,
noisiest borrowings, and eq. 4-5 with top-k tend to the dense ones as k grows, instead of
lending a tail class with one stray confusion the same borrowed mass as a truly ambiguous one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .stats import LowRank

CHUNK_ELEMENTS = 2 ** 24  # 64 MiB of fp32: the most a gathered block of covariances may hold


@dataclass
class TopKGraph:
    """ε kept sparse: row c borrows weights[c, s] = ε[c, indices[c, s]] from its k strongest
    off-diagonal neighbours (a row with fewer pads with weight 0), and keeps its own ε[c, c]
    in `diagonal` so that dense() equals keep_top_k(ε, k)."""
    indices: torch.Tensor   # (C,k) long
    weights: torch.Tensor   # (C,k)
    diagonal: torch.Tensor  # (C,)

    @classmethod
    def from_dense(cls, eps: torch.Tensor, k: int | None = None) -> "TopKGraph":
        """The k largest off-diagonal entries of each row of a dense ε, ties to the lower index;
        k=None keeps every non-zero one (lossless: as many as the fullest row has)."""
        C = eps.shape[0]
        off = off_diagonal(eps)
        if k is None:
            k = int((off > 0).sum(1).max()) if C else 0
        off.fill_diagonal_(-1.0)  # never selected, not even as a zero pad
        order = torch.sort(off, dim=1, descending=True, stable=True).indices[:, :min(k, max(C - 1, 0))]
        return cls(order, eps.gather(1, order), eps.diagonal().clone())

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def dense(self) -> torch.Tensor:
        C = len(self.diagonal)
        eps = torch.zeros(C, C, dtype=self.weights.dtype, device=self.weights.device)
        eps.scatter_add_(1, self.indices, self.weights)  # add: a pad may repeat an index, with weight 0
        return eps + torch.diag_embed(self.diagonal)

    def rows(self, classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, weights) of the rows of `classes` (default all)."""
        if classes is None:
            return self.indices, self.weights
        return self.indices[classes], self.weights[classes]

    def state_dict(self) -> dict:
        return {"indices": self.indices, "weights": self.weights, "diagonal": self.diagonal}


def knowledge_graph(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """ε (C,C), eq. 3: the row-normalised confusion matrix; a class with no image gets a zero row."""
    confusion = torch.zeros(num_classes, num_classes, device=labels.device)
    confusion.index_put_((labels, predictions), torch.ones_like(labels, dtype=confusion.dtype), accumulate=True)
    return confusion / confusion.sum(1, keepdim=True).clamp(min=1)


def soft_knowledge_graph(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         temperature: float = 1.0) -> torch.Tensor:
    """Ours, not the paper's: eq. 3 with the stage-I classifier's softmax at `temperature` in place
    of its argmax, i.e. row c is the mean predicted distribution over class c's training images.
    Its diagonal is the mean probability a class gives itself, so its off-diagonal mass is
    1 − that: non-zero even on a memorised training set, where eq. 3's is 0. As temperature → 0
    it is `knowledge_graph` (the softmax becomes the argmax)."""
    p = torch.softmax(logits.float() / temperature, dim=1)
    rows = torch.zeros(num_classes, num_classes, device=logits.device).index_add_(0, labels, p)
    return rows / torch.bincount(labels, minlength=num_classes).clamp(min=1)[:, None]


def prototype_knowledge_graph(prototypes: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Ours, not the paper's: row c is a softmax over the other classes of the cosine similarity
    of their prototypes μ_i (eq. 1) to μ_c, at `temperature`. Its diagonal is 0: a class lends its
    whole row, off-diagonal mass 1 (the most any source lends), to the classes whose mean feature
    points its way. It reads the features, not the classifier's decisions, so a memorised training
    set does not empty it. A class with no image gets a zero row."""
    mu = F.normalize(prototypes.float(), dim=1)
    sim = (mu @ mu.T) / temperature
    sim.fill_diagonal_(float("-inf"))
    rows = torch.softmax(sim, dim=1).nan_to_num(0.0)  # C = 1: an all -inf row
    present = prototypes.abs().sum(1) > 0
    return rows * present[:, None] * present[None, :] / (rows * present[None, :]).sum(1, keepdim=True).clamp(min=1e-30)


# --graph-source: name -> ε (C,C) from the switch's pass (logits, labels) and the prototypes.
GRAPH_SOURCES = {
    "confusion": lambda logits, labels, prototypes, C, t: knowledge_graph(logits.argmax(1), labels, C),
    "soft": lambda logits, labels, prototypes, C, t: soft_knowledge_graph(logits, labels, C, t),
    "prototype": lambda logits, labels, prototypes, C, t: prototype_knowledge_graph(prototypes, t),
}
DEFAULT_TEMPERATURE = {"soft": 1.0, "prototype": 0.1}


def topk_knowledge_graph(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int) -> TopKGraph:
    """keep_top_k(knowledge_graph(...), k) as a TopKGraph, from the pairs alone: counts per
    (c, j) by a sort, then each row's k largest (ties to the lower j), never a C×C matrix."""
    C = num_classes
    k = min(k, max(C - 1, 0))
    images = torch.bincount(labels, minlength=C).clamp(min=1).float()
    pairs, counts = torch.unique(labels * C + predictions, return_counts=True)  # sorted by (c, j)
    rows, cols = pairs // C, pairs % C
    own = rows == cols
    diagonal = torch.zeros(C, device=labels.device).index_put_((rows[own],), counts[own].float()) / images
    rows, cols, counts = rows[~own], cols[~own], counts[~own]
    by_count = torch.sort(-counts, stable=True).indices          # j ascending within equal counts
    order = by_count[torch.sort(rows[by_count], stable=True).indices]  # then rows ascending
    rows, cols, counts = rows[order], cols[order], counts[order]
    rank = torch.arange(len(rows), device=rows.device) - torch.searchsorted(rows, rows)  # place in its row
    kept = rank < k
    indices = torch.arange(C, device=labels.device)[:, None].repeat(1, k)  # pad: the class itself, weight 0
    weights = torch.zeros(C, k, device=labels.device)
    indices[rows[kept], rank[kept]] = cols[kept]
    weights[rows[kept], rank[kept]] = counts[kept].float() / images[rows[kept]]
    return TopKGraph(indices, weights, diagonal)


def keep_top_k(eps: torch.Tensor, k: int) -> torch.Tensor:
    """ε with only the k largest off-diagonal entries of each row (the diagonal is kept; ties
    go to the lower index)."""
    return TopKGraph.from_dense(eps, k).dense()


def off_diagonal(eps: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """The rows of ε for `classes` (default: all) with each class's own entry zeroed."""
    classes = torch.arange(eps.shape[0], device=eps.device) if classes is None else classes
    rows = eps[classes].clone()
    rows[torch.arange(len(classes), device=eps.device), classes] = 0
    return rows


def scale_columns(eps, scale: torch.Tensor):
    """ε[c, i] · scale[i], in ε's form: folds a per-class factor of Σ_i into eq. 4's weights."""
    if isinstance(eps, TopKGraph):
        return TopKGraph(eps.indices, eps.weights * scale[eps.indices], eps.diagonal * scale)
    return eps * scale


def reasoning_covariance(eps, cov, classes: torch.Tensor | None = None, chunk_elements: int = CHUNK_ELEMENTS):
    """Σʳ_c = Σ_{i≠c} ε[c,i] Σ_i (eq. 4) for `classes` (default all), in Σ's form: (K,D,D) from
    (C,D,D), (K,D) from variances, or a LowRank whose factor is the neighbours' factors side by
    side, √ε[c,i] U_i (width k·R), and whose diagonal is Σ ε[c,i] d_i. ε dense or TopKGraph."""
    if isinstance(cov, LowRank):
        graph = eps if isinstance(eps, TopKGraph) else TopKGraph.from_dense(eps)  # a host sync: pass a TopKGraph
        return _reason_lowrank(graph, cov, classes)
    if isinstance(eps, TopKGraph):
        return _reason_topk(eps, cov, classes, chunk_elements)
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


def _reason_topk(graph: TopKGraph, cov: torch.Tensor, classes, chunk_elements):
    """Eq. 4 over a TopKGraph for a (C,D,D) or (C,D) tensor: gathers chunk_elements at a time."""
    idx, w = graph.rows(classes)
    w = w.to(cov.dtype)
    per_class = cov[0].numel() if len(cov) else 1
    out = cov.new_zeros(len(idx), *cov.shape[1:])
    step = max(1, chunk_elements // (per_class * max(graph.k, 1)))
    for lo in range(0, len(idx), step):
        block = cov[idx[lo:lo + step]]  # (n, k, ...)
        out[lo:lo + step] = (w[lo:lo + step].view(*w[lo:lo + step].shape, *[1] * (cov.dim() - 1)) * block).sum(1)
    return out


def _reason_lowrank(graph: TopKGraph, cov: LowRank, classes) -> LowRank:
    idx, w = graph.rows(classes)
    w = w.to(cov.diag.dtype)
    n, k = idx.shape
    factors = w.sqrt()[:, :, None, None] * cov.factor[idx]  # (n, k, D, R)
    factor = factors.permute(0, 2, 1, 3).reshape(n, cov.factor.shape[1], k * cov.factor.shape[2])
    return LowRank(factor, (w[:, :, None] * cov.diag[idx]).sum(1))


def reasoning_prototype(eps, mu: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """μʳ_c = Σ_{i≠c} ε[c,i] μ_i (eq. 5) for `classes` (default all): (K,D). ε dense or TopKGraph."""
    if isinstance(eps, TopKGraph):
        idx, w = eps.rows(classes)
        return (w.to(mu.dtype)[:, :, None] * mu[idx]).sum(1)
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
