"""Trial packing on CPU: a shared stage I that trains alone takes all of a node's CPUs, several
share them, and the stage-II trials keep --cpus-per-trial (default 1: one trial per core)."""
from __future__ import annotations

import argparse

from risda.runner.cluster import add_runner_args
from risda.runner.stage1 import stage1_resources


def test_a_stage1_alone_takes_the_node_and_several_share_it():
    trial = {"cpu": 1, "gpu": 0}
    assert stage1_resources(trial, jobs=1, node_cpus=2) == {"cpu": 2, "gpu": 0}
    assert stage1_resources(trial, jobs=2, node_cpus=2) == {"cpu": 1, "gpu": 0}
    assert stage1_resources(trial, jobs=3, node_cpus=8) == {"cpu": 2, "gpu": 0}   # 2 CPUs idle, none oversubscribed
    assert stage1_resources(trial, jobs=5, node_cpus=2) == {"cpu": 1, "gpu": 0}   # never below the trial's own


def test_a_users_cpus_per_trial_is_the_floor_and_gpus_are_kept():
    assert stage1_resources({"cpu": 4, "gpu": 0.25}, jobs=4, node_cpus=8) == {"cpu": 4, "gpu": 0.25}
    assert stage1_resources({"cpu": 4, "gpu": 0.25}, jobs=1, node_cpus=16) == {"cpu": 16, "gpu": 0.25}
    assert stage1_resources({"cpu": 0.5, "gpu": 0}, jobs=1, node_cpus=1) == {"cpu": 1, "gpu": 0}


def test_stage2_trials_default_to_one_cpu_each():
    p = argparse.ArgumentParser()
    add_runner_args(p, "x")
    assert p.parse_args([]).cpus_per_trial == 1
