"""RISDAObjective without the trainer: a tiny model with a `.classifier` and a fake extract().

The expected losses are recomputed here from the equations with numpy, independently of
risda.method.stats / risda.method.graph / risda.method.loss."""
import copy
import io

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from risda.trainer.config import Config, ConfigError
from risda.method import head_classes
from risda.trainer.loop import make_objective

COUNTS = [12, 8, 5, 3, 2]  # class 4 has 2 images, class 3 three
C, D, IN = len(COUNTS), 4, 3
EPOCHS, STAGE1 = 10, 4


class Tiny(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Linear(IN, D), nn.Tanh())
        self.classifier = nn.Linear(D, C)

    def forward(self, x):
        f = self.backbone(x)
        return f, self.classifier(f)


def dataset(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    x = torch.randn(len(labels), IN, generator=g) + 0.7 * torch.randn(C, IN, generator=g)[labels]
    return x, labels


def batches(x, labels, epoch, size=10):
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(100 + epoch))
    return [(x[order[i:i + size]], labels[order[i:i + size]]) for i in range(0, len(labels), size)]


def extractor(model, x, labels, calls=None):
    def extract(augment=False, batch_stats=False):
        if calls is not None:
            calls.append(1)
        was = model.training
        model.train(batch_stats)
        with torch.no_grad():
            f, z = model(x)
        model.train(was)
        return f, z, labels
    return extract


def config(**kw):
    base = dict(arm="risda", epochs=EPOCHS, stage1_epochs=STAGE1, alpha=0.8, beta=1.2, head_count=2, device="cpu")
    base.update(kw)
    return Config(**base).resolved()


def objective(**kw):
    return make_objective(config(**kw), COUNTS, D, torch.device("cpu"))


# --- independent numpy versions of the equations ---------------------------------------
def np_cov(x, ddof):
    return np.cov(x, rowvar=False, ddof=ddof).reshape(D, D) if len(x) > ddof else np.zeros((D, D))


def np_graph(pred, labels):
    eps = np.zeros((C, C))
    for c in range(C):
        if (labels == c).sum():
            for j in range(C):
                eps[c, j] = ((labels == c) & (pred == j)).sum() / (labels == c).sum()
    return eps


def np_keep_top_k(eps, k):
    """Each row's k largest off-diagonal entries (ties to the lower index) and its diagonal."""
    kept = np.diag(np.diag(eps))
    for c in range(C):
        strongest = sorted((j for j in range(C) if j != c), key=lambda j: (-eps[c, j], j))[:k]
        kept[c, strongest] = eps[c, strongest]
    return kept


def np_cb_weights(gamma=0.9999):
    raw = np.array([(1 - gamma) / (1 - gamma ** n) for n in COUNTS])
    return raw / raw.sum() * C


def np_loss(logits, labels, W, cov, mu_r, alpha, beta, rho):
    z = logits.copy()
    for i, y in enumerate(labels):
        for j in range(C):
            dw = W[j] - W[y]
            z[i, j] += alpha * dw @ mu_r[y] + 0.5 * beta * dw @ cov[y] @ dw
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    w = np.ones(C) if rho is None else rho
    return -(w[labels] * logp[np.arange(len(labels)), labels]).sum() / w[labels].sum()


def np_numpy(*ts):
    return [t.detach().double().numpy() for t in ts]


# --- tests ----------------------------------------------------------------------------
def test_head_classes():
    counts = [5, 9, 9, 3, 9, 1]
    assert head_classes(counts, 2).tolist() == [False, True, True, False, False, False]  # ties by index
    assert head_classes(counts, 2, by_index=True).tolist() == [True, True, False, False, False, False]
    assert head_classes(counts, 2, head_min_count=4).tolist() == [True, True, True, False, True, False]


