import numpy as np
import pytest
import torch

from risda.stats import ClassStatistics, class_means

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
    for x, y in batches:
        stats.update(x.double(), y)  # any input precision is cast to fp32
    assert stats.cov.dtype == torch.float32 and stats.mean.dtype == torch.float32
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
    full, diag = ClassStatistics(C, D), ClassStatistics(C, D, diagonal=True)
    for x, y in batches:
        full.update(x, y), diag.update(x, y)
    for unbiased in (True, False):
        torch.testing.assert_close(diag.covariance(unbiased), full.covariance(unbiased).diagonal(dim1=1, dim2=2))


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


def test_bf16_features_are_stored_fp32_and_detached():
    x = torch.randn(8, D, requires_grad=True)
    stats = ClassStatistics(C, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats.update((x * 1).to(torch.bfloat16), torch.tensor([0, 0, 1, 1, 1, 2, 2, 2]))
    assert stats.cov.dtype == torch.float32 and not stats.cov.requires_grad


def test_class_means():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    labels = torch.tensor([0, 0, 2])
    torch.testing.assert_close(class_means(features, labels, 3), torch.tensor([[2.0, 3.0], [0, 0], [5.0, 6.0]]))
