"""What the driver shows: a rich progress bar while an experiment runs (`RichProgress`, a Tune
callback) and the table of the best trials after it (`print_top`).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ray import tune

from ..trainer.config import RunConfig
from ..trainer.display import EMPTY, is_empty
from ..trainer.progress import DEFAULT_LOG_EVERY, duration, log_every, plain_line
from ..trainer.evaluate import error_names
from .collate import error_message


class RichProgress(tune.Callback):
    """On the driver: a rich bar of finished trials, each running trial's epoch beside it
    (trials report every epoch, so it moves within a minute), and a line per finished trial.

    In a log file (stdout or stderr not a terminal) or with --log-every SECONDS: plain lines
    instead, one per running trial every DEFAULT_LOG_EVERY (or SECONDS) seconds (stage,
    epoch/total, loss, images/s, ETA) and one per finished or failed trial.

    Tune pickles its callbacks with the experiment, so the rich objects are made lazily and
    dropped from the pickle."""

    def __init__(self, total: int, metric: str | None = "val_error", params=(), label: str = "trials"):
        self.total, self.metric, self.params, self.label = total, metric, tuple(params), label
        self._bar, self._last_lines = None, 0.0
        self._scores = {}  # trial_id -> last reported metric (reports between evaluations lack it)

    def __getstate__(self):
        return {**self.__dict__, "_bar": None}

    def _progress(self):
        if self._bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self._bar = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn())
            self._task = self._bar.add_task(self.label, total=self.total, status="")
            self._bar.start()
        return self._bar

    def _describe(self, trial) -> str:
        params = " ".join(f"{p}={_fmt(trial.config.get(p))}" for p in self.params)
        return f"{trial.trial_id} {params}".strip()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.metric and result.get(self.metric) is not None:
            self._scores[trial.trial_id] = result[self.metric]

    def on_step_end(self, iteration, trials, **info):
        if plain():
            self._trial_lines(trials)
            return
        finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        running = [t for t in trials if t.status == "RUNNING"]
        epochs = ", ".join(f"{t.trial_id[-5:]} ep {t.last_result.get('epochs_done', 0)}" for t in running[:6])
        best = f"  best {self.metric} {min(self._scores.values()):.2f}" if self._scores else ""
        self._progress().update(self._task, completed=finished, status=f"{len(running)} running: {epochs}{best}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result
        score = f"{self.metric} {_score(r.get(self.metric))}  test {_score(r.get('test_error'))}  " if self.metric else ""
        self._log(f"done   {self._describe(trial)}  {score}epochs {r.get('epochs_done', 0)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        error = trial_error_line(trial)
        self._log(f"failed {self._describe(trial)}{f': {error}' if error else ''}", style="red")

    def _log(self, text: str, style: str = "") -> None:
        if plain():
            plain_line(f"{self.label}: {text}")
        else:
            from rich.markup import escape
            self._progress().console.log(f"[{style}]{escape(text)}[/]" if style else escape(text))

    def _trial_lines(self, trials) -> None:
        """Every log-every seconds, a line per running trial."""
        if time.time() - self._last_lines < (log_every() or DEFAULT_LOG_EVERY):
            return
        self._last_lines = time.time()
        running = [t for t in trials if t.status == "RUNNING"]
        finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        best = f", best {self.metric} {min(self._scores.values()):.2f}" if self._scores else ""
        plain_line(f"{self.label}: {finished}/{self.total} finished, {len(running)} running{best}")
        for t in running:
            plain_line(f"{self.label}: {trial_line(t, self._describe(t))}")

    def on_experiment_end(self, trials, **info):
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _fmt(v) -> str:
    """A parameter or an error as printed; NaN (an empty group, nothing measured) as `–`."""
    if isinstance(v, float):
        return EMPTY if is_empty(v) else f"{v:.4g}"
    return str(v)


def _score(v) -> str:
    """An error as printed: None too is `–`."""
    return EMPTY if is_empty(v) else _fmt(v)


def driver_console(stderr: bool = False):
    """The driver's rich console. In a terminal, rich's own; in a log file or a pipe, one line per
    message: nothing wrapped at 80 columns, `log` as `HH:MM:SS message` like the plain progress
    lines (no source file and line after it), tables 160 columns wide. A batch job's log reads,
    and greps, line by line."""
    from rich.console import Console

    class LogFileConsole(Console):
        def log(self, *objects, **_):
            self.print(time.strftime("%H:%M:%S"), *objects, soft_wrap=True)

    console = Console(stderr=stderr)
    if console.is_terminal:
        return console
    return LogFileConsole(stderr=stderr, width=max(console.width, 160), soft_wrap=True)


def print_top(trials, metric: str = "val_error", params=(), n: int = 10, title: str = "top trials") -> None:
    """A rich table of the n best trials by final `metric`, failed trials counted below it."""
    from rich.table import Table
    console = driver_console()
    if not len(trials):
        console.print("no trials")
        return
    scored = trials[trials[f"final_{metric}"].notna()].sort_values(["completed", f"final_{metric}"], ascending=[False, True])
    table = Table(title=title)
    columns = {"trial_id": "trial", **{p: p for p in params}, f"final_{metric}": metric.replace("_error", ""),
               **{f"final_{k}": label for k, label in zip(error_names("test_"), ("test", "many", "med", "few"))},
               "epochs_run": "epochs", "wall_time_s": "wall s"}
    for label in columns.values():
        table.add_column(label, justify="left" if label == "trial" else "right", no_wrap=True)
    for _, row in scored.head(n).iterrows():
        table.add_row(*[_score(row.get(c)) if c.startswith("final_") else _fmt(row.get(c)) for c in columns])
    console.print(table)
    failed = trials[trials["error"].notna()]
    for _, row in failed.iterrows():
        console.print(f"[red]failed[/red] {row['trial_id']}: {row['error']}")


def trial_error_line(trial) -> str | None:
    """The last line of a failed trial's error ('risda.trainer.loop.DivergedError: diverged: ...'), from
    the error file Tune writes before it calls the callbacks (its traceback stays there, off the
    driver's log: risda.runner.cluster.quiet_tune); None if there is none."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        return None
    return error_message(text) if text.strip() else None


def plain() -> bool:
    """Plain lines rather than a bar: --log-every given, or the output is a log file or a pipe."""
    return log_every() is not None or not (sys.stdout.isatty() and sys.stderr.isatty())


def trial_epochs(config: dict) -> int | None:
    """A trial's epochs in all: a shared stage I's (its job's config), else the run's."""
    job = config.get("job")
    if isinstance(job, dict) and "config" in job:
        return RunConfig.from_dict(job["config"]).stage1_epochs
    return config.get("epochs")


def trial_line(trial, described: str) -> str:
    """`4f2a1 alpha=0.5 stage I epoch 12/160  loss 1.234  412 img/s  ETA 8m20s` from its last report."""
    r = trial.last_result or {}
    done, total = r.get("epochs_done", 0), trial_epochs(trial.config)
    if "train_loss" not in r:
        return f"{described}  starting"
    stage = {1: "I", 2: "II"}.get(r.get("stage"), "?")
    per_epoch = r.get("time_this_iter_s")
    eta = duration((total - done) * per_epoch) if per_epoch and total else "?"
    return (f"{described}  stage {stage} epoch {done}/{total or '?'}  loss {r['train_loss']:.3f}  "
            f"{r.get('images_per_s', 0):.0f} img/s  ETA {eta}")
