"""python -m risda.train --dataset cifar10lt --data-root ../shared/data/cifar10-jpeg --arm risda --epochs 200 --out runs/x"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import Config, ConfigError, RunConfig, add_config_args, config_overrides
from .display import error_text
from .failures import one_line, runtime_message
from .progress import DEFAULT_LOG_EVERY, seconds_flag, set_log_every

# Input errors: printed as one line `error: <message>` (exit 2), the traceback only with --debug.
INPUT_ERRORS = (ConfigError, FileNotFoundError)
# Runtime failures (a divergence, a storage fault, a failed --download): one line too, exit 1.

# Where a run was written, not what it computed: a replay (--config) takes none of them from the file.
NOT_REPLAYED = ("out", "resume", "progress")


def replay_fields(path) -> tuple[dict, str | None]:
    """(Config fields, note) of the run recorded in `path`: a search's best.json (tune/search.py) or a
    run's summary.json. The fields are its config, written to <the file's folder>/replay, with the
    threads and compile decision it ran with per phase (`torch_threads`, `compile` of the run or its
    stage II; `stage1_torch_threads`, `stage1_compile` of its stage I, which in a search is a shared
    stage I that may have had more CPUs), so that fp32 on a CPU gives its numbers exactly. The note is
    one line for a file that lacks them (written before they were recorded). Raises ConfigError."""
    p = Path(path).expanduser()
    fix = "pass a search's results/<name>/best.json or a run's <out>/summary.json"
    if not p.is_file():
        raise ConfigError(f"--config {p}: no such file; {fix}")
    try:
        doc = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {p} is not JSON ({e}); {fix}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise ConfigError(f"--config {p} has no \"config\" object (the run's settings); {fix}")
    fields = {k: v for k, v in doc["config"].items() if k not in NOT_REPLAYED}
    fields["out"] = str(p.parent / "replay")
    try:
        stage1 = RunConfig.from_dict(fields).stage1_epochs > 0
    except ConfigError as e:  # a field this version does not know
        raise ConfigError(f"--config {p}: {e}") from None
    recorded = ("torch_threads", "compile", *(("stage1_torch_threads", "stage1_compile") if stage1 else ()))
    missing = [k for k in recorded if doc.get(k) is None]
    if doc.get("torch_threads") is not None:
        fields["threads"] = doc["torch_threads"]
    if stage1 and doc.get("stage1_torch_threads") is not None:
        fields["stage1_threads"] = doc["stage1_torch_threads"]
    compiled = {doc[k] for k in recorded if k.endswith("compile") and doc.get(k) is not None}
    if len(compiled) == 1:  # as it was decided then (auto counts the steps, which a replay from scratch has more of)
        fields["compile"] = "on" if compiled.pop() else "off"
    elif len(compiled) > 1:
        missing.append("one compile decision (its stage I was compiled and its stage II not, or the reverse)")
    if not missing:
        return fields, None
    return fields, (f"note: {p} does not record {', '.join(missing)} (an older file, or a resumed run that changed "
                    f"them): the replay may differ from its numbers in the last digits")


# What a run writes into --out (risda.trainer.loop): a folder that holds any of them holds a run.
RUN_FILES = ("checkpoint.pt", "summary.json", "epochs.parquet", "graph.parquet", "graph.png")


def check_out(cfg: Config, overwrite: bool) -> list[Path]:
    """A run never replaces another unasked: --out that holds a finished or partial run needs
    --resume (continue it), a new --out, or --overwrite (replace it on purpose). Returns the
    old run's files that --overwrite will remove."""
    out = Path(cfg.out).expanduser().resolve()
    found = [out / f for f in RUN_FILES if (out / f).is_file()]
    if overwrite and cfg.resume:
        raise ConfigError("--overwrite replaces the run in --out and --resume continues it: pass one of them")
    if not found or cfg.resume or overwrite:
        return found if overwrite else []
    what = ("a finished run (summary.json)" if (out / "summary.json").is_file() else
            "a partial run (checkpoint.pt)" if (out / "checkpoint.pt").is_file() else
            f"run output ({', '.join(p.name for p in found)})")
    raise ConfigError(f"--out {out} already holds {what}: pass --resume to continue it, a new --out, or --overwrite "
                      f"to replace it")


