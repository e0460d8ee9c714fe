"""RISDA: Reasoning-based Implicit Semantic Data Augmentation for long-tailed classification.

Three layers, from the inside out: `risda.method` (the losses, pure torch: what a researcher drops
into their own loop), `risda.trainer` (Config, data, models, the two-stage loop, checkpoints;
`python -m risda.train`) and `risda.runner` (Ray Tune, Optuna, tables, reports). The method's public
losses are importable from here; `Config` too, imported on first use so that `import risda.method`
never loads the trainer.
"""
from .method import (LDAMLoss, LogitAdjustedLoss, NormedLinear, RISDALoss, class_balanced_weights, log_prior,
                     posthoc_logit_adjustment)

__all__ = ["RISDALoss", "LDAMLoss", "LogitAdjustedLoss", "NormedLinear", "posthoc_logit_adjustment", "log_prior",
           "class_balanced_weights", "Config", "ConfigError", "long_tail_counts"]


def __getattr__(name):  # the trainer's names, on first use
    if name in ("Config", "ConfigError"):
        from .trainer import config
        return getattr(config, name)
    if name == "long_tail_counts":
        from .trainer.longtail import long_tail_counts
        return long_tail_counts
    raise AttributeError(f"module 'risda' has no attribute {name!r}")
