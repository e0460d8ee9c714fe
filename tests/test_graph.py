import numpy as np
import pytest
import torch

from risda.method.graph import (TopKGraph, compound_tail_covariance, displacement_prototype, keep_top_k, knowledge_graph,
                         reasoning_covariance, reasoning_prototype, scale_columns, topk_knowledge_graph)
from risda.method.stats import LowRank


def random_spd(n, d, seed=0):
    a = torch.randn(n, d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.transpose(1, 2) + torch.eye(d, dtype=torch.float64)


def test_knowledge_graph_is_the_row_normalised_confusion():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 3])
    predictions = torch.tensor([0, 1, 1, 3, 1, 0, 3])
    # class 0: 4 images -> 1/4 as 0, 2/4 as 1, 1/4 as 3; class 1: 2 -> 1/2, 1/2; class 2: none; class 3: 1 -> itself
    expected = torch.tensor([[0.25, 0.5, 0, 0.25], [0.5, 0.5, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    torch.testing.assert_close(knowledge_graph(predictions, labels, 4), expected)


def test_reasoning_uses_off_diagonal_entries_only():
    eps = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.9, 0.0], [0.0, 0.6, 0.4]], dtype=torch.float64)
    cov = random_spd(3, 4)
    mu = torch.randn(3, 4, dtype=torch.float64)
    expected_cov = torch.stack([0.3 * cov[1] + 0.2 * cov[2], 0.1 * cov[0], 0.6 * cov[1]])
    torch.testing.assert_close(reasoning_covariance(eps, cov), expected_cov)
    torch.testing.assert_close(reasoning_covariance(eps, cov, chunk_elements=1), expected_cov)  # one neighbour a chunk
    torch.testing.assert_close(reasoning_covariance(eps, cov.diagonal(dim1=1, dim2=2)),
                               expected_cov.diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(reasoning_prototype(eps, mu), torch.stack([0.3 * mu[1] + 0.2 * mu[2], 0.1 * mu[0], 0.6 * mu[1]]))
    subset = torch.tensor([2, 0])
    torch.testing.assert_close(reasoning_covariance(eps, cov, subset), expected_cov[subset])
    torch.testing.assert_close(reasoning_prototype(eps, mu, subset), reasoning_prototype(eps, mu)[subset])
    assert reasoning_covariance(eps, cov, torch.tensor([], dtype=torch.long)).shape == (0, 4, 4)


def confusions(C=7, n=300, seed=0):
    """(predictions, labels) with many tied counts: few images per class, a few likely confusions."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C - 1, (n,), generator=g)  # class C-1 has no image
    wrong = torch.rand(n, generator=g) < 0.6
    predictions = torch.where(wrong, (labels + torch.randint(1, 4, (n,), generator=g)) % C, labels)
    return predictions, labels


@pytest.mark.parametrize("k", [1, 2, 3, 6, 10])
def test_topk_graph_from_pairs_equals_keep_top_k_of_the_dense_graph(k):
    C = 7
    for seed in range(4):
        predictions, labels = confusions(C, n=40 + 30 * seed, seed=seed)
        dense = knowledge_graph(predictions, labels, C)
        sparse = topk_knowledge_graph(predictions, labels, C, k)
        assert sparse.indices.shape == (C, min(k, C - 1))
        torch.testing.assert_close(sparse.dense(), keep_top_k(dense, k))
        torch.testing.assert_close(TopKGraph.from_dense(dense, k).dense(), keep_top_k(dense, k))
    torch.testing.assert_close(TopKGraph.from_dense(dense).dense(), dense)  # k=None: lossless


def covariance_forms(full, rank=2):
    """{form: (Σ in that form, the same Σ dense (C,D,D))}: `full` itself, its diagonal, and a
    LowRank of the first `rank` columns of its Cholesky factor plus half its diagonal."""
    var = full.diagonal(dim1=1, dim2=2)
    low = LowRank(torch.linalg.cholesky(full)[..., :rank].contiguous(), var / 2)
    return {"full": (full, full), "diag": (var, torch.diag_embed(var)), "lowrank": (low, low.dense())}


def as_dense(cov):
    return cov.dense() if isinstance(cov, LowRank) else cov if cov.dim() == 3 else torch.diag_embed(cov)


@pytest.mark.parametrize("form", ["full", "diag", "lowrank"])
@pytest.mark.parametrize("chunk_elements", [2 ** 24, 1])
def test_reasoning_over_a_topk_graph_equals_the_dense_one(form, chunk_elements):
    C, D, k = 7, 3, 2
    predictions, labels = confusions(C)
    sparse = topk_knowledge_graph(predictions, labels, C, k)
    eps = keep_top_k(knowledge_graph(predictions, labels, C), k).double()
    cov, dense_cov = covariance_forms(random_spd(C, D))[form]
    scale = torch.rand(C, dtype=torch.float64)  # eq. 2's N/(N−1), folded into ε's columns
    classes = torch.tensor([0, 2, 3, 6])
    got = reasoning_covariance(scale_columns(sparse, scale), cov, classes, chunk_elements=chunk_elements)
    expected = reasoning_covariance(eps * scale, dense_cov, classes)
    torch.testing.assert_close(as_dense(got), expected)
    if form == "lowrank":
        assert got.factor.shape == (len(classes), D, k * 2)
    mu = torch.randn(C, D, dtype=torch.float64)
    torch.testing.assert_close(reasoning_prototype(sparse, mu, classes), reasoning_prototype(eps, mu, classes))


def test_lowrank_reasoning_from_a_dense_graph():
    eps = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.9, 0.0], [0.0, 0.6, 0.4]], dtype=torch.float64)
    cov, dense_cov = covariance_forms(random_spd(3, 4))["lowrank"]
    torch.testing.assert_close(reasoning_covariance(eps, cov).dense(), reasoning_covariance(eps, dense_cov))


def test_keep_top_k_breaks_ties_to_the_lower_index():
    eps = torch.tensor([[0.4, 0.2, 0.2, 0.2], [0.0, 0.0, 0.5, 0.5], [0.1, 0.1, 0.7, 0.1], [0.25, 0.25, 0.25, 0.25]])
    expected = torch.tensor([[0.4, 0.2, 0.2, 0], [0, 0, 0.5, 0.5], [0.1, 0.1, 0.7, 0], [0.25, 0.25, 0, 0.25]])
    torch.testing.assert_close(keep_top_k(eps, 2), expected)


def test_keep_top_k():
    eps = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.2, 0.2, 0.5, 0.1], [0.1, 0.2, 0.6, 0.1], [0.1, 0.2, 0.3, 0.4]])
    kept = keep_top_k(eps, 1)
    expected = torch.tensor([[0.5, 0, 0.3, 0], [0, 0.2, 0.5, 0], [0, 0.2, 0.6, 0], [0, 0, 0.3, 0.4]])
    torch.testing.assert_close(kept, expected)
    assert ((kept > 0).sum(1) == 2).all()  # the diagonal and one neighbour, out of four non-zeros
    torch.testing.assert_close(keep_top_k(torch.eye(3), 1), torch.eye(3))  # no neighbour: nothing borrowed


def test_displacement_prototype_uses_the_whole_row():
    eps = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    mu = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    torch.testing.assert_close(displacement_prototype(eps, mu), torch.tensor([[-1.0, 2.0], [0.5, -1.0]]))


def test_compounding_write_back_converges_to_the_fixed_point():
    """Σ_T ← ε_T· Σ iterated with Σ_H fixed converges to (I − ε_TT)⁻¹ ε_TH Σ_H."""
    rng = np.random.default_rng(0)
    C, H, D = 6, 2, 3
    eps = rng.random((C, C)) * (rng.random((C, C)) < 0.7)
    eps[:, 0] += 0.1  # every row leaks some mass to a head class, so the iteration contracts
    eps /= eps.sum(1, keepdims=True)
    eps = np.round(eps, 2)  # the reference rounds ε to 2 decimals: rows need not sum to 1
    cov = random_spd(C, D, seed=1).numpy()
    tail = np.arange(H, C)
    # the closed form, computed independently with numpy
    e_tt, e_th = eps[np.ix_(tail, tail)], eps[np.ix_(tail, np.arange(H))]
    fixed = np.linalg.solve(np.eye(len(tail)) - e_tt, e_th @ cov[:H].reshape(H, -1)).reshape(-1, D, D)

    eps_t, cov_t, tail_t = torch.from_numpy(eps), torch.from_numpy(cov).clone(), torch.from_numpy(tail)
    for _ in range(300):
        cov_t[tail_t] = compound_tail_covariance(eps_t, cov_t, tail_t)
    np.testing.assert_allclose(cov_t[tail_t].numpy(), fixed, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(cov_t[:H].numpy(), cov[:H])  # head untouched
    # a tail class's own covariance is washed out: the result does not depend on it
    cov2 = cov.copy()
    cov2[tail] *= 7
    cov_t2 = torch.from_numpy(cov2)
    for _ in range(300):
        cov_t2[tail_t] = compound_tail_covariance(eps_t, cov_t2, tail_t)
    np.testing.assert_allclose(cov_t2[tail_t].numpy(), fixed, rtol=1e-8, atol=1e-8)
