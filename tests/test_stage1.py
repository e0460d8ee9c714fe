"""Stage I shared: the key separates exactly the stage-I fields, and a stage II forked from a
cached stage I ends with the weights and metrics of the same run trained from scratch."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from risda.trainer.config import Config
from risda.trainer.stage1 import (BOOKKEEPING_FIELDS, STAGE2_FIELDS, Stage1Cache, shares_stage1, stage1_key,
                          stage1_training_config)
from risda.trainer.loop import train

# A value that differs from the default for every Config field.
CHANGED = dict(
    preset="imagenetlt-r50", dataset="cifar100lt", data_root="elsewhere", download=True, imbalance=50.0, n_max=300,
    val_per_class=5, test_per_class=7, subset_seed=3, image_size=40, cache_dir="/tmp/other", num_workers=1,
    model="resnet50", epochs=150, stage1_epochs=100, batch_size=64, lr=0.05, momentum=0.8, nesterov=False,
    weight_decay=1e-4, lr_milestones=(100, 120), lr_decay=0.1, warmup_epochs=3, seed=1, precision="bf16",
    channels_last=True, device="cpu", pad_mode="reflect", arm="cov_only", variant="reference", alpha=0.9,
    beta=0.3, head_count=4, head_min_count=50, cb_gamma=0.99, covariance="diag", graph_topk=3, eval_every=5,
    checkpoint_every=5, out="runs/other", resume=True, progress=False,
    graph_source="soft", graph_temperature=0.5, la_tau=0.5, ldam_max_margin=0.3, ldam_scale=10.0,
    compile="on", threads=3, stage1_threads=2,
)


def test_every_field_is_classified():
    names = {f.name for f in dataclasses.fields(Config)}
    assert set(CHANGED) == names, "add the new field to CHANGED (and decide: stage I, stage II or bookkeeping)"


@pytest.mark.parametrize("name", sorted(STAGE2_FIELDS | BOOKKEEPING_FIELDS))
def test_stage2_and_bookkeeping_fields_keep_the_key(name):
    base = Config(subset_seed=0, pad_mode="zeros", warmup_epochs=5)  # resolved as the paper variant's
    assert stage1_key(dataclasses.replace(base, **{name: CHANGED[name]}).resolved()) == stage1_key(base.resolved())


@pytest.mark.parametrize("name", sorted(set(CHANGED) - STAGE2_FIELDS - BOOKKEEPING_FIELDS))
def test_stage1_fields_change_the_key(name):
    base = Config()
    assert stage1_key(dataclasses.replace(base, **{name: CHANGED[name]}).resolved()) != stage1_key(base.resolved())


def test_variant_defaults_are_resolved_before_the_key():
    # The reference variant's own defaults (subset seed 42, reflect padding, no warm-up) are a
    # different stage I; with the paper's values given explicitly it is the same one.
    assert stage1_key(Config(variant="reference").resolved()) != stage1_key(Config().resolved())
    same = dict(subset_seed=0, pad_mode="zeros", warmup_epochs=5)
    assert stage1_key(Config(variant="reference", **same).resolved()) == stage1_key(Config().resolved())


def test_isda_and_no_stage1_do_not_share():
    assert shares_stage1(Config(arm="ce_drw").resolved()) and shares_stage1(Config(arm="risda", variant="reference").resolved())
    assert not shares_stage1(Config(arm="isda").resolved()) and not shares_stage1(Config(epochs=2, stage1_epochs=0).resolved())


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
@pytest.mark.parametrize("arm,variant,source", [
    ("risda", "paper", "confusion"), ("risda", "reference", "confusion"),
    ("risda", "paper", "soft"), ("risda", "paper", "prototype"),   # every graph source forks the same CE stage I
    ("ldam_drw", "paper", "confusion"), ("la_loss", "paper", "confusion"),  # their own stage I (risda.trainer.arms)
])
def test_forked_stage2_equals_training_from_scratch(tiny_config, tmp_path, arm, variant, source):
    """fp32, CPU, same seeds: the cached stage I (trained once, as the runner trains it: CE with
    the reference observations on, or the arm's own objective) forked into stage II gives
    bit-identical weights and the same summary metrics as one uninterrupted run of the same config."""
    same_data = dict(subset_seed=0, pad_mode="zeros", warmup_epochs=0)
    run = dict(arm=arm, variant=variant, graph_source=source, epochs=4, stage1_epochs=2, head_count=3, alpha=0.5,
               beta=0.75, lr=0.02, **same_data)
    scratch = train(tiny_config(**run, out=str(tmp_path / "scratch")))

    shared = dataclasses.replace(stage1_training_config(tiny_config(**run).resolved()), out=str(tmp_path / "stage1"))
    assert shared.arm == ("ce" if arm == "risda" else arm)
    assert stage1_key(shared.resolved()) == stage1_key(tiny_config(**run).resolved())
    done = train(shared, stage1_only=True, observe_reference=True)
    cache = Stage1Cache(str(tmp_path / "cache"))
    cache.store(shared.resolved(), done["checkpoint"], {"observations": True})
    forked_cfg = tiny_config(**run, out=str(tmp_path / "forked"))
    assert cache.lookup(forked_cfg.resolved(), observations=True) is not None
    stage1_ckpt = cache.fetch(forked_cfg.resolved(), tmp_path / "fetched.pt")
    forked = train(forked_cfg, stage1_from=stage1_ckpt)

    a, b = weights(tmp_path / "scratch" / "checkpoint.pt"), weights(tmp_path / "forked" / "checkpoint.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for k in ("test_error", "many_error", "medium_error", "few_error", "best_test_error", "best_test_epoch",
              "epochs_run", "last_epoch"):
        assert forked[k] == scratch[k], k
    for k in ("graph_offdiag_tail", "graph_empty_tail", "reason_cov_ratio_last", "reason_mean_ratio_last"):
        assert forked.get(k) == scratch.get(k), k  # the diagnostics too (absent for the baselines)
    assert forked["stage1_key"] == stage1_key(forked_cfg.resolved())


@pytest.mark.slow
def test_a_fork_refuses_another_stage1(tiny_config, tmp_path):
    shared = tiny_config(arm="ce", epochs=3, stage1_epochs=1, out=str(tmp_path / "s1"))
    done = train(shared, stage1_only=True)
    with pytest.raises(ValueError, match="another stage I.*--lr"):
        train(tiny_config(arm="ce_drw", epochs=3, stage1_epochs=1, lr=0.5, out=str(tmp_path / "x")),
              stage1_from=done["checkpoint"])
    with pytest.raises(Exception, match="without the reference variant's observations"):
        train(tiny_config(arm="risda", variant="reference", subset_seed=0, pad_mode="zeros", warmup_epochs=0,
                          epochs=3, stage1_epochs=1, out=str(tmp_path / "y")), stage1_from=done["checkpoint"])
