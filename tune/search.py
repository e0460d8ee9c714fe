"""Hyperparameter search: the trainer, unchanged, as Ray Tune trials that Optuna (TPE) steers.

    python tune/search.py --dataset cifar100lt --data-root data --imbalance 100 --num-samples 32
    python tune/search.py --help

A thin command line: the search is risda.runner.search (its docstring says what it tunes, on
what, and what it writes to results/<name>/).
"""
import sys

from risda.runner.search import main

if __name__ == "__main__":
    sys.exit(main())
