"""A rich progress bar for a training run (silent when disabled, e.g. inside Ray trials)."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .evaluate import error_names


class TrainProgress:
    def __init__(self, cfg, train_size: int, last_epoch: int, start_epoch: int = 0, enabled: bool = True):
        self.cfg, self.enabled, self.last_epoch = cfg, enabled, last_epoch
        self.console = Console(stderr=True)
        self.total_images = (last_epoch - start_epoch) * train_size
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=self.console, disable=not enabled)
        self.task = None

    def __enter__(self):
        self.bar.__enter__()
        self.task = self.bar.add_task(f"{self.cfg.arm} {self.cfg.dataset} λ={self.cfg.imbalance:g}",
                                      total=self.total_images, status="")
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def batch(self, n: int, loss=None) -> None:
        """loss: a device tensor read now (a host sync), or None to keep the last reading."""
        if loss is None or not self.enabled:
            self.bar.update(self.task, advance=n)
        else:
            self.bar.update(self.task, advance=n, status=f"loss {loss.item():.3f}")

    def epoch_done(self, record: dict) -> None:
        if not self.enabled or "test_error" not in record:
            return
        val = f"  val {record['val_error']:.2f}" if "val_error" in record else ""
        self.console.log(f"epoch {record['epoch'] + 1}/{self.last_epoch}  loss {record['train_loss']:.3f}  "
                         f"test {record['test_error']:.2f}{val}  many/med/few "
                         + "/".join("-" if record[k] is None else f"{record[k]:.1f}" for k in error_names("test_")[1:]))
