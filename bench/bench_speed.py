"""Images/s of ResNet-32's training step under every combination this host offers, side by side
in one process (a script, not a test): eager or torch.compile'd, fp32 or bf16 autocast,
contiguous or channels_last, 1 or 2 torch threads; on CUDA also compiled with CUDA graphs
(mode="reduce-overhead"). With --packing, the aggregate images/s of two 1-thread processes at
once against one 2-thread process (one CPU per Ray trial against two).

A step is the trainer's: forward (compiled where the mode says; the loss stays eager), cross-
entropy, backward, SGD (momentum, Nesterov, weight decay), on synthetic CIFAR-sized batches of
100 already on the device. Every mode trains its own copy of one initialisation. Rounds visit
every (mode, threads) pair, in an order rotated each round, so that a neighbour's load or a
clock change hits all alike; images/s is the median over rounds, with the range. Compile time
(the first compiled steps, minus an eager step) is printed apart.

    python bench/bench_speed.py                            # everything, 5 rounds
    python bench/bench_speed.py --quick                    # 3 rounds of 3 steps
    python bench/bench_speed.py --modes eager+fp32+contiguous,bf16 --threads 1
    python bench/bench_speed.py --packing --modes none     # only the packing measurement
    python bench/bench_speed.py --smoke                    # two eager modes and packing, tiny: a few seconds (the test suite)

A mode is backend+precision+format (eager|compiled|cudagraphs, fp32|bf16, contiguous|channels_last);
--modes keeps those that carry every '+'-joined word of any comma-separated pattern.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from risda.trainer.models import build_model
from risda.trainer.precision import cpu_flags, cpuinfo_flags, resolve_precision

BATCH, CLASSES = 100, 10  # BATCH: --batch-size
FLOPS_FALLBACK = 0.43e9  # fwd+bwd FLOP per image, if FlopCounterMode fails (2 per multiply-add)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_modes(device) -> list[str]:
    backends = ["eager"] + (["compiled"] if compile_available() else [])
    if device.type == "cuda" and "compiled" in backends:
        backends.append("cudagraphs")
    return ["+".join(m) for m in itertools.product(backends, ("fp32", "bf16"), ("contiguous", "channels_last"))]


def compile_available() -> bool:
    """torch.compile on CPU needs a C++ compiler (inductor writes C++ kernels)."""
    return hasattr(torch, "compile") and any(shutil.which(c) for c in ("cc", "gcc", "clang", "c++", "g++"))


def select(modes: list[str], patterns: str | None) -> list[str]:
    if patterns is None:
        return modes
    pats = [p.split("+") for p in patterns.split(",") if p.strip()]
    return [m for m in modes if any(all(w in m.split("+") for w in p) for p in pats)]


def make_step(base, device, mode: str):
    """One training step of a copy of `base` in `mode`."""
    backend, precision, fmt = mode.split("+")
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    model = copy.deepcopy(base).to(memory_format=memory_format)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    forward = model
    if backend == "compiled":
        forward = torch.compile(model)
    elif backend == "cudagraphs":
        forward = torch.compile(model, mode="reduce-overhead")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext

    def step(x, y):
        with autocast():
            _, logits = forward(x.contiguous(memory_format=memory_format))
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def make_batches(device, n=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(BATCH, 3, 32, 32, generator=g).to(device), torch.randint(0, CLASSES, (BATCH,), generator=g).to(device))
            for _ in range(n)]


def timed(step, batches, steps, device) -> float:
    """images/s of `steps` steps."""
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(*batches[i % len(batches)])
    sync(device)
    if not torch.isfinite(loss):
        raise SystemExit(f"loss became {loss.item()}")
    return steps * BATCH / (time.perf_counter() - t0)


def flops_per_image(base, device) -> tuple[float, str]:
    """Forward + backward FLOP per image, counted by torch's FlopCounterMode (convolutions and
    matmuls; batch norm, ReLU and the optimiser are not counted)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
        model = copy.deepcopy(base)
        x, y = make_batches(device, 1)[0]
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(x)[1], y).backward()
        return counter.get_total_flops() / BATCH, "torch.utils.flop_counter.FlopCounterMode, conv+matmul, fwd+bwd"
    except Exception as e:  # an older torch
        return FLOPS_FALLBACK, f"assumed ({type(e).__name__}: FlopCounterMode failed)"


