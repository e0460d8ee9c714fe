"""Statistics memory and one stage-II loss step per covariance form, at three scales (a script, not a test).

    OMP_NUM_THREADS=1 python bench/bench_scale.py                       # the whole table, a few minutes on a CPU
    python bench/bench_scale.py --scales cifar100 imagenetlt --forms diag lowrank:16
    python bench/bench_scale.py --device cuda
    python bench/bench_scale.py --smoke                                 # a tiny scale, a few seconds (the test suite runs it)

Scales: CIFAR-100 (C=100, D=64, dense ε), ImageNet-LT (1000, 2048) and iNaturalist 2018
(8142, 2048), both with a top-k ε (--topk), long-tailed class counts (500…5, 1280…5,
1000…2). Forms: full, diag, lowrank:16, lowrank:32, and plain CE as the floor.

One step is what RISDAObjective (risda arm, paper variant) does per stage-II batch: merge the
batch into the statistics (eq. 1-2), the reasoning covariance of the tail classes present
(eq. 4), the prototype term (eq. 5), the augmented logits (eq. 11) and the weighted CE
(eq. 12), forward and backward, batch 128 drawn from the class counts, on synthetic features.
The objective is set up by its own prepare() from a synthetic pass of a few samples per
class, so the graph and statistics are built by the same code as in training.

Each (scale, form) runs in a fresh process. "stats" is the bytes of the statistics (mean,
covariance, count); "step +RSS" the process's peak RSS above its RSS before the step (CPU; the
step's temporaries). Where full's statistics do not fit this machine (24 GiB), only their
computed size is given; where they fit in principle but not in its free memory, the step is
timed on a stride-0 Σ (one D×D matrix seen C times: the same work, without C·D² of memory, the
merge into the statistics skipped) and marked so.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from risda.trainer.config import Config
from risda.trainer.loop import make_objective
from risda.method.stats import ClassStatistics
from bench_method import peak_rss_bytes, rss_bytes  # the script's folder is on sys.path

GIB = 1024 ** 3
MACHINE_BYTES = 24 * GIB
SCALES = {  # name: (classes, dim, largest class, smallest class, graph top-k or None for dense)
    "cifar100": (100, 64, 500, 5, None),
    "imagenetlt": (1000, 2048, 1280, 5, "topk"),
    "inat2018": (8142, 2048, 1000, 2, "topk"),
    "tiny": (10, 16, 50, 2, None),  # --smoke
}
FORMS = ("full", "diag", "lowrank:16", "lowrank:32")
BATCH = 128
SAMPLES_PER_CLASS = {"cifar100": 16, "imagenetlt": 3, "inat2018": 3, "tiny": 4}  # the synthetic pass prepare() reads
NEIGHBOURS = 8          # classes each class is confused with in the synthetic predictions


def class_counts(C, largest, smallest):
    """Exponential profile n_i = largest · (smallest/largest)^(i/(C−1)), as CIFAR-LT's."""
    i = torch.arange(C, dtype=torch.float64)
    return (largest * (smallest / largest) ** (i / (C - 1))).long().tolist()


def synthetic_pass(C, D, per_class, generator):
    """(features, predictions, labels): per_class samples per class; 60% predicted right, the rest
    spread over NEIGHBOURS fixed classes with decaying odds, as a confusion matrix is."""
    labels = torch.arange(C).repeat_interleave(per_class)
    features = torch.randn(C, D, generator=generator)[labels] + torch.randn(len(labels), D, generator=generator)
    neighbours = torch.randint(0, C, (C, NEIGHBOURS), generator=generator)
    odds = 0.6 ** torch.arange(NEIGHBOURS, dtype=torch.float)
    pick = torch.multinomial(odds.expand(len(labels), -1), 1, generator=generator).squeeze(1)
    wrong = torch.rand(len(labels), generator=generator) < 0.4
    predictions = torch.where(wrong, neighbours[labels, pick], labels)
    return features, predictions, labels


class Head(nn.Module):
    def __init__(self, D, C):
        super().__init__()
        self.classifier = nn.Linear(D, C)


class SharedFullStatistics(ClassStatistics):
    """Full statistics whose C covariances are one D×D matrix (stride 0): reading them costs what
    C real ones would, storing them D² floats. The merge is skipped (it would write into them)."""

    def __init__(self, num_classes, dim, device=None):
        super().__init__(num_classes, dim, device, covariance="diag")
        self.form = "full"
        a = torch.randn(dim, dim, device=device) / dim ** 0.5
        self.cov = (a @ a.T).expand(num_classes, dim, dim)

    def update(self, features, labels):
        self.count += torch.bincount(labels, minlength=self.num_classes)


def full_bytes(C, D):
    return C * D * 4 + C * 8 + C * D * D * 4


def available_bytes():
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return MACHINE_BYTES




def step_peak_bytes(C, D, U):
    """What full's step holds at once besides the statistics: Σ of the U classes present, their
    reasoning covariance, the sum of the two."""
    return 3 * U * D * D * 4


