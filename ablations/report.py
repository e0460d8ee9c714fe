"""python ablations/report.py --results results/<name> [--out results/REPRODUCTION.md] [--command "..."]

Writes a Markdown reproduction report from an ablation's outputs (risda.runner.report): the
machine, the commit, the command, the wall time, the protocol, and per imbalance factor the
last-epoch, best-validation-epoch and best-test-epoch errors (overall, many, medium, few) of
every arm, beside the published numbers with their sources. No training.
"""
import sys

from risda.runner.report import main

if __name__ == "__main__":
    sys.exit(main())