def preflight(cfg: RunConfig) -> None:
    """The cheap checks that need more than the config, before any data is read: the device
    exists and, with --resume, the checkpoint is readable and was written by these flags."""
    import torch

    from .checkpoint import check_checkpoint
    from .loop import pick_device
    try:
        device = pick_device(cfg.device)
    except RuntimeError as e:  # pick_device's own message names the flag; torch.device's does not
        msg = str(e).splitlines()[0]
        raise ConfigError(msg if msg.startswith("--device") else f"--device {cfg.device}: {msg}; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {cfg.device}: torch sees {torch.cuda.device_count()} CUDA device(s); use cuda:0 or auto")
    if cfg.resume:
        check_checkpoint(Path(cfg.out).expanduser().resolve() / "checkpoint.pt", cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train one long-tailed run (RISDA or a baseline).")
    add_config_args(parser)
    parser.add_argument("--config", metavar="FILE",
                        help="replay a recorded run: a search's best.json or a run's summary.json (its config, threads "
                             "per stage and compile decision; typed flags override them; --out defaults to "
                             "<the file's folder>/replay)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run that --out already holds (its checkpoint, summary and epochs are deleted "
                             "first); without it such an --out is refused: --resume continues it")
    parser.add_argument("--debug", action="store_true", help="on bad input or a runtime failure (divergence, storage fault, failed download), show the Python traceback instead of the one-line error")
    parser.add_argument("--log-every", type=seconds_flag, default=None, metavar="SECONDS",
                        help="plain progress lines instead of the bar (also with --no-progress): a line per epoch and, "
                             "within an epoch, one every SECONDS at most (default when stderr is not a terminal: "
                             f"{DEFAULT_LOG_EVERY:g} s)")
    shared = parser.add_argument_group("shared stage I (risda.trainer.stage1; the Ray runner does this by itself)")
    shared.add_argument("--stage1-only", action="store_true",
                        help="train stage I alone (plain CE; with --variant reference it also records the reference "
                             "variant's observations) and stop: <out>/checkpoint.pt is then a stage-I checkpoint")
    shared.add_argument("--stage1-from", metavar="CHECKPOINT",
                        help="fork stage II from a stage-I checkpoint trained with the same stage-I flags")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    set_log_every(args.log_every)
    try:
        cfg = run_config(args)
        replaced = check_out(cfg, args.overwrite)
        preflight(cfg)
        from .stage1 import shares_stage1
        from .loop import train
        if (args.stage1_only or args.stage1_from) and not shares_stage1(cfg):
            raise ConfigError(f"--arm {cfg.arm} with --stage1-epochs {cfg.stage1_epochs} has no shared stage I "
                              "(isda trains its augmentation from epoch 0); drop --stage1-only / --stage1-from")
        if args.stage1_only:
            remove(replaced)
            done = train(cfg, stage1_only=True, observe_reference=cfg.variant == "reference")
            print(f"stage I {done['stage1_key']}: {len(done['history'])} epochs -> {done['checkpoint']}")
            return 0
        stage1_from = Path(args.stage1_from) if args.stage1_from else None
        if stage1_from is not None and not stage1_from.is_file():
            raise ConfigError(f"--stage1-from {stage1_from}: no such file; train it with --stage1-only first")
        remove(replaced)
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


def remove(files: list[Path]) -> None:
    """--overwrite: the old run's files go before the new run starts, so that a new run that
    fails never leaves the old summary looking like its result."""
    for path in files:
        path.unlink(missing_ok=True)
    if files:
        print(f"--overwrite: removed the earlier run's {', '.join(p.name for p in files)} from {files[0].parent}",
              file=sys.stderr)


def run_config(args: argparse.Namespace) -> RunConfig:
    """The run's config, resolved once here (the CLI's entry): the typed flags over --config's
    recorded run (replay_fields), if any."""
    given = config_overrides(args)
    if args.config is None:
        return Config(**given).validate().resolved()
    recorded, note = replay_fields(args.config)
    cfg = Config.from_dict({**recorded, **given}).validate().resolved()
    if note:
        print(note, file=sys.stderr)
    return cfg


def result_line(summary: dict, out) -> str:
    """The run's last line: its test errors, an empty group as `–` (risda.trainer.display)."""
    groups = ", ".join(f"{g} {error_text(summary[f'{g}_error'], 1)}" for g in ("many", "medium", "few"))
    return f"test error {error_text(summary['test_error'])}%  ({groups})  -> {out}/summary.json"


if __name__ == "__main__":
    sys.exit(main())
