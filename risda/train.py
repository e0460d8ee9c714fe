"""python -m risda.train --dataset cifar10lt --data-root ../shared/data/cifar10-jpeg --arm risda --epochs 200 --out runs/x"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import Config, ConfigError, add_config_args, config_overrides

# Input errors: printed as one line `error: <message>` (exit 2), the traceback only with --debug.
INPUT_ERRORS = (ConfigError, FileNotFoundError)


def preflight(cfg: Config) -> None:
    """The cheap checks that need more than the config, before any data is read: the device
    exists and, with --resume, the checkpoint is readable and was written by these flags."""
    import torch

    from .checkpoint import check_checkpoint
    from .trainer import pick_device
    try:
        device = pick_device(cfg.device)
    except RuntimeError as e:  # pick_device's own message names the flag; torch.device's does not
        msg = str(e).splitlines()[0]
        raise ConfigError(msg if msg.startswith("--device") else f"--device {cfg.device}: {msg}; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {cfg.device}: torch sees {torch.cuda.device_count()} CUDA device(s); use cuda:0 or auto")
    if cfg.resume:
        check_checkpoint(Path(cfg.out).expanduser().resolve() / "checkpoint.pt", cfg.resolved())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train one long-tailed run (RISDA or a baseline).")
    add_config_args(parser)
    parser.add_argument("--debug", action="store_true", help="on bad input, show the Python traceback instead of the one-line error")
    args = parser.parse_args(argv)
    try:
        cfg = Config(**config_overrides(args)).validate()
        preflight(cfg)
        from .trainer import train
        summary = train(cfg)
    except INPUT_ERRORS as e:
        if args.debug:
            raise
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(f"test error {summary['test_error']:.2f}%  (many {summary['many_error']}, medium {summary['medium_error']}, "
          f"few {summary['few_error']})  -> {cfg.out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
