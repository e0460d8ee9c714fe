"""The field's baselines as arms (risda.trainer.arms): each loss against numpy, their stage-I keys, the
post-hoc arm that trains nothing, and an arm that is one entry."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from risda.trainer import arms
from risda.trainer.arms import ARMS, Arm
from risda.trainer.config import Config, ConfigError
from risda.trainer.objectives import Objective
from risda.trainer.stage1 import shares_stage1, stage1_key, stage1_training_config
from risda.trainer.loop import make_objective

COUNTS = [500, 120, 30, 8, 3]
C = len(COUNTS)


def batch(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, C, generator=g, dtype=torch.float64).float() * 3
    labels = torch.randint(0, C, (n,), generator=g)
    return logits, labels


def np_ce(z, y, w=None):
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    nll = -logp[np.arange(len(y)), y]
    if w is None:
        return nll.mean()
    return (w[y] * nll).sum() / w[y].sum()  # torch's weighted mean


def objective(arm, **kw):
    cfg = Config(arm=arm, epochs=10, stage1_epochs=8, device="cpu", **kw).validate().resolved()
    return make_objective(cfg, COUNTS, 4, torch.device("cpu"))


def loss(obj, logits, labels, epoch=0):
    return obj.loss(torch.zeros(len(labels), 4), logits, labels, None, epoch).item()


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_logit_adjusted_loss_is_its_numpy_form(tau):
    logits, labels = batch()
    prior = np.array(COUNTS, dtype=np.float64) / sum(COUNTS)
    want = np_ce(logits.double().numpy() + tau * np.log(prior), labels.numpy())
    for epoch in (0, 9):  # the same loss in both stages
        assert loss(objective("la_loss", la_tau=tau), logits, labels, epoch) == pytest.approx(want, rel=1e-5)


def test_balanced_softmax_is_log_n_added_and_equals_la_loss_at_tau_1():
    logits, labels = batch(1)
    want = np_ce(logits.double().numpy() + np.log(np.array(COUNTS, dtype=np.float64)), labels.numpy())
    bs, la = loss(objective("balanced_softmax"), logits, labels), loss(objective("la_loss", la_tau=1.0), logits, labels)
    assert bs == pytest.approx(want, rel=1e-5) and bs == pytest.approx(la, rel=1e-6)
    assert ARMS["balanced_softmax"].objective is ARMS["la_loss"].objective  # one class, not two
    with pytest.raises(ConfigError, match="balanced_softmax is la_loss at --la-tau 1"):
        Config(arm="balanced_softmax", la_tau=2.0).validate()


def test_deferred_la_is_ce_in_stage_1_and_the_la_loss_in_stage_2_on_the_shared_ce_stage_1():
    logits, labels = batch(4)
    prior = np.array(COUNTS, dtype=np.float64) / sum(COUNTS)
    obj = objective("la_deferred", la_tau=1.5)
    assert loss(obj, logits, labels, 7) == pytest.approx(np_ce(logits.double().numpy(), labels.numpy()), rel=1e-5)
    want = np_ce(logits.double().numpy() + 1.5 * np.log(prior), labels.numpy())
    assert loss(obj, logits, labels, 8) == pytest.approx(want, rel=1e-5)  # stage II: epoch 8 of 10
    base = dict(subset_seed=0, pad_mode="zeros", warmup_epochs=5)
    assert stage1_key(Config(arm="la_deferred", la_tau=1.5, **base).resolved()) == stage1_key(Config(arm="ce", **base).resolved())
    assert ARMS["la_deferred"].label != ARMS["la_loss"].label and not ARMS["la_deferred"].published  # never relabelled


def test_ldam_drw_is_its_numpy_form_with_drw_weights_in_stage_2():
    logits, labels = batch(2)
    z = np.tanh(logits.double().numpy())  # cosine logits, in [-1, 1]
    n = np.array(COUNTS, dtype=np.float64)
    m = n ** -0.25
    m = m * 0.5 / m.max()  # the largest margin is 0.5 (the rarest class)
    assert np.isclose(m[-1], 0.5) and np.all(np.diff(m) > 0)
    zm = z.copy()
    zm[np.arange(len(labels)), labels.numpy()] -= m[labels.numpy()]
    obj = objective("ldam_drw")
    t = torch.from_numpy(z).float()
    assert loss(obj, t, labels, 0) == pytest.approx(np_ce(30 * zm, labels.numpy()), rel=1e-5)
    beta = 0.9999
    w = (1 - beta) / (1 - beta ** n)
    w = w / w.sum() * C
    assert loss(obj, t, labels, 9) == pytest.approx(np_ce(30 * zm, labels.numpy(), w), rel=1e-5)


def test_posthoc_la_adjusts_only_the_evaluation():
    obj = objective("ce_posthoc_la")
    logits, labels = batch(3)
    assert loss(obj, logits, labels) == pytest.approx(loss(objective("ce"), logits, labels))  # trains as CE
    prior = np.array(COUNTS, dtype=np.float64) / sum(COUNTS)
    np.testing.assert_allclose(obj.eval_adjustment.numpy(), -np.log(prior), rtol=1e-6)
    assert objective("ce").eval_adjustment is None


def test_ldam_and_la_stage1_are_keyed_apart_and_shared_by_stage2_fields():
    base = dict(subset_seed=0, pad_mode="zeros", warmup_epochs=5)
    ce, ldam, la = (stage1_key(Config(arm=a, **base).resolved()) for a in ("ce", "ldam_drw", "la_loss"))
    assert len({ce, ldam, la}) == 3
    assert stage1_key(Config(arm="risda", **base).resolved()) == stage1_key(Config(arm="ce_drw", **base).resolved()) == ce
    # two LDAM-DRW cells that differ only in a stage-II field share it; its own fields do not
    assert stage1_key(Config(arm="ldam_drw", cb_gamma=0.999, **base).resolved()) == ldam
    assert stage1_key(Config(arm="ldam_drw", ldam_scale=10.0, **base).resolved()) != ldam
    assert stage1_key(Config(arm="la_loss", la_tau=2.0, **base).resolved()) != la
    assert stage1_key(Config(arm="balanced_softmax", **base).resolved()) == la  # the same loss at τ = 1
    # an arm's own fields change no CE stage I
    assert stage1_key(Config(arm="risda", la_tau=2.0, ldam_scale=10.0, **base).resolved()) == ce
    assert stage1_training_config(Config(arm="ldam_drw", cb_gamma=0.99).resolved()).arm == "ldam_drw"
    assert stage1_training_config(Config(arm="ldam_drw", cb_gamma=0.99).resolved()).cb_gamma == Config().cb_gamma


def test_ldam_drw_trains_a_cosine_classifier(tmp_path):
    from risda.trainer.models import NormedLinear, build_model
    model = build_model("resnet32", C, ARMS["ldam_drw"].normed_classifier)
    assert isinstance(model.classifier, NormedLinear)
    _, z = model(torch.randn(3, 3, 32, 32))
    assert z.abs().max() <= 1 + 1e-5


class Dummy(Objective):
    """A made-up arm: CE with every logit halved."""

    def loss(self, features, logits, labels, model, epoch):
        return torch.nn.functional.cross_entropy(logits.float() / 2, labels)


def test_a_new_arm_is_one_entry(monkeypatch):
    monkeypatch.setitem(arms.ARMS, "dummy", Arm(Dummy, "Dummy (halved logits)"))
    cfg = Config(arm="dummy", epochs=10, stage1_epochs=8, device="cpu").validate()  # validation knows it
    assert isinstance(make_objective(cfg.resolved(), COUNTS, 4, torch.device("cpu")), Dummy)
    assert shares_stage1(cfg.resolved()) and stage1_key(cfg.resolved()) == stage1_key(dataclasses.replace(cfg, arm="ce").resolved())
    from risda.runner.ablation import spec
    assert spec.value_label("arm", "dummy") == "Dummy (halved logits)"


def test_posthoc_cells_train_nothing_and_come_back_from_the_ce_cell():
    from risda.runner.ablation.experiment import training_plan, with_derived
    cells = [{"key": {"arm": a, "seed": 0}, "config": {"arm": a}} for a in ("ce", "ce_posthoc_la", "risda")]
    plan = {"spec": {"grid": {"arm": ["ce", "ce_posthoc_la", "risda"], "seed": [0]}}, "cells": cells, "axes": ["arm", "seed"]}
    trained = training_plan(plan)
    assert [c["key"]["arm"] for c in trained["cells"]] == ["ce", "risda"] and trained["spec"]["grid"]["arm"] == ["ce", "risda"]
    derived = {"ce_posthoc_la": {"config": {"arm": "ce_posthoc_la", "la_tau": 1.0}, "test_error": 40.0, "epochs_run": 0}}
    trials = [dict(config={"arm": "ce", "la_tau": 1.0}, status="TERMINATED", error=None, trial_id="t1", path="p",
                   result={"test_error": 50.0, "epochs_run": 40, "derived": derived})]
    out = with_derived(trials)
    assert [t["config"]["arm"] for t in out] == ["ce", "ce_posthoc_la"]
    assert out[1]["result"]["test_error"] == 40.0 and out[1]["result"]["epochs_run"] == 0 and out[1]["status"] == "TERMINATED"


@pytest.mark.parametrize("saved_form", ["full", "training"])
def test_an_experiment_with_a_derived_arm_resumes_under_the_same_command(saved_form, tmp_path, monkeypatch):
    """The copy of the plan beside the Ray experiment has the post-hoc cells (older copies: the
    training plan, without them); rerunning the command that started it continues it either way,
    and a different arm list is still refused."""
    from ray import tune

    from risda.trainer.config import ConfigError
    from risda.runner.ablation import cli
    from risda.runner.ablation.experiment import training_plan
    from risda.runner.ablation.spec import apply_overrides, expand, load_spec, make_plan

    def plan(arms):
        spec, flags, notes = apply_overrides(load_spec("cifar10lt_reduced"), {"arm": arms, "seed": [0]}, {})
        cells, more = expand(spec, flags, None)
        return make_plan(spec, cells, notes + more)

    saved = plan(["ce", "ce_posthoc_la", "risda"])
    saved = training_plan(saved) if saved_form == "training" else saved
    monkeypatch.setattr(cli, "saved_plan", lambda storage, name: saved)
    monkeypatch.setattr(tune.Tuner, "can_restore", staticmethod(lambda path: True))
    cli.check_same_plan(plan(["ce", "ce_posthoc_la", "risda"]), str(tmp_path), "a-s0")  # the same command: continues
    with pytest.raises(ConfigError, match="different plan"):
        cli.check_same_plan(plan(["ce", "ce_posthoc_la", "risda", "cov_only"]), str(tmp_path), "a-s0")


@pytest.mark.slow
def test_a_ce_run_records_posthoc_la_from_its_own_logits(tiny_config, tmp_path):
    from risda.trainer.data import load_long_tail
    from risda.trainer.evaluate import split_logits
    from contextlib import nullcontext

    from risda.trainer.loop import train
    cfg = tiny_config(arm="ce", epochs=2, val_per_class=5, out=str(tmp_path / "ce"))
    summary = train(cfg)
    posthoc = summary["derived"]["ce_posthoc_la"]
    assert posthoc["epochs_run"] == 0 and posthoc["derived_from"] == "ce"
    # the final model's logits, adjusted by hand in numpy
    from risda.trainer.models import build_model
    data = load_long_tail(cfg.resolved(), torch.device("cpu"))
    model = build_model("resnet32", data.num_classes)
    model.load_state_dict(torch.load(tmp_path / "ce" / "checkpoint.pt", weights_only=True)["model"])
    z = split_logits(model, data.test, nullcontext).double().numpy()
    prior = np.array(data.class_counts, dtype=np.float64) / sum(data.class_counts)
    y = data.test.labels.numpy()
    want = 100 * (1 - ((z - np.log(prior)).argmax(1) == y).mean())
    assert posthoc["test_error"] == pytest.approx(want, abs=1e-9)
    assert summary["test_error"] == pytest.approx(100 * (1 - (z.argmax(1) == y).mean()), abs=1e-9)
    assert posthoc["tuned_tau"] in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