def test_head_count_defaults_to_20_percent_of_the_classes():
    """Config.head_count None: 20% of the classes, at least 1 (a fixed 20 made every CIFAR-10 class head)."""
    assert Config().head_count is None and Config().validate().head_count is None
    cifar10 = [int(5000 * 0.01 ** (i / 9)) for i in range(10)]      # CIFAR-10-LT, λ=100
    cifar100 = [int(500 * 0.01 ** (i / 99)) for i in range(100)]    # CIFAR-100-LT, λ=100
    assert head_classes(cifar10, None).tolist() == [True, True] + [False] * 8
    assert int(head_classes(cifar100, None).sum()) == 20 and head_classes(cifar100, None)[:20].all()
    assert int(head_classes([3, 2, 1], None).sum()) == 1                # at least one
    make = lambda counts, **kw: make_objective(Config(arm="risda", epochs=EPOCHS, stage1_epochs=STAGE1, device="cpu", **kw)
                                               .resolved(), counts, D, torch.device("cpu"))
    assert int((~make(cifar10).tail).sum()) == 2 and int((~make(cifar100).tail).sum()) == 20
    assert int((~make(cifar10, head_count=5).tail).sum()) == 5          # an explicit count still wins
    with pytest.raises(ConfigError, match="head-count"):
        Config(head_count=-1).validate()


def test_head_and_tail_wiring():
    counts = [5, 12, 3, 8, 2]
    make = lambda **kw: make_objective(config(**kw), counts, D, torch.device("cpu"))
    assert make().tail.tolist() == [True, False, True, False, True]  # the 2 largest are head
    assert make(variant="reference").tail.tolist() == [False, False, True, True, True]  # the first 2 indices
    assert make(head_min_count=4).tail.tolist() == [False, False, True, False, True]


def test_stage1_is_plain_ce_and_extract_runs_once():
    model, (x, labels) = Tiny(), dataset()
    calls = []
    obj = objective()
    extract = extractor(model, x, labels, calls)
    for epoch in range(STAGE1 + 2):
        obj.begin_epoch(epoch, model, extract)
        for xb, yb in batches(x, labels, epoch):
            f, z = model(xb)
            loss = obj.loss(f, z, yb, model, epoch)
            if epoch < STAGE1:
                torch.testing.assert_close(loss, F.cross_entropy(z, yb))
        obj.end_epoch(epoch, model, extract)
        assert len(calls) == (epoch >= STAGE1)
    assert obj.risda.stats.count.tolist() == [3 * n for n in COUNTS]  # the pass, then two epochs of batches


ARM_TERMS = {  # arm: (reweight, reasoning covariance, reasoning mean)
    "risda": (True, True, True), "no_reweight": (False, True, True),
    "no_reasoning": (True, False, False), "cov_only": (True, True, False),
}


@pytest.mark.filterwarnings("ignore:covariance lowrank")  # D = 4 is narrower than any factor here
@pytest.mark.parametrize("arm", list(ARM_TERMS))
@pytest.mark.parametrize("covariance", ["full", "diag", f"lowrank:{D}"])  # rank D: exact, so numpy's Σ
@pytest.mark.parametrize("graph_topk", [None, 2])
def test_paper_arms_match_the_equations(arm, covariance, graph_topk):
    reweight, reason_cov, reason_mean = ARM_TERMS[arm]
    model, (x, labels) = Tiny(), dataset()
    obj = objective(arm=arm, covariance=covariance, graph_topk=graph_topk)
    epoch = STAGE1 + 1
    obj.begin_epoch(STAGE1, model, extractor(model, x, labels))
    xb, yb = batches(x, labels, epoch)[0]
    f, z = model(xb)
    loss = obj.loss(f, z, yb, model, epoch)

    # the stage-II pass (eval mode: Tiny has no train/eval difference) and the batch
    fa, za = np_numpy(*model(x))
    y_all, yb_np = labels.numpy(), yb.numpy()
    fb, zb, W = np_numpy(f, z, model.classifier.weight)
    seen_f, seen_y = np.concatenate([fa, fb]), np.concatenate([y_all, yb_np])
    sigma = np.stack([np_cov(seen_f[seen_y == c], ddof=1) for c in range(C)])  # eq. 2 over all fed
    if covariance == "diag":
        sigma = np.stack([np.diag(np.diag(s)) for s in sigma])
    eps = np_graph(za.argmax(1), y_all)
    if graph_topk is not None:
        eps = np_keep_top_k(eps, graph_topk)
    mu = np.stack([fa[y_all == c].mean(0) for c in range(C)])
    tail = [c for c in range(C) if c >= 2]  # COUNTS is sorted: the 2 largest are head
    cov, mu_r = sigma.copy(), np.zeros((C, D))
    for c in tail:
        others = [i for i in range(C) if i != c]
        if reason_cov:
            cov[c] += sum(eps[c, i] * sigma[i] for i in others)
        if reason_mean:
            mu_r[c] = sum(eps[c, i] * mu[i] for i in others)
    t = epoch / EPOCHS
    expected = np_loss(zb, yb_np, W, cov, mu_r, 0.8 * t, 1.2 * t, np_cb_weights() if reweight else None)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_tail_indexed_or_masked_is_the_same_loss(covariance):
    """Eq. 4 for the tail rows only (a host sync: lowrank, or full at a large D) or for every row
    present, then masked."""
    model, (x, labels) = Tiny(), dataset()
    obj = objective(covariance=covariance)
    obj.begin_epoch(STAGE1, model, extractor(model, x, labels))
    state = copy.deepcopy(obj.state_dict())
    f, z = model(x)
    losses = []
    for index_tail in (False, True):
        obj.load_state_dict(copy.deepcopy(state))  # the same statistics before each step's merge
        obj.risda.index_tail = index_tail
        losses.append(obj.loss(f, z, labels, model, STAGE1 + 1))
    torch.testing.assert_close(losses[0], losses[1])


