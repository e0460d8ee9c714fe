import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from risda.method.loss import augmented_logits, class_balanced_weights
from risda.method.stats import LowRank
from test_graph import covariance_forms as graph_covariance_forms

FORMS = ["full", "diag", "lowrank", "lowrank-ragged"]


def covariance_forms(full):
    """test_graph's forms, and a LowRank whose factors use different widths (the zero columns of
    a head class's reasoning or a short top-k row, a zero factor), which the loss skips."""
    forms = graph_covariance_forms(full, rank=3)
    factor = forms["lowrank"][0].factor.clone()
    factor[1, :, 1:] = 0
    factor[2] = 0
    factor[3, :, 2] = 0
    ragged = LowRank(factor, forms["lowrank"][0].diag)
    return {**forms, "lowrank-ragged": (ragged, ragged.dense())}


def problem(C=5, D=4, N=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(C, D, generator=g, dtype=dtype)
    bias = torch.randn(C, generator=g, dtype=dtype)
    features = torch.randn(N, D, generator=g, dtype=dtype)
    labels = torch.randint(0, C - 1, (N,), generator=g)  # class C-1 never appears
    a = torch.randn(C, D, D, generator=g, dtype=dtype)
    cov = a @ a.transpose(1, 2) / D
    mu_r = torch.randn(C, D, generator=g, dtype=dtype)
    return weight, bias, features, labels, cov, mu_r


def direct(logits, labels, weight, cov, mu_r, alpha, beta):
    """Eq. 11 sample by sample, in numpy."""
    logits, weight, cov, mu_r = (t.detach().double().numpy() for t in (logits, weight, cov, mu_r))
    z = logits.copy()
    for i, y in enumerate(labels.tolist()):
        for j in range(weight.shape[0]):
            dw = weight[j] - weight[y]
            z[i, j] += alpha * dw @ mu_r[y] + 0.5 * beta * dw @ cov[y] @ dw
    return z


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("chunk_elements", [2 ** 24, 1])
def test_matches_a_direct_per_sample_computation(form, chunk_elements):
    weight, bias, features, labels, full, mu_r = problem()
    cov, dense = covariance_forms(full)[form]
    logits = features @ weight.T + bias
    z = augmented_logits(logits, labels, weight, cov, mu_r, 0.7, 1.3, chunk_elements=chunk_elements)
    np.testing.assert_allclose(z.numpy(), direct(logits, labels, weight, dense, mu_r, 0.7, 1.3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
def test_rows_for_the_batch_classes_only(form):
    weight, bias, features, labels, full, mu_r = problem()
    cov = covariance_forms(full)[form][0]
    logits = features @ weight.T + bias
    classes = labels.unique()
    full = augmented_logits(logits, labels, weight, cov, mu_r, 0.3, 0.9)
    compact = augmented_logits(logits, labels, weight, cov[classes], mu_r[classes], 0.3, 0.9, classes=classes)
    torch.testing.assert_close(compact, full)


def test_zero_strength_is_plain_cross_entropy():
    weight, bias, features, labels, cov, mu_r = problem()
    logits = features @ weight.T + bias
    torch.testing.assert_close(augmented_logits(logits, labels, weight, cov, mu_r, 0.0, 0.0), logits)
    torch.testing.assert_close(augmented_logits(logits, labels, weight, cov, None, 0.5, 0.0), logits)
    z = augmented_logits(logits, labels, weight, cov, mu_r, 0.0, 0.0)
    loss = F.cross_entropy(z, labels, weight=torch.ones(5, dtype=z.dtype))  # the ρ-weighted CE of eq. 12, ρ = 1
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))


@pytest.mark.parametrize("form", FORMS)
def test_closed_form_matches_monte_carlo(form):
    """log Σ_j E[exp(Z̃_j − Z̃_y)] over f̃ ~ N(f + αμʳ_y, β cov_y) is the closed form CE(Z), and the
    sampled expected CE, E[−log softmax(W f̃ + b)_y], stays below it (Jensen, eq. 9): for each
    form, with the Gaussian of that form's covariance."""
    weight, bias, features, labels, full, mu_r = problem(C=4, D=3, N=4, seed=1)
    cov, dense = covariance_forms(full)[form]
    weight = weight * 0.6  # keeps the variance of exp(·) small enough for 10⁵ samples
    alpha, beta, samples = 0.4, 0.8, 200_000
    logits = features @ weight.T + bias
    z = augmented_logits(logits, labels, weight, cov, mu_r, alpha, beta)
    bound = torch.logsumexp(z, 1) - z.gather(1, labels[:, None]).squeeze(1)
    g = torch.Generator().manual_seed(2)
    for i, y in enumerate(labels.tolist()):
        chol = torch.linalg.cholesky(beta * dense[y])
        f = features[i] + alpha * mu_r[y] + torch.randn(samples, 3, generator=g, dtype=torch.float64) @ chol.T
        zf = f @ weight.T + bias
        expected_exp = torch.exp(zf - zf[:, y:y + 1]).mean(0)  # E[exp(Z̃_j − Z̃_y)] per j
        assert torch.log(expected_exp.sum()).item() == pytest.approx(bound[i].item(), rel=0.005, abs=0.005)
        sampled_ce = F.cross_entropy(zf, torch.full((samples,), y)).item()
        assert sampled_ce <= bound[i].item()


def test_gradients_reach_the_classifier_and_the_backbone():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).double()
    classifier = nn.Linear(4, 5).double()
    _, _, _, labels, cov, mu_r = problem()
    x = torch.randn(9, 3, dtype=torch.float64)
    cov_param, mu_param = cov.clone().requires_grad_(), mu_r.clone().requires_grad_()

    def loss_of(weight):
        features = backbone(x)
        logits = F.linear(features, weight, classifier.bias)
        return F.cross_entropy(augmented_logits(logits, labels, weight, cov_param, mu_param, 0.6, 0.9), labels)

    assert torch.autograd.gradcheck(loss_of, (classifier.weight.detach().clone().requires_grad_(),))
    loss_of(classifier.weight).backward()
    assert classifier.weight.grad.abs().sum() > 0 and classifier.bias.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())
    assert cov_param.grad is None and mu_param.grad is None  # constants, as in ISDA


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("chunk_elements", [2 ** 24, 200, 1])  # kept for backward; a few classes a chunk; one
def test_gradient_of_the_variance_term_is_the_direct_one(form, chunk_elements):
    """The hand-written backward (it recomputes per chunk) against autograd of the direct formula."""
    weight, _, _, labels, full, mu_r = problem(C=6, D=3, N=12, seed=3)
    cov, dense = covariance_forms(full)[form]
    logits = torch.randn(12, 6, dtype=torch.float64)
    upstream = torch.randn(12, 6, dtype=torch.float64)
    w1 = weight.clone().requires_grad_()
    (augmented_logits(logits, labels, w1, cov, mu_r, 0.5, 1.1, chunk_elements=chunk_elements) * upstream).sum().backward()
    w2 = weight.clone().requires_grad_()
    dw = w2[None] - w2[labels][:, None]                              # (N,C,D)
    quad = torch.einsum("ncd,nde,nce->nc", dw, dense[labels], dw)
    mean = torch.einsum("ncd,nd->nc", dw, mu_r[labels])
    ((logits + 0.5 * mean + 0.5 * 1.1 * quad) * upstream).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad)


