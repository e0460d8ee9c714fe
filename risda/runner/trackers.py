"""The experiment trackers people already use, through Ray Tune's own logger callbacks.

TensorBoard needs nothing: Ray Tune writes each trial's event file (events.out.tfevents.*) into the
trial's folder under --storage; `tensorboard --logdir ray_results/<name>` shows them all.

`--tracker mlflow` attaches Ray's MLflowLoggerCallback: one MLflow run per trial in the MLflow
experiment named as the Ray experiment (--name), wherever MLflow's own MLFLOW_TRACKING_URI points
(MLflow's default: ./mlflow.db). `--tracker wandb` attaches Ray's WandbLoggerCallback: one W&B run
per trial in the project $WANDB_PROJECT (default: the experiment's name), grouped by the experiment,
its local files in results/<name>/wandb/ unless $WANDB_DIR says otherwise (WANDB_MODE=offline needs
no account; `wandb sync` uploads later). Either logs each trial's config, every reported epoch's
metrics (losses, errors, images/s) and, with the trial's last report, the trainer's final errors
(summary_test_error, summary_best_test_error, ...). Each is an optional extra (pip install -e ".[mlflow]").
"""
from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

from ..trainer.config import ConfigError

TRACKERS = ("mlflow", "wandb")


def add_tracker_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tracking")
    g.add_argument("--tracker", action="append", choices=TRACKERS, default=[],
                   help="also log every trial to MLflow or Weights & Biases through Ray Tune's logger callbacks "
                        "(repeatable; install the extra: pip install -e \".[mlflow]\"); TensorBoard event files are "
                        "written regardless, in each trial's folder under --storage")


def check_trackers(names: list[str]) -> None:
    """Each tracker's package imports, else one line naming the extra to install (before Ray starts)."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ConfigError(f"--tracker {name}: {name} is not installed; install the extra: "
                              f"pip install -e \".[{name}]\" (or pip install {name})") from None


def tracker_callbacks(names: list[str], experiment: str, results_dir: Path) -> list:
    """Ray Tune's own logger callbacks for the named trackers, for the experiment `experiment`."""
    check_trackers(names)
    callbacks = []
    if "mlflow" in names:
        from ray.air.integrations.mlflow import MLflowLoggerCallback
        callbacks.append(MLflowLoggerCallback(experiment_name=experiment))
    if "wandb" in names:
        from ray.air.integrations.wandb import WandbLoggerCallback
        where = {} if os.environ.get("WANDB_DIR") else {"dir": str(Path(results_dir).resolve())}
        Path(where.get("dir", os.environ.get("WANDB_DIR", "."))).mkdir(parents=True, exist_ok=True)
        callbacks.append(WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT") or experiment, group=experiment, **where))
    return callbacks
