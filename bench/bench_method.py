"""Cost of RISDA's loss, measured side by side in one run (a script, not a test).

(a) augmented_logits at C=1000, D=2048, batch 128 (ImageNet-LT scale) against ISDA's released
    code, which gathers a D×D covariance per sample (cov[labels] -> N×D×D) and forms N×C×D and
    N×C×C products. Forward + backward; peak memory (CUDA: max_memory_allocated; CPU: peak RSS
    of a fresh child process over its RSS before the call) and wall time, plus the bytes of
    the big temporaries computed analytically. The covariance table is one D×D matrix expanded
    to C×D×D (stride 0), so that the inputs themselves cost nothing and only what each method
    allocates is measured.
(b) One training step of ResNet-32 (batch 100, CIFAR-100-LT counts, λ=100) with the RISDA
    objective in stage II against a plain CE step, interleaved repetitions, median ratio.

    python bench/bench_method.py                 # both, on cuda if available
    python bench/bench_method.py --part b --reps 30
    python bench/bench_method.py --part a --classes 200 --dim 512   # a smaller (a)
    python bench/bench_method.py --smoke                         # tiny sizes, a few seconds (the test suite runs it)

On a small, shared CPU box run it with OMP_NUM_THREADS=1: with more threads than free cores
every small op spin-waits, and the loss's many small ops suffer most.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from risda.method.loss import augmented_logits

GB = 1024 ** 3


def isda_augmented_logits(logits, labels, weight, cov, beta):
    """ISDA's released isda_aug (Wang et al. 2019), verbatim in its tensor shapes."""
    N, C, A = logits.shape[0], weight.shape[0], weight.shape[1]
    NxW_ij = weight.expand(N, C, A)
    NxW_kj = torch.gather(NxW_ij, 1, labels.view(N, 1, 1).expand(N, C, A))
    CV_temp = cov[labels]  # N×A×A
    sigma2 = beta * torch.bmm(torch.bmm(NxW_ij - NxW_kj, CV_temp), (NxW_ij - NxW_kj).permute(0, 2, 1))
    sigma2 = sigma2.mul(torch.eye(C, device=logits.device).expand(N, C, C)).sum(2).view(N, C)
    return logits + 0.5 * sigma2