def worker(scale, form, topk, reps, device, seed=0):
    """One (scale, form) in this fresh process: set up, time `reps` steps, return a dict."""
    warnings.simplefilter("ignore")  # lowrank's "wider than D" warning at D = 64: noted in the table
    C, D, largest, smallest, graph = SCALES[scale]
    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    counts = class_counts(C, largest, smallest)
    cfg = Config(arm="risda" if form != "ce" else "ce", covariance=form if form != "ce" else "diag",
                 graph_topk=topk if graph == "topk" else None, epochs=200, alpha=0.5, beta=0.75,
                 head_min_count=100 if scale != "cifar100" else None, device=device).resolved()
    shared = form == "full" and full_bytes(C, D) + step_peak_bytes(C, D, BATCH) > 0.7 * available_bytes()
    if form == "full" and full_bytes(C, D) > MACHINE_BYTES:
        return {"note": f"does not fit: {full_bytes(C, D) / GIB:.1f} GiB > 24 GiB", "stats": full_bytes(C, D)}
    if shared and step_peak_bytes(C, D, BATCH) > 0.7 * available_bytes():
        return {"note": f"not run: its step alone needs ~{step_peak_bytes(C, D, BATCH) / GIB:.0f} GiB", "stats": full_bytes(C, D)}
    torch.manual_seed(seed)
    head = Head(D, C).to(dev)
    objective = None
    if form != "ce":
        setup_cfg = dataclasses.replace(cfg, covariance="diag") if shared else cfg
        objective = make_objective(setup_cfg, counts, D, dev)
        features, predictions, labels = (t.to(dev) for t in synthetic_pass(C, D, SAMPLES_PER_CLASS[scale], g))
        objective.risda.prepare(features, None, labels, predictions=predictions)
        if shared:
            objective.risda.stats = SharedFullStatistics(C, D, dev)
            objective.risda.stats.count += torch.tensor(counts, device=dev)
    probs = torch.tensor(counts, dtype=torch.float)
    g = torch.Generator().manual_seed(seed + 1)  # the same batches for every form
    epoch = 180  # stage II, α and β at 0.9 of their value

    def step(n):
        labels = torch.multinomial(probs, n, replacement=True, generator=g).to(dev)
        features = torch.randn(n, D, generator=g).to(dev).requires_grad_()
        sync(dev)
        start = time.perf_counter()
        logits = head.classifier(features)
        if objective is None:
            loss = F.cross_entropy(logits, labels)
        else:
            loss = objective.loss(features, logits, labels, head, epoch)
        loss.backward()
        sync(dev)
        head.zero_grad(set_to_none=True)
        return time.perf_counter() - start, len(labels.unique())

    step(8)  # first-call costs (allocator, kernels) on a small batch
    before = rss_bytes()
    times, present = zip(*(step(BATCH) for _ in range(reps)))
    stats_bytes = full_bytes(C, D) if shared else (objective.risda.stats.nbytes() if objective else 0)
    out = {"stats": stats_bytes, "ms": 1000 * statistics.median(times), "reps": reps, "classes_in_batch": present[0],
           "step_rss": max(0, peak_rss_bytes() - before) if dev.type == "cpu" else None}
    if dev.type == "cuda":
        out["step_rss"] = torch.cuda.max_memory_allocated()
    if shared:
        out["note"] = f"Σ stride-0, merge not timed: {full_bytes(C, D) / GIB:.1f} GiB > free memory"
    if objective is not None and objective.graph is not None and hasattr(objective.graph, "k") and form.startswith("lowrank"):
        out["factor_columns"] = (objective.graph.k + 1) * objective.risda.stats.rank
    return out


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def run_worker(args, scale, form):
    cmd = [sys.executable, __file__, "--worker", scale, form, "--topk", str(args.topk), "--device", args.device,
           "--reps", str(args.reps or (5 if scale == "cifar100" else 1))]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        return {"note": f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt_bytes(n):
    if n is None:
        return "-"
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n / 1024:.0f} KiB"


def table(results):
    head = f"{'scale':<11} {'form':<11} {'stats':>10} {'/full':>7} {'step ms':>9} {'/full':>6} {'step +RSS':>10}  note"
    lines = [head, "-" * len(head)]
    for scale, rows in results.items():
        full = rows.get("full", {})
        for form, r in rows.items():
            mem_ratio = f"{r['stats'] / full['stats']:.4f}" if r.get("stats") and full.get("stats") and form != "ce" else ""
            t_ratio = f"{r['ms'] / full['ms']:.3f}" if "ms" in r and "ms" in full else ""
            ms = f"{r['ms']:.1f}" if "ms" in r else "-"
            note = r.get("note", "")
            if "factor_columns" in r:
                note = (note + "; " if note else "") + f"reasoning factor {r['factor_columns']} columns"
            if "classes_in_batch" in r and form == "ce":
                note = f"{r['classes_in_batch']} classes in the batch; {r['reps']} rep(s), median"
            stats_txt = fmt_bytes(r["stats"]) if r.get("stats") else "-"
            lines.append(f"{scale:<11} {form:<11} {stats_txt:>10} {mem_ratio:>7} {ms:>9} {t_ratio:>6} "
                         f"{fmt_bytes(r.get('step_rss')):>10}  {note}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", nargs="+", default=[s for s in SCALES if s != "tiny"], choices=list(SCALES))
    p.add_argument("--forms", nargs="+", default=list(FORMS))
    p.add_argument("--topk", type=int, default=5, help="graph top-k at ImageNet-LT and iNaturalist scale")
    p.add_argument("--reps", type=int, default=None, help="timed steps (default 5 at CIFAR scale, 1 above)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", nargs=2, metavar=("SCALE", "FORM"), help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: a few seconds that check the script runs "
                                                         "(the test suite runs it; the numbers mean nothing)")
    args = p.parse_args()
    if args.smoke:
        args.scales, args.forms, args.reps = ["tiny"], ["full", "diag"], 1
    if args.worker:
        print(json.dumps(worker(*args.worker, args.topk, args.reps, args.device)))
        return
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} thread(s), batch {BATCH}, "
          f"top-k {args.topk} at ImageNet-LT/iNat, dense ε at CIFAR", flush=True)
    results = {}
    for scale in args.scales:
        results[scale] = {}
        for form in ["ce", *args.forms]:
            results[scale][form] = run_worker(args, scale, form)
            print(f"  {scale} {form}: {results[scale][form]}", file=sys.stderr, flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