@pytest.mark.parametrize("form", FORMS)
def test_fp32_under_bf16_autocast(form):
    weight, bias, features, labels, full, mu_r = problem(dtype=torch.float32)
    cov, dense = covariance_forms(full)[form]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(features, weight, bias)
        assert logits.dtype == torch.bfloat16
        z = augmented_logits(logits, labels, weight, cov, mu_r, 0.5, 0.5)
    assert z.dtype == torch.float32
    expected = direct(logits.float(), labels, weight, dense, mu_r, 0.5, 0.5)
    np.testing.assert_allclose(z.detach().numpy(), expected, rtol=1e-5, atol=1e-4)


def test_class_balanced_weights():
    counts = [500, 120, 30, 5, 1]
    gamma = 0.9999
    rho = class_balanced_weights(counts, gamma)
    raw = np.array([(1 - gamma) / (1 - gamma ** n) for n in counts])
    np.testing.assert_allclose(rho.numpy(), raw / raw.sum() * len(counts), rtol=1e-6)
    assert rho.sum().item() == pytest.approx(len(counts))
    assert (rho[:-1] < rho[1:]).all()  # rarer classes weigh more
    torch.testing.assert_close(class_balanced_weights([7, 7, 7], 0.99), torch.ones(3))
    # F.cross_entropy with weight ρ is the ρ-weighted mean of eq. 12
    logits, labels = torch.randn(6, 5), torch.tensor([0, 1, 1, 3, 4, 4])
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(F.cross_entropy(logits, labels, weight=rho),
                               (rho[labels] * per_sample).sum() / rho[labels].sum())
