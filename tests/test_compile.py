"""--compile: what auto picks, that the field is a stage-I field, and the exactness contract of a
compiled run against eager fp32 (the reference): within STEP_TOL for N steps, and a whole
compiled run's loss curve within CURVE_TOL of eager's. The compiled ones are slow (inductor
compiles ResNet-32 in about a minute on a small CPU) and skipped where torch.compile cannot run."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from risda.trainer import compile as rc
from risda.trainer.checkpoint import load_checkpoint, save_checkpoint
from risda.trainer.config import Config, ConfigError
from risda.trainer.models import build_model
from risda.trainer.stage1 import stage1_key
from risda.trainer.loop import train

STEPS = 10          # SGD steps compared step by step
LR = 0.01           # small enough that fp32 rounding is not amplified chaotically (at 0.1 on random labels it is)
FORWARD_TOL = 1e-5  # relative |loss_compiled - loss_eager| / loss_eager of the first step: the forward alone
STEP_TOL = 1e-2     # the same, every one of STEPS steps (fp32, same threads): rounding grows with training,
                    # 7.5e-3 at most measured here (AMD EPYC Zen 5, torch 2.14, 1 thread)
CURVE_TOL = 0.05    # relative difference of each epoch's mean training loss, a whole (tiny) run: 3 epochs of
                    # 10 steps, lr LR; measured 0.05%, 2.0%, 1.7% here (rounding differences grow with training)
needs_compile = pytest.mark.skipif(rc.compile_available() is not None, reason=f"torch.compile unavailable: {rc.compile_available()}")


@pytest.fixture
def compiler_present(monkeypatch):
    monkeypatch.setattr(rc, "compile_available", lambda: None)


def test_auto_compiles_only_where_measured_to_pay(compiler_present):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    long, short = 10 * rc.MIN_STEPS, rc.MIN_STEPS // 2
    assert rc.resolve_compile("auto", cpu, "fp32", long)[0] is True        # 1.33x measured
    assert rc.resolve_compile("auto", cpu, "fp32", short)[0] is False      # cannot repay the compile
    off, why = rc.resolve_compile("auto", cpu, "bf16", long)               # 1.13x: not worth it
    assert off is False and "bf16" in why and f"{rc.CPU_GAIN['bf16']:.2f}" in why
    assert rc.resolve_compile("auto", cuda, "bf16", long)[0] is True
    assert rc.resolve_compile("auto", cuda, "bf16", short)[0] is False
    assert rc.resolve_compile("auto", torch.device("mps"), "fp32", long)[0] is False
    assert rc.resolve_compile("on", cpu, "bf16", 1) == (True, "on: asked for")
    assert rc.resolve_compile("off", cuda, "fp32", long) == (False, "off: asked for")


def test_no_compiler_means_off_for_auto_and_an_error_for_on(monkeypatch):
    monkeypatch.setattr(rc, "compile_available", lambda: "no C compiler for inductor's kernels (install gcc)")
    off, why = rc.resolve_compile("auto", torch.device("cpu"), "fp32", 10 * rc.MIN_STEPS)
    assert off is False and "no C compiler" in why
    with pytest.raises(RuntimeError, match="--compile on: no C compiler"):
        rc.resolve_compile("on", torch.device("cpu"), "fp32", 1)


def test_config_checks_compile_and_keeps_it_out_of_the_stage1_key():
    with pytest.raises(ConfigError, match="unknown compile 'yes'"):
        Config(compile="yes").validate()
    assert Config().compile == "auto"
    # like the thread count it changes fp32 rounding, not the computation (within the stated
    # tolerance), and "auto" is decided per host: a compiled and an eager stage I are one stage I
    keys = {stage1_key(Config(compile=c).resolved()) for c in ("auto", "on", "off")}
    assert keys == {stage1_key(Config().resolved())}


def test_checkpoint_older_than_the_field_resumes(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, Config(), model={}, optimizer={}, objective={}, epoch=0, history=[], elapsed=0.0)
    state = torch.load(path, weights_only=True)
    del state["config"]["compile"]  # as written before --compile existed
    torch.save(state, path)
    assert load_checkpoint(path, Config().resolved())["epoch"] == 0
    with pytest.raises(ConfigError, match="--compile: 'auto' -> 'on'"):
        load_checkpoint(path, Config(compile="on").resolved())


def sgd_losses(model, forward, batches) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4)
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(forward(x)[1], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@needs_compile
def test_compiled_fp32_stays_within_tolerance_of_eager_for_n_steps():
    torch.manual_seed(0)
    base = build_model("resnet32", 10)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(STEPS)]
    eager_model, compiled_model = copy.deepcopy(base), copy.deepcopy(base)
    eager = sgd_losses(eager_model, eager_model, batches)
    compiled = sgd_losses(compiled_model, rc.compile_forward(compiled_model, "cpu"), batches)
    rel = [abs(c - e) / e for c, e in zip(compiled, eager)]
    assert rel[0] < FORWARD_TOL and max(rel) < STEP_TOL, rel
    assert eager[-1] < eager[0]  # the steps trained something: the comparison is not of two constants
    # the compiled forward trained the model's own parameters, not a copy of them
    assert all(not torch.equal(p, q) for p, q in zip(compiled_model.parameters(), base.parameters()))


@pytest.mark.slow
@needs_compile
def test_compiled_run_tracks_eager_and_reuses_the_compiled_graph(tiny_config, tmp_path):
    from torch._dynamo.utils import counters
    # plain CE at lr LR: at lr 0.1 without warm-up this tiny run starts above chance (loss 3.9) and
    # rounding differences grow chaotically (13% apart by epoch 3), as they do at the switch of so
    # short a RISDA run, whose loss is in the hundreds (the ½βΔwᵀΣΔw term of still-wide classes)
    runs = {name: tiny_config(arm="ce", lr=LR, epochs=3, compile=name, out=str(tmp_path / name)) for name in ("off", "on")}
    graphs = [counters["stats"]["unique_graphs"]]
    eager = train(runs["off"])
    graphs.append(counters["stats"]["unique_graphs"])
    compiled = train(runs["on"])
    graphs.append(counters["stats"]["unique_graphs"])
    again = train(tiny_config(arm="ce", lr=LR, epochs=3, compile="on", out=str(tmp_path / "again")))  # the next trial of a worker
    graphs.append(counters["stats"]["unique_graphs"])
    # eager compiles nothing, the compiled run one graph (the last, smaller batch runs eager), its rerun none
    assert graphs[1] == graphs[0] and graphs[2] == graphs[1] + 1 and graphs[3] == graphs[2], graphs

    losses = {name: [r["train_loss"] for r in read_epochs(tmp_path / name)] for name in ("off", "on", "again")}
    assert len(losses["on"]) == 3
    for e, c in zip(losses["off"], losses["on"]):
        assert abs(c - e) / e < CURVE_TOL, losses
    assert losses["again"] == losses["on"]  # the reused graph computes the same run
    assert (eager["compile"], compiled["compile"], again["compile"]) == (False, True, True)
    assert compiled["compile_reason"] == "on: asked for" and eager["compile_reason"] == "off: asked for"
    assert compiled["torch_threads"] == torch.get_num_threads()


def read_epochs(out):
    import pyarrow.parquet as pq
    return pq.read_table(out / "epochs.parquet").to_pylist()
