"""What the driver shows: a rich progress bar while an experiment runs (`RichProgress`, a Tune
callback) and the table of the best trials after it (`print_top`).
"""
from __future__ import annotations

from ray import tune

from ..display import EMPTY, is_empty
from ..evaluate import error_names


class RichProgress(tune.Callback):
    """On the driver: a rich bar of finished trials, each running trial's epoch beside it
    (trials report every epoch, so it moves within a minute), and a line per finished trial.

    Tune pickles its callbacks with the experiment, so the rich objects are made lazily and
    dropped from the pickle."""

    def __init__(self, total: int, metric: str | None = "val_error", params=(), label: str = "trials"):
        self.total, self.metric, self.params, self.label = total, metric, tuple(params), label
        self._bar = None
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
        finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        running = [t for t in trials if t.status == "RUNNING"]
        epochs = ", ".join(f"{t.trial_id[-5:]} ep {t.last_result.get('epochs_done', 0)}" for t in running[:6])
        best = f"  best {self.metric} {min(self._scores.values()):.2f}" if self._scores else ""
        self._progress().update(self._task, completed=finished, status=f"{len(running)} running: {epochs}{best}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result
        score = f"{self.metric} {_score(r.get(self.metric))}  test {_score(r.get('test_error'))}  " if self.metric else ""
        self._progress().console.log(f"done   {self._describe(trial)}  {score}epochs {r.get('epochs_done', 0)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        # Tune writes the error file after this call; Tune's log shows the traceback and
        # trials.parquet the message.
        self._progress().console.log(f"[red]failed {self._describe(trial)}")

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


def print_top(trials, metric: str = "val_error", params=(), n: int = 10, title: str = "top trials") -> None:
    """A rich table of the n best trials by final `metric`, failed trials counted below it."""
    from rich.console import Console
    from rich.table import Table
    console = Console()
    if not console.is_terminal:  # a log file: don't squeeze the table into 80 columns
        console.width = 150
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
