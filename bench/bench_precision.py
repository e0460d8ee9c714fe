"""fp32 against bf16 autocast for ResNet-32 training steps, side by side in one run (a script,
not a test), and whether `--precision auto` (risda.trainer.precision.resolve_precision) picks the
faster of the two on this machine.

Each step is a training step as the trainer runs it: forward under the precision's autocast,
cross-entropy, backward, SGD (momentum, Nesterov, weight decay), on a random batch of 100
32×32 images and 10 classes. Each precision trains its own copy of one initialisation; the
rounds alternate fp32, bf16, fp32, ... so that a neighbour's load or a clock change hits both
alike. images/s is the median over rounds.

    python bench/bench_precision.py                      # cuda if available, else cpu
    python bench/bench_precision.py --device cpu --rounds 6 --steps 5
    python bench/bench_precision.py --channels-last
    python bench/bench_precision.py --smoke                # tiny sizes, a few seconds (the test suite runs it)

On a small, shared CPU box pass --threads 1 (or OMP_NUM_THREADS=1): with more threads than
free cores every op spin-waits and the measurement says more about the neighbours.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_speed import make_step   # the trainer's step, eager, in a given precision (bench/ is on sys.path)
from risda.trainer.models import build_model
from risda.trainer.precision import bf16_is_fast, cpu_flags, resolve_precision

PRECISIONS = ("fp32", "bf16")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds per precision, alternating")
    p.add_argument("--steps", type=int, default=5, help="training steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per precision first")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: a few seconds that check the script runs "
                                                         "(the test suite runs it; the numbers mean nothing)")
    args = p.parse_args()
    if args.smoke:
        args.rounds, args.steps, args.warmup, args.batch_size = 2, 1, 1, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    torch.manual_seed(0)
    base = build_model("resnet32", 10).to(device).to(memory_format=memory_format)
    fmt = "channels_last" if args.channels_last else "contiguous"
    steps = {prec: make_step(base, device, f"eager+{prec}+{fmt}") for prec in PRECISIONS}   # each its own copy
    g = torch.Generator(device="cpu").manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, 32, 32, generator=g).to(device),
                torch.randint(0, 10, (args.batch_size,), generator=g).to(device)) for _ in range(4)]

    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))})"
    else:
        flags = torch.backends.cpu.get_cpu_capability()
        where = (f"cpu, torch capability {flags}, bf16 flags {sorted(cpu_flags()) or 'none'}, "
                 f"{torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}; {where}")
    print(f"ResNet-32, batch {args.batch_size} of 32x32, {args.warmup} warm-up + {args.rounds} rounds x {args.steps} "
          f"steps per precision, alternating{', channels_last' if args.channels_last else ''}")

    for prec in PRECISIONS:
        for i in range(args.warmup):
            steps[prec](*batches[i % len(batches)])
    sync(device)
    rates = {prec: [] for prec in PRECISIONS}
    for r in range(args.rounds):
        for prec in (PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]):
            sync(device)
            t0 = time.perf_counter()
            for i in range(args.steps):
                loss = steps[prec](*batches[i % len(batches)])
            sync(device)
            rates[prec].append(args.steps * args.batch_size / (time.perf_counter() - t0))
            if not torch.isfinite(loss):
                raise SystemExit(f"{prec}: loss became {loss.item()}")

    med = {prec: statistics.median(v) for prec, v in rates.items()}
    for prec in PRECISIONS:
        spread = f"{min(rates[prec]):.0f}-{max(rates[prec]):.0f}"
        print(f"  {prec}: {med[prec]:8.1f} images/s (median; rounds {spread})")
    ratio = med["bf16"] / med["fp32"]
    faster = "bf16" if ratio > 1 else "fp32"
    picked = resolve_precision("auto", device)
    print(f"  bf16 / fp32 = {ratio:.2f}x: {faster} is faster here")
    print(f"  resolve_precision('auto', {device}) -> {picked} (bf16_is_fast: {bf16_is_fast(device)}): "
          f"{'the faster one' if picked == faster else 'NOT the faster one'}"
          f"{' (within 5%: a tie)' if abs(ratio - 1) < 0.05 else ''}")


if __name__ == "__main__":
    main()
