"""python -m risda.train --dataset cifar10lt --data-root ../shared/data/cifar10-jpeg --arm risda --epochs 200 --out runs/x"""
from __future__ import annotations

import argparse
import sys

from .config import Config, ConfigError, add_config_args, config_overrides


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train one long-tailed run (RISDA or a baseline).")
    add_config_args(parser)
    cfg = Config(**config_overrides(parser.parse_args(argv)))
    try:
        cfg.validate()
    except ConfigError as e:
        parser.error(str(e))
    from .trainer import train
    try:
        summary = train(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"test error {summary['test_error']:.2f}%  (many {summary['many_error']}, medium {summary['medium_error']}, "
          f"few {summary['few_error']})  -> {cfg.out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
