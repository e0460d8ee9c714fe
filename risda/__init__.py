"""RISDA: Reasoning-based Implicit Semantic Data Augmentation for long-tailed classification."""
from .config import Config, ConfigError
from .longtail import long_tail_counts

__all__ = ["Config", "ConfigError", "long_tail_counts"]
