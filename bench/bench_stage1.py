"""What sharing stage I saves: the same search and the same ablation, with and without it,
side by side in one run, through the real command lines (each with its own storage).

    python bench/bench_stage1.py                      # 6-trial search + 4-arm ablation, 20 epochs
    python bench/bench_stage1.py --epochs 10 --n-max 200 --parts search
    python bench/bench_stage1.py --smoke        # a 2-trial search of 2 epochs, n_max 100 (the test suite)

Prints, for each part, the training epochs that ran (the shared stage I counted once) and the
wall time of the whole command, and their ratios. Stage I is 80% of the epochs, so N trials cost
N epochs-worth unshared and 0.8 + 0.2·N shared: 3.0x fewer at N = 6. The wall-time ratio is lower
by what each trial costs beyond its epochs (Ray actor start, data load, evaluation).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], log: Path) -> float:
    started = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"{' '.join(cmd[:3])} ... exited {rc}; see {log}")
    return time.time() - started


def epochs_search(results: Path, epochs: int, stage1_epochs: int) -> int:
    trials = pd.read_parquet(results / "trials.parquet")
    stage1 = results / "stage1.parquet"
    if not stage1.exists():  # every trial trained its own stage I
        return int(trials["epochs_run"].sum())
    s1 = pd.read_parquet(stage1)
    return int(s1.loc[s1.trained_now, "epochs"].sum()) + len(trials) * (epochs - stage1_epochs)


def epochs_ablation(results: Path, epochs: int, stage1_epochs: int) -> int:
    runs = pd.read_parquet(results / "runs.parquet")
    stage1 = results / "stage1.parquet"
    if not stage1.exists():
        return int(runs["epochs_run"].sum())
    s1 = pd.read_parquet(stage1)
    return int(s1.loc[s1.trained_now, "epochs"].sum()) + len(runs) * (epochs - stage1_epochs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "cifar10-jpeg"))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--n-max", type=int, default=500)
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--parts", default="search,ablation")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the embedded Ray, all to one trial at a time")
    p.add_argument("--smoke", action="store_true", help="the search part at tiny sizes (2 trials, 2 epochs, 100 images in the largest "
                   "class): checks the script runs; Ray's start-up makes it a minute, not seconds")
    args = p.parse_args()
    if args.smoke:
        args.epochs, args.n_max, args.trials, args.parts = 2, 100, 2, "search"
    stage1_epochs = int(0.8 * args.epochs)
    common = ["--dataset", "cifar10lt", "--data-root", args.data_root, "--imbalance", "100", "--n-max", str(args.n_max),
              "--epochs", str(args.epochs), "--eval-every", str(args.epochs), "--test-per-class", "10" if args.smoke else "100",
              "--precision", "fp32", "--num-cpus", str(args.cpus), "--cpus-per-trial", str(args.cpus)]
    work = Path(tempfile.mkdtemp(prefix="bench_stage1-"))
    rows = []
    for part in args.parts.split(","):
        for shared in (True, False):
            mode = "shared" if shared else "independent"
            name = f"{part}-{mode}"
            flag = ["--shared-stage1"] if shared else ["--no-shared-stage1"]
            out = ["--storage", str(work / name / "ray"), "--results", str(work / name / "results"), "--name", name]
            if part == "search":
                cmd = [sys.executable, "tune/search.py", *common, *flag, *out, "--num-samples", str(args.trials),
                       "--max-concurrent", "1", "--scheduler", "none", "--head-count", "2"]
                wall = run(cmd, work / f"{name}.log")
                epochs = epochs_search(work / name / "results" / name, args.epochs, stage1_epochs)
                cells = args.trials
            else:
                cmd = [sys.executable, "ablations/run.py", "--spec", "table5", *common, *flag, *out, "--no-progress",
                       "--arms", "risda,no_reasoning,ce,ce_drw", "--imbalance", "100", "--seeds", "0", "--head-count", "2"]
                wall = run(cmd, work / f"{name}.log")
                epochs = epochs_ablation(work / name / "results" / name, args.epochs, stage1_epochs)
                cells = 4
            rows.append(dict(part=part, mode=mode, trials=cells, epochs_trained=epochs, wall_s=round(wall, 1)))
            print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    print(f"\n{args.epochs} epochs (stage I {stage1_epochs}), n_max {args.n_max}, {args.cpus} CPUs, scratch {work}")
    for part, g in table.groupby("part", sort=False):
        s, i = g[g["mode"] == "shared"].iloc[0], g[g["mode"] == "independent"].iloc[0]
        print(f"{part:9s} {int(s.trials)} trials: epochs {i.epochs_trained} -> {s.epochs_trained} "
              f"({i.epochs_trained / s.epochs_trained:.2f}x fewer), wall {i.wall_s:.0f} s -> {s.wall_s:.0f} s "
              f"({i.wall_s / s.wall_s:.2f}x less)")


if __name__ == "__main__":
    main()
