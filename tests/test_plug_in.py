"""The method as a library: RISDALoss in a loop that is not ours gives risda.train's numbers exactly,
and the plug-in example (examples/plug_in.py) runs as a researcher would run it."""
from __future__ import annotations

import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from risda import RISDALoss
from risda.trainer.data import load_long_tail
from risda.trainer.loop import epoch_generator, extract_features, lr_at, observe_generator, train
from risda.trainer.models import build_model

REPO = Path(__file__).resolve().parents[1]


CPU = torch.device("cpu")


def hand_written_loop(cfg, device=CPU):
    """A plain two-stage loop over our ResNet-32 and data with the public RISDALoss: what a
    researcher writes around it. Returns the final weights."""
    data = load_long_tail(cfg, device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    criterion = RISDALoss(data.class_counts, model.feature_dim, cfg.alpha, cfg.beta, head_count=cfg.head_count)
    for epoch in range(cfg.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        if epoch == cfg.stage1_epochs:  # the switch: one train-mode pass over the plain training set
            criterion.prepare(*extract_features(model, data.train, cfg.batch_size, nullcontext,
                                                observe_generator(cfg, epoch, device), batch_stats=True))
        model.train()
        for x, y in data.train.batches(cfg.batch_size, train=True, generator=epoch_generator(cfg, epoch, device)):
            features, logits = model(x)
            if epoch < cfg.stage1_epochs:
                loss = F.cross_entropy(logits, y)
            else:
                loss = criterion(features, logits, y, model.classifier, progress=epoch / cfg.epochs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.state_dict(), criterion


@pytest.mark.slow
def test_a_hand_written_loop_with_risda_loss_gives_risda_train_exactly(tiny_config, tmp_path):
    """fp32, one thread, no compile: the trainer's RISDA arm is RISDALoss, bit for bit."""
    cfg = tiny_config(arm="risda", epochs=4, stage1_epochs=2, head_count=3, lr=0.02, subset_seed=0, pad_mode="zeros",
                      threads=1, compile="off").resolved()
    summary = train(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        weights, criterion = hand_written_loop(cfg)
    finally:
        torch.set_num_threads(threads)
    ours = torch.load(Path(cfg.out) / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ours["model"].keys() == weights.keys()
    assert all(torch.equal(ours["model"][k], weights[k]) for k in weights)
    state = criterion.state_dict()  # the loss's state is what the trainer checkpoints for it
    assert torch.equal(ours["objective"]["stats"]["cov"], state["stats"]["cov"])
    assert torch.equal(ours["objective"]["graph"], state["graph"])
    assert summary["epochs_run"] == cfg.epochs


@pytest.mark.slow
def test_the_plug_in_example_runs_on_a_torchvision_model(cifar10_root):
    """examples/plug_in.py: torchvision's resnet18, stage I then RISDA, on a tiny subset."""
    out = subprocess.run([sys.executable, str(REPO / "examples" / "plug_in.py"), "--data-root", str(cifar10_root),
                          "--n-max", "20", "--epochs", "3", "--test-per-class", "5"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and "stage I " in lines[0] and "stage II" in lines[-1]
    assert all("nan" not in line for line in lines)


def test_risda_loss_state_round_trips_through_torch_save(tmp_path):
    """A user's checkpoint holds the loss's state: save, load into a fresh RISDALoss, same loss."""
    g = torch.Generator().manual_seed(0)
    counts, D = [30, 12, 6, 3], 5
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    features = torch.randn(len(labels), D, generator=g) + torch.randn(len(counts), D, generator=g)[labels]
    classifier = torch.nn.Linear(D, len(counts))
    a = RISDALoss(counts, D, head_count=1).prepare(features, classifier(features).detach(), labels)
    torch.save(a.state_dict(), tmp_path / "loss.pt")
    b = RISDALoss(counts, D, head_count=1)
    b.load_state_dict(torch.load(tmp_path / "loss.pt", weights_only=True))
    batch = torch.randperm(len(labels), generator=g)[:16]
    f, y = features[batch], labels[batch]
    assert torch.equal(a(f, classifier(f), y, classifier, 0.9), b(f, classifier(f), y, classifier, 0.9))


def test_risda_loss_refuses_a_stage_ii_batch_before_prepare():
    loss = RISDALoss([5, 3, 1], 4, head_count=1)
    f = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="call prepare"):
        loss(f, f @ torch.randn(4, 3), torch.tensor([0, 1, 2]), torch.randn(3, 4), 0.9)
    isda = RISDALoss.isda([5, 3, 1], 4)  # ISDA needs no prepare: statistics from the first batch
    assert torch.isfinite(isda(f, f @ torch.randn(4, 3), torch.tensor([0, 1, 2]), torch.randn(3, 4), 0.9))


def test_public_baseline_losses_against_numpy():
    """LDAMLoss (with and without DRW's weights), LogitAdjustedLoss and post-hoc adjustment, recomputed."""
    import numpy as np
    from risda import LDAMLoss, LogitAdjustedLoss, posthoc_logit_adjustment
    counts = np.array([50, 20, 8, 2])
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(6, 4, generator=g), torch.tensor([0, 1, 2, 3, 3, 1])
    z, y = logits.double().numpy(), labels.numpy()

    def ce(z, w=None):
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        w = np.ones(len(counts)) if w is None else w
        return -(w[y] * logp[np.arange(len(y)), y]).sum() / w[y].sum()

    prior = np.log(counts / counts.sum())
    margins = counts ** -0.25 * (0.5 / (counts ** -0.25).max())
    rho = (1 - 0.9999) / (1 - 0.9999 ** counts)
    rho = rho / rho.sum() * len(counts)
    zm = 30 * (z - np.eye(len(counts))[y] * margins[y, None])
    assert np.isclose(LDAMLoss(counts.tolist())(logits, labels).item(), ce(zm), rtol=1e-5)
    assert np.isclose(LDAMLoss(counts.tolist())(logits, labels, drw=True).item(), ce(zm, rho), rtol=1e-5)
    assert np.isclose(LogitAdjustedLoss(counts.tolist(), tau=1.5)(logits, labels).item(), ce(z + 1.5 * prior), rtol=1e-5)
    np.testing.assert_allclose(posthoc_logit_adjustment(logits, counts.tolist()).double().numpy(), z - prior, rtol=1e-5)