def analytic_bytes(method, N, C, D, U, chunk_elements=2 ** 24):
    """fp32 bytes of the largest temporaries alive at once in the forward pass."""
    if method == "isda":  # cov[labels], two copies of ΔW, ΔW Σ, the N×C×C product and its masked copy
        return 4 * (N * D * D + 3 * N * C * D + 2 * N * C * C)
    step = min(U, max(1, chunk_elements // (C * D + D * D)))  # one chunk: ΔW, Σ_c ΔW, Σ_c; plus the (U,C) table
    return 4 * (step * (2 * C * D + D * D) + 2 * U * C)


def rss_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(method, C, D, N, device):
    """One measurement in this (fresh) process: forward + backward of one method."""
    torch.manual_seed(0)
    dev = torch.device(device)
    weight = (torch.randn(C, D, device=dev) / D ** 0.5).requires_grad_()
    features = torch.randn(N, D, device=dev, requires_grad=True)
    labels = torch.randint(0, C, (N,), device=dev)
    a = torch.randn(D, D, device=dev) / D ** 0.5
    cov = (a @ a.T).expand(C, D, D)  # one matrix, C views: the inputs cost D×D
    del a
    if dev.type == "cuda":
        torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    start = time.perf_counter()
    logits = features @ weight.T
    if method == "isda":
        z = isda_augmented_logits(logits, labels, weight, cov, 0.5)
    else:
        z = augmented_logits(logits, labels, weight, cov, None, 0.0, 0.5)
    F.cross_entropy(z, labels).backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss_bytes() - base
    seconds = time.perf_counter() - start
    print(json.dumps(dict(peak=peak, seconds=seconds, unique=int(labels.unique().numel()), z=z[:2, :3].tolist())))


def measure(method, C, D, N, device):
    cmd = [sys.executable, __file__, "--worker", method, "--classes", str(C), "--dim", str(D),
           "--batch", str(N), "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return dict(error=out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_a(C, D, N, device):
    print(f"(a) augmented logits, forward + backward, C={C} D={D} batch={N}, {device}")
    results = {m: measure(m, C, D, N, device) for m in ("risda", "isda")}
    U = results["risda"].get("unique", N)
    for m, r in results.items():
        est = analytic_bytes(m, N, C, D, U)
        if "error" in r:
            print(f"  {m:5s}: failed ({r['error']}); analytic {est / GB:.2f} GiB")
        else:
            print(f"  {m:5s}: peak {r['peak'] / GB:6.2f} GiB measured, {est / GB:6.2f} GiB analytic, {r['seconds']:7.2f} s")
    r, i = results["risda"], results["isda"]
    if "error" not in r and "error" not in i:
        torch.testing.assert_close(torch.tensor(r["z"]), torch.tensor(i["z"]), rtol=1e-3, atol=1e-3)
        print(f"  ISDA / RISDA: memory {i['peak'] / max(r['peak'], 1):.1f}x measured, "
              f"{analytic_bytes('isda', N, C, D, U) / analytic_bytes('risda', N, C, D, U):.1f}x analytic; "
              f"time {i['seconds'] / r['seconds']:.2f}x  ({U} classes in the batch; same logits)")


def part_b(device, reps, warmup=3, batch=100):
    from risda.trainer.config import Config
    from risda.trainer.data import long_tail_counts
    from risda.trainer.loop import make_objective
    from risda.trainer.models import resnet32

    dev = torch.device(device)
    counts = long_tail_counts(500, 100, 100.0)
    cfg = Config(dataset="cifar100lt", epochs=200, arm="risda", alpha=0.5, beta=0.75).resolved()
    torch.manual_seed(0)
    model = resnet32(100).to(dev)
    objective = make_objective(cfg, counts, model.feature_dim, dev)
    train_labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)]).to(dev)

    def extract(augment=False, batch_stats=False):  # random features and predictions: a dense knowledge graph, the costly case
        n = len(train_labels)
        return torch.randn(n, 64, device=dev).relu(), torch.randn(n, 100, device=dev), train_labels

    objective.begin_epoch(cfg.stage1_epochs, model, extract)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator(device="cpu").manual_seed(1)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step(risda):
        x = torch.randn(batch, 3, 32, 32, generator=g).to(dev)
        y = train_labels[torch.randint(0, len(train_labels), (batch,), generator=g).to(dev)]
        sync()
        start = time.perf_counter()
        features, logits = model(x)
        sync()
        loss_start = time.perf_counter()
        if risda:
            loss = objective.loss(features, logits, y, model, cfg.stage1_epochs + 10)
        else:
            loss = F.cross_entropy(logits, y)
        sync()
        loss_seconds = time.perf_counter() - loss_start
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # the trainer reads the loss every step
        sync()
        return time.perf_counter() - start, loss_seconds

    for _ in range(warmup):
        step(True), step(False)
    ce, risda = [], []
    for r in range(reps):  # interleaved, alternating which goes first
        for is_risda in ((True, False) if r % 2 else (False, True)):
            (risda if is_risda else ce).append(step(is_risda))
    ce_med, risda_med = (statistics.median(t for t, _ in v) for v in (ce, risda))
    ce_loss, risda_loss = (statistics.median(t for _, t in v) for v in (ce, risda))
    print(f"(b) ResNet-32 training step, batch {batch}, 100 classes, {device}, {reps} interleaved repetitions")
    print(f"  whole step: CE {ce_med * 1e3:.1f} ms, RISDA {risda_med * 1e3:.1f} ms (medians); "
          f"RISDA / CE = {risda_med / ce_med:.3f} (target <= 1.05)")
    print(f"  loss call alone (statistics, reasoning, augmented logits): CE {ce_loss * 1e3:.2f} ms, "
          f"RISDA {risda_loss * 1e3:.2f} ms = {100 * (risda_loss - ce_loss) / ce_med:.1f}% of a CE step")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("a", "b", "all"), default="all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition: a few seconds that check the "
                                                         "script runs (the numbers mean nothing)")
    p.add_argument("--worker", choices=("risda", "isda"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.classes, args.dim, args.batch, args.reps = 20, 32, 16, 1
    if args.worker:
        return worker(args.worker, args.classes, args.dim, args.batch, args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.part in ("a", "all"):
        part_a(args.classes, args.dim, args.batch, args.device)
    if args.part in ("b", "all"):
        part_b(args.device, args.reps, *((1, 8) if args.smoke else ()))


if __name__ == "__main__":
    main()