def test_no_strength_and_no_weights_is_ce():
    model, (x, labels) = Tiny(), dataset()
    obj = objective(arm="no_reweight", alpha=0.0, beta=0.0)
    obj.begin_epoch(STAGE1, model, extractor(model, x, labels))
    f, z = model(x)
    torch.testing.assert_close(obj.loss(f, z, labels, model, STAGE1 + 3), F.cross_entropy(z, labels))


def test_cov_only_has_no_mean_term():
    model, (x, labels) = Tiny(), dataset()
    losses = []
    for arm in ("cov_only", "risda"):
        obj = objective(arm=arm, beta=0.0)  # leaves the mean term alone
        obj.begin_epoch(STAGE1, model, extractor(model, x, labels))
        f, z = model(x)
        losses.append(obj.loss(f, z, labels, model, STAGE1))
    torch.testing.assert_close(losses[0], F.cross_entropy(z, labels, weight=obj.risda.class_weights))
    assert losses[1].item() != pytest.approx(losses[0].item())


def test_isda_from_epoch_0_with_biased_statistics_and_no_weights():
    model, (x, labels) = Tiny(), dataset()
    obj = objective(arm="isda")
    fail = lambda: pytest.fail("isda must not call extract()")
    fed_f, fed_y = [], []
    for epoch in range(2):
        obj.begin_epoch(epoch, model, fail)
        for xb, yb in batches(x, labels, epoch):
            f, z = model(xb)
            loss = obj.loss(f, z, yb, model, epoch)
            fed_f.append(f.detach().double().numpy()), fed_y.append(yb.numpy())
    sf, sy = np.concatenate(fed_f), np.concatenate(fed_y)
    sigma = np.stack([np_cov(sf[sy == c], ddof=0) for c in range(C)])  # ISDA's estimator: 1/N
    fb, zb, W = np_numpy(f, z, model.classifier.weight)
    expected = np_loss(zb, yb.numpy(), W, sigma, np.zeros((C, D)), 0.0, 1.2 * 1 / EPOCHS, None)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_gradients_reach_classifier_and_backbone_in_stage2():
    model, (x, labels) = Tiny(), dataset()
    obj = objective()
    obj.begin_epoch(STAGE1, model, extractor(model, x, labels))
    f, z = model(x)
    obj.loss(f, z, labels, model, STAGE1 + 2).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.filterwarnings("ignore:covariance lowrank", "ignore:reference variant. no stage-I")
def test_lowrank_refused_only_where_the_reference_writes_covariances_back():
    with pytest.raises(ConfigError, match="lowrank:4 with the reference variant.*use the paper variant"):
        objective(covariance="lowrank:4", variant="reference")
    for kw in ({}, {"arm": "isda", "variant": "reference"}, {"arm": "no_reasoning", "variant": "reference"}):
        model, (x, labels) = Tiny(), dataset()
        obj = objective(covariance="lowrank:2", **kw)
        obj.begin_epoch(STAGE1, model, extractor(model, x, labels))
        f, z = model(x)
        assert torch.isfinite(obj.loss(f, z, labels, model, STAGE1 + 1))


