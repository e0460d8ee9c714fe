"""Images/s of the in-memory batch pipeline against a torchvision DataLoader + PIL pipeline,
both feeding the same ResNet-32 training step, measured side by side in one run.

    python bench/bench_data.py --data-root ../shared/data/cifar10-jpeg --steps 30
    python bench/bench_data.py --smoke                    # tiny sizes, a few seconds (the test suite runs it)
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from risda.trainer.augment import CIFAR_MEAN, CIFAR_STD
from risda.trainer.config import Config
from risda.trainer.data import load_long_tail
from risda.trainer.models import resnet32


def torchvision_loader(cfg, batch_size, workers):
    """The classic pipeline: ImageFolder of JPEGs, PIL RandomCrop/Flip/ToTensor/Normalize per image."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    ds = ImageFolder(f"{cfg.data_root}/train", transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0)


def time_steps(it, model, optimizer, steps, step_model=True):
    x, y = next(it)  # warm-up (and worker start) outside the timed region
    seen, start = 0, time.perf_counter()
    for _ in range(steps):
        x, y = next(it)
        if step_model:
            loss = F.cross_entropy(model(x)[1], y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


def endless(batches):
    while True:
        yield from batches


def in_memory(split, batch_size):
    g = torch.Generator().manual_seed(0)
    while True:
        yield from split.batches(batch_size, train=True, generator=g)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-root", default="../shared/data/cifar10-jpeg")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: a few seconds that check the script runs "
                                                         "(the test suite runs it; the numbers mean nothing)")
    args = p.parse_args()
    small = {}
    if args.smoke:
        args.steps, args.batch_size, args.workers, args.rounds = 2, 8, 0, 1
        small = dict(n_max=20, test_per_class=5)
    cfg = Config(dataset="cifar10lt", data_root=args.data_root, imbalance=1, device="cpu", **small).resolved()
    data = load_long_tail(cfg, torch.device("cpu"))
    model = resnet32(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ours = in_memory(data.train, args.batch_size)
    theirs = endless(torchvision_loader(cfg, args.batch_size, args.workers))
    rows = []
    for label, step_model, steps in (("data only", False, 10 * args.steps), ("data + ResNet-32 step", True, args.steps)):
        # Interleaved rounds, median of each: both pipelines see the same machine load.
        a, b = [], []
        for _ in range(args.rounds):
            a.append(time_steps(ours, model, opt, steps, step_model))
            b.append(time_steps(theirs, model, opt, steps, step_model))
        rows.append((label, sorted(a)[len(a) // 2], sorted(b)[len(b) // 2]))
    print(f"{'pipeline':<24}{'risda (img/s)':>16}{'DataLoader+PIL (img/s)':>26}{'ratio':>8}")
    for label, a, b in rows:
        print(f"{label:<24}{a:>16.0f}{b:>26.0f}{a / b:>8.2f}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, DataLoader workers {args.workers}")


if __name__ == "__main__":
    main()
