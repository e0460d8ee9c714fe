"""The knowledge graph's sources (risda.method.graph) and its diagnostics (risda.method.diagnostics), against
numpy on the same predictions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from risda.trainer.config import Config, ConfigError
from risda.method.diagnostics import covariance_traces, graph_summary, mean_feature_norms, reasoning_size
from risda.method.graph import (GRAPH_SOURCES, TopKGraph, knowledge_graph, prototype_knowledge_graph, reasoning_covariance,
                         soft_knowledge_graph)

C, N, D = 5, 60, 4


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N) % C
    logits = torch.randn(N, C, generator=g) * 2
    features = torch.randn(N, D, generator=g) + 2 * torch.nn.functional.one_hot(labels, C)[:, :D].float()
    return logits, labels, features


@pytest.mark.parametrize("source", list(GRAPH_SOURCES))
def test_every_source_has_rows_that_sum_to_one(source):
    logits, labels, features = data()
    mu = torch.stack([features[labels == c].mean(0) for c in range(C)])
    eps = GRAPH_SOURCES[source](logits, labels, mu, C, 0.5)
    np.testing.assert_allclose(eps.sum(1).numpy(), np.ones(C), atol=1e-6)
    assert (eps >= 0).all()
    TopKGraph.from_dense(eps, 2)  # the top-k path takes it
    assert reasoning_covariance(TopKGraph.from_dense(eps, 2), torch.ones(C, D)).shape == (C, D)


def test_soft_is_the_mean_predicted_distribution_and_tends_to_confusion():
    logits, labels, _ = data(1)
    p = torch.softmax(logits.double() / 0.7, 1).numpy()
    want = np.stack([p[labels.numpy() == c].mean(0) for c in range(C)])
    np.testing.assert_allclose(soft_knowledge_graph(logits, labels, C, 0.7).numpy(), want, atol=1e-6)
    # its diagonal is the mean probability a class gives itself
    np.testing.assert_allclose(np.diag(want), [p[labels.numpy() == c, c].mean() for c in range(C)], atol=1e-12)
    assert torch.allclose(soft_knowledge_graph(logits, labels, C, 1e-4), knowledge_graph(logits.argmax(1), labels, C))


def test_prototype_is_a_softmax_of_cosines_over_the_other_classes():
    _, _, features = data(2)
    mu = features[:C].double()
    m = mu.numpy()
    cos = m / np.linalg.norm(m, axis=1, keepdims=True)
    cos = cos @ cos.T / 0.3
    np.fill_diagonal(cos, -np.inf)
    want = np.exp(cos - cos.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    eps = prototype_knowledge_graph(mu.float(), 0.3)
    np.testing.assert_allclose(eps.numpy(), want, atol=1e-6)
    assert (eps.diagonal() == 0).all()  # it lends its whole row


def test_a_memorised_training_set_empties_only_the_confusion_graph():
    logits, labels, features = data(3)
    logits = logits + 20 * torch.nn.functional.one_hot(labels, C)  # every prediction right, confidently
    assert (logits.argmax(1) == labels).all()
    mu = torch.stack([features[labels == c].mean(0) for c in range(C)])
    tail = torch.tensor([False, False, True, True, True])
    for source, empty in (("confusion", 3), ("soft", 0), ("prototype", 0)):
        eps = GRAPH_SOURCES[source](logits, labels, mu, C, 1.0 if source == "soft" else 0.1)
        assert graph_summary(eps, tail, list("abcde"), 0.0)["graph_empty_tail"] == empty, source


def test_the_diagnostics_equal_numpy_on_the_same_predictions():
    logits, labels, features = data(4)
    eps = knowledge_graph(logits.argmax(1), labels, C)
    tail = torch.tensor([False, False, True, True, True])
    names = ["airplane", "car", "bird", "cat", "dog"]
    got = graph_summary(eps, tail, names, 12.5)
    p, y = logits.argmax(1).numpy(), labels.numpy()
    conf = np.zeros((C, C))
    np.add.at(conf, (y, p), 1)
    conf /= conf.sum(1, keepdims=True)
    off = conf - np.diag(np.diag(conf))
    assert got["graph_offdiag_tail"] == pytest.approx(off.sum(1)[2:].mean())
    assert got["graph_offdiag_all"] == pytest.approx(off.sum(1).mean())
    assert got["graph_empty_tail"] == int((off.sum(1)[2:] == 0).sum()) and got["graph_train_error"] == 12.5
    top = np.argsort(-off[3], kind="stable")[:3]
    assert [n for n, _ in got["graph_neighbours"]["cat"]] == [names[i] for i in top if off[3, i] > 0]
    # the reasoned terms: tr Σʳ_c / tr Σ_c and ‖α μʳ_c‖ / mean ‖f‖, means over the tail
    cov = torch.stack([torch.cov(features[labels == c].T) for c in range(C)]).double()
    traces = covariance_traces(cov)
    mu = torch.stack([features[labels == c].mean(0) for c in range(C)]).double()
    mu_r = torch.from_numpy(off) @ mu
    norms = mean_feature_norms(features, labels, C)
    size = reasoning_size(eps, traces, mu_r, 0.4, norms, tail)
    tr = np.trace(cov.numpy(), axis1=1, axis2=2)
    want_cov = np.mean([(off[c] @ tr) / tr[c] for c in (2, 3, 4)])
    f = features.double().numpy()
    fn = np.array([np.linalg.norm(f[y == c], axis=1).mean() for c in range(C)])
    want_mean = np.mean([0.4 * np.linalg.norm(mu_r[c].numpy()) / fn[c] for c in (2, 3, 4)])
    assert size["cov_ratio"] == pytest.approx(want_cov) and size["mean_ratio"] == pytest.approx(want_mean, rel=1e-6)


def test_graph_source_is_checked():
    with pytest.raises(ConfigError, match="unknown graph source"):
        Config(graph_source="knn").validate()
    with pytest.raises(ConfigError, match="--graph-source soft with --variant reference"):
        Config(graph_source="soft", variant="reference").validate()
    assert Config(graph_source="prototype").resolved().graph_temperature == 0.1
    assert Config(graph_source="soft").resolved().graph_temperature == 1.0