def test_lowrank_warns_when_a_dense_graph_makes_the_factor_wider_than_d():
    model, (x, labels) = Tiny(), dataset()
    obj = objective(covariance="lowrank:3")  # 3 columns per neighbour against D = 4
    with pytest.warns(UserWarning, match="--graph-topk"):
        obj.begin_epoch(STAGE1, model, extractor(model, x, labels))


def test_lowrank_with_a_scale_preset_from_the_command_line():
    """`--preset inat2018-r50 --covariance lowrank:16 --arm risda --graph-topk 3`, on a tiny model."""
    import argparse
    from risda.trainer.config import add_config_args, config_overrides
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    args = parser.parse_args(["--preset", "inat2018-r50", "--covariance", "lowrank:16", "--arm", "risda",
                              "--alpha", "0.5", "--graph-topk", "3", "--device", "cpu"])
    cfg = Config(**config_overrides(args)).validate().resolved()
    assert (cfg.covariance, cfg.arm, cfg.dataset, cfg.head_min_count) == ("lowrank:16", "risda", "inat2018", 100)
    model, (x, labels) = Tiny(), dataset()
    obj = make_objective(cfg, COUNTS, D, torch.device("cpu"))
    obj.begin_epoch(cfg.stage1_epochs, model, extractor(model, x, labels))
    assert obj.risda.graph.indices.shape == (C, 3) and obj.risda.stats.cov.factor.shape == (C, D, 16)
    f, z = model(x)
    loss = obj.loss(f, z, labels, model, cfg.stage1_epochs + 1)
    loss.backward()
    assert torch.isfinite(loss) and model.classifier.weight.grad.abs().sum() > 0


def test_reference_variant():
    """Behaviours 1-5: ε from the stage-I epoch whose pass over the training set (after the epoch)
    is the most accurate (rounded in float64), prototypes from the last stage-I epoch's pass,
    displacement δ for every class, 2α, Σ_tail ← ε[tail] @ Σ written back into an estimator
    started empty, head = the first head_count indices, 1/N."""
    model, (x, labels) = Tiny(), dataset()
    obj = objective(variant="reference", head_count=1)
    accuracy, graphs, last_features = [], [], None
    for epoch in range(STAGE1):
        torch.manual_seed(epoch)  # a different classifier every epoch, so the best epoch matters
        nn.init.normal_(model.classifier.weight)
        obj.begin_epoch(epoch, model, lambda **kw: pytest.fail("no extract() at the start of a stage-I epoch"))
        for xb, yb in batches(x, labels, epoch):
            f, z = model(xb)
            torch.testing.assert_close(obj.loss(f, z, yb, model, epoch), F.cross_entropy(z, yb))
        asked = []

        def observe(augment=False, batch_stats=False):
            asked.append(augment)
            with torch.no_grad():
                f, z = model(x)
            return f, z, labels
        obj.end_epoch(epoch, model, observe)
        assert asked == [True]  # one augmented pass after every stage-I epoch
        with torch.no_grad():
            f, z = model(x)
        p, y = z.argmax(1).numpy(), labels.numpy()
        accuracy.append((p == y).mean()), graphs.append(np.round(np_graph(p, y), 2))
        last_features = (f.double().numpy(), y)
    best = int(np.argmax(accuracy))  # first of the best
    assert len(set(accuracy)) > 1, "the test needs epochs of different accuracy"
    eps = graphs[best]
    np.testing.assert_allclose(obj.observations.graph.numpy(), eps, atol=1e-6)
    fl, yl = last_features
    mu = np.stack([fl[yl == c].mean(0) for c in range(C)])
    delta = eps @ mu - mu

    def diagnostics_pass(augment=False, batch_stats=False):
        # ε and the prototypes come from the observations; the one pass at the switch only measures
        # feature norms for the diagnostics, through train-mode batch norm, and changes nothing.
        assert batch_stats and not augment
        with torch.no_grad():
            f, z = model(x)
        return f.clone(), z.clone(), labels
    obj.begin_epoch(STAGE1, model, diagnostics_pass)
    tail = list(range(1, C))
    sigma, mean, count = np.zeros((C, D, D)), np.zeros((C, D)), np.zeros(C)
    for step, (xb, yb) in enumerate(batches(x, labels, STAGE1)[:2]):
        epoch = STAGE1 + step  # α changes between the two steps, so the shifted means matter
        obj.begin_epoch(epoch, model, lambda **kw: pytest.fail("prepared once"))
        f, z = model(xb)
        loss = obj.loss(f, z, yb, model, epoch)
        t = epoch / EPOCHS
        alpha, beta = 0.8 * t, 1.2 * t
        fb, zb, W = np_numpy(f, z, model.classifier.weight)
        y = yb.numpy()
        shifted = fb + alpha * delta[y]  # their estimator sees the shifted feature
        for c in np.unique(y):  # ISDA's pooled merge
            xc = shifted[y == c]
            m, n = len(xc), count[c]
            w = m / (m + n)
            d = mean[c] - xc.mean(0)
            sigma[c] = (1 - w) * sigma[c] + w * np_cov(xc, 0) + w * (1 - w) * np.outer(d, d)
            mean[c], count[c] = (1 - w) * mean[c] + w * xc.mean(0), n + m
        sigma[tail] = np.einsum("ti,ide->tde", eps[tail], sigma)  # written back
        np.testing.assert_allclose(obj.risda.stats.cov.numpy(), sigma, rtol=1e-4, atol=1e-6)
        expected = np_loss(zb, y, W, sigma, delta, 2 * alpha, beta, np_cb_weights())
        assert loss.item() == pytest.approx(expected, rel=1e-5), step


