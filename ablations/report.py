"""python ablations/report.py --results results/<name> [--out results/REPRODUCTION.md] [--command "..."]

Writes a Markdown reproduction report from an ablation's outputs (risda.report): the machine,
the commit, the command, the wall time, the protocol, and per imbalance factor the last-epoch,
best-validation-epoch and best-test-epoch errors (overall, many, medium, few) of every arm,
beside the published numbers with their sources. No training.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a fresh clone without `pip install -e .`

from risda.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
