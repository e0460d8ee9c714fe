"""How long verifying a stage-I cache entry takes (risda.trainer.stage1_verify: the whole checkpoint read
and hashed, stage1.json's own digest checked), for a CIFAR-sized entry (ResNet-32 with its SGD
state) and an ImageNet-sized one (torchvision's ResNet-50 state dict with its SGD momentum,
about 200 MB, made up here), on a local cache folder.

    python bench/bench_verify.py [--dir /tmp/bench-verify] [--repeat 5]
    python bench/bench_verify.py --smoke     # the CIFAR-sized entry once (what the tests run)

Prints the entry's size, the median verification time and the rate; the first, cold read after
writing is in the page cache already, so this is the warm figure (a cold shared disk or an object
store is slower by its read rate).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from risda.trainer.checkpoint import save_checkpoint
from risda.trainer.config import Config, RunConfig
from risda.trainer.stage1 import Stage1Cache


def entry(cache: Stage1Cache, cfg: RunConfig, model: torch.nn.Module, work: Path) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():  # a momentum buffer for every weight, as after a real epoch
        optimizer.state[p]["momentum_buffer"] = torch.randn_like(p)
    save_checkpoint(work / "checkpoint.pt", cfg, epoch=cfg.stage1_epochs - 1, elapsed=1.0, history=[],
                    model=model.state_dict(), optimizer=optimizer.state_dict(), objective={})
    cache.store(cfg, work / "checkpoint.pt", {"observations": False})


def timed(cache: Stage1Cache, cfg: RunConfig, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        assert cache.verify(cfg) is not None
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=None, help="where the cache goes (default: a temporary folder)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="the CIFAR-sized entry, verified once (seconds)")
    args = p.parse_args()
    repeat = 1 if args.smoke else args.repeat
    import torchvision
    from risda.trainer.models import build_model
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        work, cache = Path(d), Stage1Cache(str(Path(d) / "cache"))
        sizes = {"ResNet-32 (CIFAR)": (Config(dataset="cifar10lt").resolved(), build_model("resnet32", 10))}
        if not args.smoke:
            sizes["ResNet-50 (ImageNet)"] = (
                Config(dataset="imagenetlt", model="resnet50", epochs=100, stage1_epochs=80).resolved(),
                torchvision.models.resnet50(num_classes=1000))
        for name, (cfg, model) in sizes.items():
            entry(cache, cfg, model, work)
            info = cache.verify(cfg)
            median = statistics.median(timed(cache, cfg, repeat))
            mb = info["checkpoint_bytes"] / 1e6
            print(f"{name:22s} {mb:8.1f} MB  verify {median * 1e3:8.1f} ms  ({mb / median:7.0f} MB/s, median of {repeat})")


if __name__ == "__main__":
    main()