def train(epochs, model, opt, obj, x, labels):
    losses = []
    extract = extractor(model, x, labels)
    for epoch in epochs:
        obj.begin_epoch(epoch, model, extract)
        for xb, yb in batches(x, labels, epoch, size=15):
            f, z = model(xb)
            loss = obj.loss(f, z, yb, model, epoch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        obj.end_epoch(epoch, model, extract)
    return losses


def fresh(kw):
    model = Tiny()
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), objective(**kw)


@pytest.mark.parametrize("kw", [{}, {"variant": "reference"}, {"arm": "isda"}, {"covariance": "diag"},
                                {"covariance": "lowrank:2", "graph_topk": 2}])
@pytest.mark.parametrize("stop", [STAGE1 - 2, STAGE1 + 1])
def test_resume_continues_exactly(kw, stop):
    x, labels = dataset()
    model, opt, obj = fresh(kw)
    straight = train(range(EPOCHS), model, opt, obj, x, labels)

    model, opt, obj = fresh(kw)
    first = train(range(stop + 1), model, opt, obj, x, labels)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "objective": obj.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    model, opt, obj = fresh(kw)
    model.load_state_dict(state["model"]), opt.load_state_dict(state["opt"]), obj.load_state_dict(state["objective"])
    resumed = first + train(range(stop + 1, EPOCHS), model, opt, obj, x, labels)
    np.testing.assert_allclose(resumed, straight, rtol=1e-6)


def test_missing_state_after_resume_prepares_again():
    x, labels = dataset()
    model, opt, obj = fresh({})
    calls = []
    obj.load_state_dict({})  # e.g. resumed in stage II from a checkpoint without the objective's state
    obj.begin_epoch(STAGE1 + 3, model, extractor(model, x, labels, calls))
    assert calls == [1] and obj.risda.ready


def test_bf16_autocast_keeps_statistics_and_loss_in_fp32():
    """Under bf16 autocast the objective gives, bit for bit, what it gives without autocast
    for the same bf16 features and logits: statistics, reasoning and loss run in fp32."""
    model, (x, labels) = Tiny(), dataset()
    obj, fp32 = objective(), objective()
    for o in (obj, fp32):
        o.begin_epoch(STAGE1, model, extractor(model, x, labels))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f, z = model(x)
        assert z.dtype == torch.bfloat16  # the model itself did run in bf16
        loss = obj.loss(f, z, labels, model, STAGE1 + 1)
    expected = fp32.loss(f.float(), z.float(), labels, model, STAGE1 + 1)
    assert torch.isfinite(loss) and torch.equal(loss, expected)
    assert torch.equal(obj.risda.stats.cov, fp32.risda.stats.cov) and torch.equal(obj.risda.stats.mean, fp32.risda.stats.mean)
    grad, = torch.autograd.grad(loss, model.classifier.weight, retain_graph=True)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, model.classifier.weight)[0])
