import numpy as np
import pytest
import torch

from risda.method.stats import ClassStatistics, LowRank, class_means, parse_covariance, place_rows, truncate_rank

C, D = 6, 5


def long_tail_batches(seed=0):
    """Features of C classes (counts 40 … 1, class 4 empty) fed in uneven batches."""
    g = torch.Generator().manual_seed(seed)
    counts = [40, 17, 9, 3, 0, 1]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    offsets = torch.randn(C, D, generator=g) * 3
    features = torch.randn(len(labels), D, generator=g) * torch.linspace(0.5, 2, D) + offsets[labels]
    cuts = [0, 1, 8, 9, 30, 31, 50, len(labels)]  # batches of 1, 7, 1, 21, 1, 19, 20
    batches = [(features[a:b], labels[a:b]) for a, b in zip(cuts, cuts[1:])]
    return features, labels, counts, batches


@pytest.mark.parametrize("chunk_elements", [2 ** 24, 400, 1])  # outer products; 3 classes a chunk; 1
def test_online_matches_numpy(chunk_elements):
    features, labels, counts, batches = long_tail_batches()
    stats = ClassStatistics(C, D, chunk_elements=chunk_elements)
    as_fp32 = ClassStatistics(C, D, chunk_elements=chunk_elements)
    for x, y in batches:
        stats.update(x.double(), y)  # any input precision is cast to fp32 before the merge,
        as_fp32.update(x.float(), y)
    assert torch.equal(stats.cov, as_fp32.cov) and torch.equal(stats.mean, as_fp32.mean)  # so fp64 changes no bit
    assert stats.count.tolist() == counts
    unbiased, biased = stats.covariance(unbiased=True), stats.covariance(unbiased=False)
    for c, n in enumerate(counts):
        x = features[labels == c].double().numpy()
        if n == 0:
            assert (stats.mean[c] == 0).all() and (biased[c] == 0).all() and (unbiased[c] == 0).all()
            continue
        np.testing.assert_allclose(stats.mean[c].numpy(), x.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(biased[c].numpy(), np.cov(x, rowvar=False, ddof=0).reshape(D, D), atol=2e-5)
        expected = np.cov(x, rowvar=False, ddof=1) if n > 1 else np.zeros((D, D))  # eq. 2; n ≤ 1 gets zeros
        np.testing.assert_allclose(unbiased[c].numpy(), expected, atol=2e-5)


def test_diagonal_matches_full():
    _, _, _, batches = long_tail_batches(1)
    full, diag = ClassStatistics(C, D), ClassStatistics(C, D, covariance="diag")
    for x, y in batches:
        full.update(x, y), diag.update(x, y)
    for unbiased in (True, False):
        torch.testing.assert_close(diag.covariance(unbiased), full.covariance(unbiased).diagonal(dim1=1, dim2=2))


def online(covariance, seed=0, chunk_elements=2 ** 24):
    """Full and `covariance` statistics fed the same uneven batches."""
    _, _, counts, batches = long_tail_batches(seed)
    full, other = ClassStatistics(C, D), ClassStatistics(C, D, covariance=covariance, chunk_elements=chunk_elements)
    for x, y in batches:
        full.update(x, y), other.update(x, y)
    return full, other, counts


@pytest.mark.parametrize("chunk_elements", [2 ** 24, 200, 1])  # all classes at once; a few; one by one
def test_lowrank_is_exact_for_classes_of_at_most_k_plus_1_samples(chunk_elements):
    K = 2  # exact for the classes of 3, 0 and 1 samples; the diagonal exact for every class
    features, labels, counts, batches = long_tail_batches()
    full, low, _ = online(f"lowrank:{K}", chunk_elements=chunk_elements)
    assert isinstance(low.cov, LowRank) and low.cov.factor.shape == (C, D, K)
    assert low.count.tolist() == counts
    torch.testing.assert_close(low.mean, full.mean)
    for unbiased in (True, False):
        dense = low.covariance(unbiased).dense()
        torch.testing.assert_close(dense.diagonal(dim1=1, dim2=2), full.covariance(unbiased).diagonal(dim1=1, dim2=2),
                                   atol=2e-5, rtol=1e-5)
        for c, n in enumerate(counts):
            if n <= K + 1:
                x = features[labels == c].double().numpy()
                expected = np.cov(x, rowvar=False, ddof=int(unbiased)).reshape(D, D) if n > 1 else np.zeros((D, D))
                np.testing.assert_allclose(dense[c].numpy(), expected, atol=2e-5)
            else:  # truncated: some of the spread is off the diagonal, so the two differ
                assert not torch.allclose(dense[c], full.covariance(unbiased)[c], atol=1e-3)


def test_lowrank_of_full_rank_equals_full():
    """K ≥ D: nothing to truncate. (K = D−1 is exact only for classes of at most D samples:
    D−1 directions cannot hold a full-rank D×D covariance.)"""
    full, low, _ = online(f"lowrank:{D}", seed=3)
    torch.testing.assert_close(low.cov.dense(), full.cov, atol=2e-5, rtol=1e-5)


def test_truncate_rank_keeps_the_best_part_and_the_whole_diagonal():
    g = torch.Generator().manual_seed(0)
    factor = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    kept, dropped = truncate_rank(factor, 2)
    outer = factor @ factor.mT
    torch.testing.assert_close((kept @ kept.mT).diagonal(dim1=1, dim2=2) + dropped, outer.diagonal(dim1=1, dim2=2))
    eigenvalues, vectors = torch.linalg.eigh(outer)
    best = (vectors[..., -2:] * eigenvalues[:, None, -2:]) @ vectors[..., -2:].mT  # Eckart–Young
    torch.testing.assert_close(kept @ kept.mT, best)
    padded, none = truncate_rank(factor, 6)  # wider than the factor: kept whole, zero-padded
    torch.testing.assert_close(padded[..., :5], factor)
    assert (padded[..., 5] == 0).all() and (none == 0).all()


def test_place_rows():
    rows = torch.tensor([2, 0])
    full = torch.randn(2, D, D)
    placed = place_rows(full, rows, 4)
    torch.testing.assert_close(placed[rows], full)
    assert (placed[[1, 3]] == 0).all()
    low = LowRank(torch.randn(2, D, 3), torch.rand(2, D))
    torch.testing.assert_close(place_rows(low, rows, 4).dense(), place_rows(low.dense(), rows, 4))


def test_parse_covariance_and_memory():
    assert parse_covariance("full") == ("full", None) and parse_covariance("lowrank:16") == ("lowrank", 16)
    with pytest.raises(ValueError, match="lowrank:K"):
        parse_covariance("lowrank:0")
    mean_and_count = C * D * 4 + C * 8
    assert ClassStatistics(C, D).nbytes() == mean_and_count + C * D * D * 4
    assert ClassStatistics(C, D, covariance="diag").nbytes() == mean_and_count + C * D * 4
    assert ClassStatistics(C, D, covariance="lowrank:3").nbytes() == mean_and_count + C * D * (3 + 1) * 4


def test_lowrank_subset_and_state_dict():
    _, low, counts = online("lowrank:2", seed=2)
    classes = torch.tensor([0, 3, 5])
    subset, whole = low.covariance(True, classes), low.covariance(True)
    torch.testing.assert_close(subset.dense(), whole.dense()[classes])
    restored = ClassStatistics(C, D, covariance="lowrank:2")
    restored.load_state_dict({k: v.clone() for k, v in low.state_dict().items()})
    assert set(low.state_dict()) == {"mean", "cov_factor", "cov_diag", "count"}
    torch.testing.assert_close(restored.cov.dense(), low.cov.dense())
    assert restored.count.tolist() == counts


def test_initialise_subset_and_state_dict():
    features, labels, counts, batches = long_tail_batches(2)
    online = ClassStatistics(C, D)
    for x, y in batches:
        online.update(x, y)
    once = ClassStatistics(C, D).initialise(features, labels)
    torch.testing.assert_close(once.cov, online.cov, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(once.mean, online.mean, atol=1e-5, rtol=1e-5)
    classes = torch.tensor([0, 3, 5])
    torch.testing.assert_close(once.covariance(True, classes), once.covariance(True)[classes])
    restored = ClassStatistics(C, D)
    restored.load_state_dict({k: v.clone() for k, v in once.state_dict().items()})
    assert all(isinstance(v, torch.Tensor) for v in once.state_dict().values())
    torch.testing.assert_close(restored.cov, once.cov)
    assert restored.count.tolist() == counts


@pytest.mark.parametrize("covariance", ["full", "diag", "lowrank:2"])
def test_bf16_features_under_autocast_are_merged_in_fp32_and_detached(covariance):
    """The merge ignores an active bf16 autocast: chunk_elements=1 takes the path of batched
    matmuls, which autocast would run in bf16, and the result must equal an fp32 merge of the
    same (bf16-rounded) features bit for bit."""
    x = torch.randn(16, D, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2] * 2)
    stats = ClassStatistics(C, D, covariance=covariance, chunk_elements=1)
    reference = ClassStatistics(C, D, covariance=covariance, chunk_elements=1)
    halves = [(x[:8] * 1).to(torch.bfloat16), (x[8:] * 3 + 1).to(torch.bfloat16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for xb in halves:
            stats.update(xb, y[:8])
    for xb in halves:
        reference.update(xb.detach().float(), y[:8])
    for name, t in stats.tensors().items():
        assert torch.equal(t, reference.tensors()[name]), name
        assert not t.requires_grad, name


def test_class_means():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    labels = torch.tensor([0, 0, 2])
    torch.testing.assert_close(class_means(features, labels, 3), torch.tensor([[2.0, 3.0], [0, 0], [5.0, 6.0]]))
