import numpy as np
import torch

from risda.graph import (compound_tail_covariance, displacement_prototype, keep_top_k, knowledge_graph,
                         reasoning_covariance, reasoning_prototype)


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


def test_keep_top_k():
    eps = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.2, 0.2, 0.5, 0.1], [0.0, 0.0, 1.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    kept = keep_top_k(eps, 1)
    expected = torch.tensor([[0.5, 0, 0.3, 0], [0, 0.2, 0.5, 0], [0, 0, 1.0, 0], [0, 0, 0.3, 0.4]])
    torch.testing.assert_close(kept[[0, 1, 3]], expected[[0, 1, 3]])
    assert kept[2, 2] == 1.0 and (kept[2] > 0).sum() <= 2


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