def cpu_peak(threads: int, precision: str, ghz: float | None, per_cycle: int | None) -> tuple[float, str]:
    """(FLOP/s, how it was assumed): FMA lanes x 2 FLOP x FMA pipes per core per cycle x clock x threads."""
    flags = cpuinfo_flags()
    family = cpu_family()
    if per_cycle is None:
        if "avx512f" in flags:
            # Zen 4 (family 25) runs 512-bit FMAs as two 256-bit halves: 2 pipes x 8 lanes x 2.
            # Zen 5 (26) and Intel server cores: 2 full 512-bit FMA pipes, 2 x 16 x 2.
            per_cycle = 32 if family == 25 else 64
        elif "fma" in flags:
            per_cycle = 32  # 2 pipes x 8 fp32 lanes (AVX2) x 2
        else:
            per_cycle = 16
    ghz = ghz or cpu_ghz()
    bf16 = precision == "bf16" and bool(cpu_flags())  # VDPBF16PS: two bf16 products per fp32 lane
    peak = per_cycle * (2 if bf16 else 1) * ghz * 1e9 * threads
    return peak, f"{per_cycle}{' x2 (bf16 dot)' if bf16 else ''} FLOP/cycle/core x {ghz:.2f} GHz x {threads} threads"


def cpu_family() -> int | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu family"):
                return int(line.partition(":")[2])
    except (OSError, ValueError):
        pass
    return None


def cpu_ghz() -> float:
    """The clock /proc/cpuinfo states (a VM shows the nominal TSC rate, not the boost clock)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.partition(":")[2]) / 1000
    except (OSError, ValueError):
        pass
    return 3.0


def host_line(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))})"
    model = next((line.partition(":")[2].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return (f"{model} (family {cpu_family()}), {os.cpu_count()} CPUs, capability {torch.backends.cpu.get_cpu_capability()}, "
            f"bf16 flags {sorted(cpu_flags()) or 'none'}")


def neighbours_line() -> str:
    """The 1-minute load average before this benchmark started: > 0.5 means another job shares the CPUs."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "load average unknown"
    busy = "another job is running beside this benchmark" if load > 0.5 else "the machine looked quiet"
    return f"load average {load:.2f} at start ({busy})"


def ratio(value, ref) -> str:
    return f"{value / ref:.2f}" if ref else "-"


