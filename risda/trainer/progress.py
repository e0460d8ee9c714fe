"""A training run's progress: a rich bar on a terminal; plain lines in a log file.

When stderr is not a terminal (nohup, SLURM, `2> log`), or with --log-every SECONDS, the bar is
replaced by one plain line per epoch (stage, epoch/total, loss, images/s, ETA, the errors when
evaluated) and, within a long epoch, a line every --log-every seconds. Silent when disabled
(inside Ray trials), unless --log-every asks for the lines.
"""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .display import error_text
from .evaluate import error_names

DEFAULT_LOG_EVERY = 60.0  # seconds between plain lines inside an epoch, and between a driver's trial lines
_log_every: float | None = None  # --log-every, set by the command line (set_log_every)


def set_log_every(seconds: float | None) -> None:
    """--log-every: plain lines (even on a terminal, even with --no-progress), every `seconds` at most."""
    global _log_every
    _log_every = seconds


def seconds_flag(text: str) -> float:
    """argparse type of --log-every: seconds > 0."""
    import argparse
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def log_every() -> float | None:
    return _log_every


def duration(seconds: float) -> str:
    """'1h02m', '4m05s', '12s'."""
    s = int(max(seconds, 0))
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s" if m else f"{s}s"


def plain_line(text: str) -> None:
    """One timestamped line on stderr, flushed (a log file shows it at once)."""
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


class TrainProgress:
    def __init__(self, cfg, train_size: int, last_epoch: int, start_epoch: int = 0, enabled: bool = True):
        self.cfg, self.last_epoch = cfg, last_epoch
        self.console = Console(stderr=True)
        self.plain = _log_every is not None or (enabled and not self.console.is_terminal)
        self.enabled = enabled and not self.plain  # the rich bar
        self.every = _log_every or DEFAULT_LOG_EVERY
        self.total_images = (last_epoch - start_epoch) * train_size
        self.train_size, self.done_images, self.started, self.last_line = train_size, 0, time.time(), time.time()
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=self.console, disable=not self.enabled)
        self.task = None

    def __enter__(self):
        self.bar.__enter__()
        self.task = self.bar.add_task(f"{self.cfg.arm} {self.cfg.dataset} λ={self.cfg.imbalance:g}",
                                      total=self.total_images, status="")
        self.started = self.last_line = time.time()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def eta(self) -> str:
        rate = self.done_images / max(time.time() - self.started, 1e-9)
        return duration((self.total_images - self.done_images) / rate) if rate else "?"

    def batch(self, n: int, loss=None) -> None:
        """loss: a device tensor read now (a host sync), or None to keep the last reading."""
        self.done_images += n
        if self.plain:
            if loss is not None and time.time() - self.last_line >= self.every:
                self.last_line = time.time()
                plain_line(f"{self.label()}  {self.done_images % self.train_size or self.train_size}/{self.train_size} "
                           f"images  loss {loss.item():.3f}  ETA {self.eta()}")
        elif loss is None or not self.enabled:
            self.bar.update(self.task, advance=n)
        else:
            self.bar.update(self.task, advance=n, status=f"loss {loss.item():.3f}")

    def label(self, epoch: int | None = None) -> str:
        stage = "I" if epoch is not None and epoch < self.cfg.stage1_epochs else "II"
        if epoch is None:
            return f"{self.cfg.arm} epoch {self.done_images // max(self.train_size, 1) + 1}/{self.last_epoch}"
        return f"{self.cfg.arm} stage {stage} epoch {epoch + 1}/{self.last_epoch}"

    def epoch_done(self, record: dict) -> None:
        if self.plain:
            self.last_line = time.time()
            plain_line(epoch_line(self.label(record["epoch"]), record, self.eta()))
            return
        if not self.enabled or "test_error" not in record:
            return
        val = f"  val {record['val_error']:.2f}" if "val_error" in record else ""
        self.console.log(f"epoch {record['epoch'] + 1}/{self.last_epoch}  loss {record['train_loss']:.3f}  "
                         f"test {record['test_error']:.2f}{val}  many/med/few "
                         + "/".join("-" if record[k] is None else f"{record[k]:.1f}" for k in error_names("test_")[1:]))


def epoch_line(label: str, record: dict, eta: str) -> str:
    """`risda stage II epoch 170/200  loss 1.234  412 img/s  ETA 8m20s  test 52.10  val 50.00  many/med/few 10.0/40.0/–`"""
    text = f"{label}  loss {record['train_loss']:.3f}  {record.get('images_per_s', 0):.0f} img/s  ETA {eta}"
    if "test_error" in record:
        text += f"  test {error_text(record['test_error'])}"
        text += f"  val {error_text(record['val_error'])}" if "val_error" in record else ""
        text += "  many/med/few " + "/".join(error_text(record.get(k), 1) for k in error_names("test_")[1:])
    return text
