"""Shared fixtures: the real CIFAR-10 JPEG tree from ../shared and a tiny run config."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from risda.trainer.config import Config

REPO = Path(__file__).resolve().parents[1]
CIFAR10_JPEG = Path(os.environ.get("RISDA_CIFAR10_JPEG", REPO.parent / "shared" / "data" / "cifar10-jpeg"))


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    if not (CIFAR10_JPEG / "train").is_dir():
        pytest.skip(f"real CIFAR-10 JPEG tree not found at {CIFAR10_JPEG} (set RISDA_CIFAR10_JPEG)")
    return CIFAR10_JPEG


@pytest.fixture
def tiny_config(cifar10_root, tmp_path):
    """A real CIFAR-10-LT run small enough for a test: ~500 training images, 2 epochs."""
    def make(**overrides) -> Config:
        fields = dict(dataset="cifar10lt", data_root=str(cifar10_root), imbalance=10, n_max=150,
                      test_per_class=30, epochs=2, batch_size=50, eval_every=1, checkpoint_every=1,
                      warmup_epochs=0, out=str(tmp_path / "run"), progress=False, device="cpu",
                      precision="fp32")  # the exactness tests compare fp32 runs bit for bit
        fields.update(overrides)
        return Config(**fields)
    return make


@pytest.fixture
def local_ray():
    """An embedded Ray with two CPUs for a test's drivers, always shut down."""
    import ray
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="warning")
    try:
        yield
    finally:
        ray.shutdown()
