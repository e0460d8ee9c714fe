"""python ablations/run.py [--spec table5] [--arms risda,ce] [--imbalance 100,10] [--seeds 0,1,2] [trainer flags]

    python ablations/run.py --dataset cifar10lt --data-root ../shared/data/cifar10-jpeg --epochs 20 --seeds 0
    python ablations/run.py --spec fig4_alpha_beta --config results/search/best.json
    python ablations/run.py --collate-only --name table5          # re-collate, no training
    python ablations/run.py --help

A thin command line: one study (a spec of risda/runner/specs/, or a .toml file) as one Ray Tune
experiment is risda.runner.ablation (the command line itself: risda.runner.ablation.cli).
"""
import sys

from risda.runner.ablation.cli import main

if __name__ == "__main__":
    sys.exit(main())