def bench_modes(args, device):
    modes = select(all_modes(device), args.modes)
    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]
    if not modes:
        return
    torch.manual_seed(0)
    base = build_model("resnet32", CLASSES).to(device)
    batches = make_batches(device)
    flops, how = flops_per_image(base, device)
    print(f"FLOP per image (fwd+bwd): {flops / 1e9:.3f} G ({how})")

    torch.set_num_threads(threads[0])
    steps, compile_s = {}, {}
    eager_step_s = None
    for mode in modes:  # warm-up; a compiled mode's first steps compile its forward and backward
        steps[mode] = make_step(base, device, mode)
        t0 = time.perf_counter()
        for i in range(args.warmup):
            steps[mode](*batches[i % len(batches)])
        sync(device)
        spent = time.perf_counter() - t0
        if mode.startswith("eager") and eager_step_s is None:
            eager_step_s = spent / args.warmup
        if not mode.startswith("eager"):
            compile_s[mode] = spent - args.warmup * (eager_step_s or 0)
    for t in threads[1:]:  # an untimed step at every thread count
        torch.set_num_threads(t)
        for mode in modes:
            steps[mode](*batches[0])

    pairs = [(m, t) for t in threads for m in modes]
    rates = {p: [] for p in pairs}
    for r in range(args.rounds):
        k = r % len(pairs)
        for mode, t in pairs[k:] + pairs[:k]:
            torch.set_num_threads(t)
            rates[mode, t].append(timed(steps[mode], batches, args.steps, device))

    auto = f"eager+{resolve_precision('auto', device)}+contiguous"
    med = {p: statistics.median(v) for p, v in rates.items()}
    print(f"\n{args.rounds} rounds x {args.steps} steps per (mode, threads), {args.warmup} warm-up steps, "
          f"rotated order; median (range) images/s")
    print(f"x fp32: over eager+fp32+contiguous at the same threads; x today: over today's default "
          f"(--precision auto -> {auto})")
    head = f"| {'mode':<34} | thr | images/s (range)  | x fp32 | x today | GFLOP/s | % peak |"
    print(head + "\n|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    peaks = {}
    for mode, t in pairs:
        prec = mode.split("+")[1]
        if device.type == "cpu":
            peaks[prec, t] = cpu_peak(t, prec, args.ghz, args.flop_per_cycle)
        gflops = med[mode, t] * flops / 1e9
        ref, today = med.get(("eager+fp32+contiguous", t)), med.get((auto, t))
        frac = f"{100 * gflops * 1e9 / peaks[prec, t][0]:5.1f}%" if (prec, t) in peaks else "    -"
        spread = f"{med[mode, t]:.0f} ({min(rates[mode, t]):.0f}-{max(rates[mode, t]):.0f})"
        print(f"| {mode:<34} | {t:>3} | {spread:<17} | {ratio(med[mode, t], ref):>6} | {ratio(med[mode, t], today):>7} | "
              f"{gflops:7.1f} | {frac:>6} |")
    for (prec, t), (_, how) in sorted(peaks.items()):
        print(f"peak assumed, {prec}, {t} thread(s): {peaks[prec, t][0] / 1e9:.0f} GFLOP/s = {how}")
    for mode, s in compile_s.items():
        print(f"compile time {mode}: {s:.1f} s (first {args.warmup} steps at {threads[0]} thread(s), minus eager steps; "
              f"{'warm' if args.warm_cache else 'cold'} inductor cache)")


# --- packing: two 1-thread processes against one 2-thread process ------------------------------
def child(args, device):
    """A worker process: warm up, say ready, wait for 'go' on stdin, train for --seconds, print images/s."""
    torch.set_num_threads(args.threads_child)
    torch.manual_seed(0)
    step = make_step(build_model("resnet32", CLASSES).to(device), device, args.child)
    batches = make_batches(device)
    for i in range(args.warmup):
        step(*batches[i % len(batches)])
    print("ready", flush=True)
    sys.stdin.readline()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        step(*batches[n % len(batches)])
        n += 1
    print(f"rate {n * BATCH / (time.perf_counter() - t0)}", flush=True)


def run_group(mode: str, n: int, threads: int, seconds: float, warmup: int) -> float:
    """Aggregate images/s of n processes with `threads` threads each, timed together."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", mode, "--threads-child", str(threads), "--seconds", str(seconds),
           "--warmup", str(warmup), "--device", "cpu", "--batch-size", str(BATCH)]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise SystemExit(f"packing child failed: {p.communicate()}")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    total = 0.0
    for p in procs:
        out, _ = p.communicate()
        total += float(out.split()[-1])
    return total


def bench_packing(args, device):
    mode = args.packing_mode or f"eager+{resolve_precision('auto', device)}+contiguous"
    cpus = os.cpu_count()
    layouts = [(cpus, 1), (1, cpus)]  # (processes, threads each)
    rates = {lay: [] for lay in layouts}
    for r in range(args.packing_rounds):
        for lay in (layouts if r % 2 == 0 else layouts[::-1]):
            rates[lay].append(run_group(mode, *lay, args.seconds, args.warmup))
    print(f"\npacking ({mode}, {args.packing_rounds} rounds x {args.seconds:g} s each, alternating; "
          f"aggregate images/s over all processes)")
    med = {lay: statistics.median(v) for lay, v in rates.items()}
    for (n, t), v in rates.items():
        print(f"  {n} process(es) x {t} thread(s): {med[n, t]:6.0f} images/s (range {min(v):.0f}-{max(v):.0f})")
    print(f"  {cpus} x 1 thread / 1 x {cpus} threads = {med[cpus, 1] / med[1, cpus]:.2f}x")


def main():
    global BATCH  # --batch-size
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--modes", default=None, help="comma-separated patterns of '+'-joined words (default: all; 'none': no modes)")
    p.add_argument("--threads", default="1,2", help="torch thread counts on CPU (default: 1,2)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=BATCH, help=f"images per step (default: {BATCH})")
    p.add_argument("--steps", type=int, default=5, help="training steps per round and mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first (compiles the compiled modes)")
    p.add_argument("--quick", action="store_true", help="3 rounds of 3 steps, 2 warm-up steps; packing 2 rounds of 10 s")
    p.add_argument("--packing", action="store_true", help="also measure 2 x 1-thread processes against 1 x 2 threads")
    p.add_argument("--packing-mode", default=None, help="mode of the packing processes (default: today's default)")
    p.add_argument("--packing-rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20, help="timed seconds per packing round")
    p.add_argument("--ghz", type=float, default=None, help="clock for the peak (default: /proc/cpuinfo's cpu MHz)")
    p.add_argument("--flop-per-cycle", type=int, default=None, help="fp32 FLOP per core per cycle for the peak")
    p.add_argument("--warm-cache", action="store_true", help="keep torch's inductor cache (default: a fresh one, cold compile)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads-child", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="eager fp32 and bf16 at 1 thread, one step each, and half a "
                   "second of packing: a few seconds that check the script runs (the test suite; the numbers mean nothing)")
    args = p.parse_args()
    if args.smoke:
        args.modes, args.threads, args.rounds, args.steps, args.warmup = "eager+contiguous", "1", 1, 1, 1
        args.packing, args.packing_rounds, args.seconds, args.batch_size = True, 1, 0.5, 8
    BATCH = args.batch_size
    if args.quick:
        args.rounds, args.steps, args.warmup, args.packing_rounds, args.seconds = 3, 3, 2, 2, 10
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.child:
        return child(args, device)
    if not args.warm_cache:  # a fresh inductor cache: the compile time a new machine (or CI) pays
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-speed-inductor-")
    print(f"bench_speed {time.strftime('%Y-%m-%d %H:%M')}, host {platform.node()}, torch {torch.__version__}, {device}")
    print(f"{host_line(device)}; {neighbours_line()}")
    if args.modes != "none":
        bench_modes(args, device)
    if args.packing and device.type == "cpu":
        bench_packing(args, device)


if __name__ == "__main__":
    main()
