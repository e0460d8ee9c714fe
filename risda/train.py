"""python -m risda.train --dataset cifar10lt --data-root ../shared/data/cifar10-jpeg --arm risda --epochs 200 --out runs/x"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import Config, ConfigError, add_config_args, config_overrides
from .display import error_text
from .failures import one_line, runtime_message
from .progress import DEFAULT_LOG_EVERY, seconds_flag, set_log_every

# Input errors: printed as one line `error: <message>` (exit 2), the traceback only with --debug.
INPUT_ERRORS = (ConfigError, FileNotFoundError)
# Runtime failures (a divergence, a storage fault, a failed --download): one line too, exit 1.


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
    parser.add_argument("--debug", action="store_true", help="on bad input or a runtime failure (divergence, storage fault, failed download), show the Python traceback instead of the one-line error")
    parser.add_argument("--log-every", type=seconds_flag, default=None, metavar="SECONDS",
                        help="plain progress lines instead of the bar (also with --no-progress): a line per epoch and, "
                             "within an epoch, one every SECONDS at most (default when stderr is not a terminal: "
                             f"{DEFAULT_LOG_EVERY:g} s)")
    shared = parser.add_argument_group("shared stage I (risda.stage1; the Ray runner does this by itself)")
    shared.add_argument("--stage1-only", action="store_true",
                        help="train stage I alone (plain CE; with --variant reference it also records the reference "
                             "variant's observations) and stop: <out>/checkpoint.pt is then a stage-I checkpoint")
    shared.add_argument("--stage1-from", metavar="CHECKPOINT",
                        help="fork stage II from a stage-I checkpoint trained with the same stage-I flags")
    args = parser.parse_args(argv)
    set_log_every(args.log_every)
    try:
        cfg = Config(**config_overrides(args)).validate()
        preflight(cfg)
        from .stage1 import shares_stage1
        from .trainer import train
        if (args.stage1_only or args.stage1_from) and not shares_stage1(cfg):
            raise ConfigError(f"--arm {cfg.arm} with --stage1-epochs {cfg.resolved().stage1_epochs} has no shared stage I "
                              "(isda trains its augmentation from epoch 0); drop --stage1-only / --stage1-from")
        if args.stage1_only:
            done = train(cfg, stage1_only=True, observe_reference=cfg.variant == "reference")
            print(f"stage I {done['stage1_key']}: {len(done['history'])} epochs -> {done['checkpoint']}")
            return 0
        stage1_from = Path(args.stage1_from) if args.stage1_from else None
        if stage1_from is not None and not stage1_from.is_file():
            raise ConfigError(f"--stage1-from {stage1_from}: no such file; train it with --stage1-only first")
        summary = train(cfg, stage1_from=stage1_from)
    except INPUT_ERRORS as e:
        if args.debug:
            raise
        print("error: " + one_line(e), file=sys.stderr)
        return 2
    except Exception as e:
        message = runtime_message(e)
        if message is None or args.debug:
            raise
        print("error: " + message, file=sys.stderr)
        return 1
    print(result_line(summary, cfg.out))
    return 0


def result_line(summary: dict, out) -> str:
    """The run's last line: its test errors, an empty group as `–` (risda.display)."""
    groups = ", ".join(f"{g} {error_text(summary[f'{g}_error'], 1)}" for g in ("many", "medium", "few"))
    return f"test error {error_text(summary['test_error'])}%  ({groups})  -> {out}/summary.json"


if __name__ == "__main__":
    sys.exit(main())
