"""A finished (or interrupted) Ray Tune experiment as tables: one row per trial, failed trials
included with their error, and one row per trial per reported epoch; the best trial; how the
requested trials ended (`Outcome`, the exit code).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
from ray import tune

from ..method.diagnostics import DIAGNOSTIC_TEXT, DIAGNOSTICS
from ..trainer.evaluate import error_names
from ..trainer.failures import writing
from .trainables import STAGE1_CACHE_KEY

# Tune's own per-report bookkeeping, dropped from our epoch tables.
TUNE_COLUMNS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "date", "time_this_iter_s",
                "time_total_s", "pid", "time_since_restore", "iterations_since_restore", "should_checkpoint"}
# Constant per-trial facts that ride along on every report (so any one report carries them;
# risda.runner.trainables.trial_facts).
TRIAL_FACTS = ("device", "ray_gpu_ids", "node_id", "hostname", "seed", "subset_seed")


def error_message(error) -> str | None:
    """The last line of a trial's exception (e.g. 'DivergedError: loss became nan ...'):
    Ray wraps it in a RayTaskError whose str() is the whole remote traceback."""
    if error is None:
        return None
    lines = [l.strip() for l in str(error).strip().splitlines() if l.strip()]
    return lines[-1] if lines else repr(error)


def saved_trials(grid) -> dict:
    """trial_id -> Tune's Trial as the saved experiment state has it. What the driver's own
    ResultGrid says can differ: after a Ctrl-C Tune marks its unfinished trials TERMINATED in
    memory (not in the saved state), and a Result of a TERMINATED trial carries no error."""
    analysis = tune.ExperimentAnalysis(grid.experiment_path, storage_filesystem=grid.filesystem)
    return {t.trial_id: t for t in analysis.trials}


def trial_statuses(grid) -> dict[str, str]:
    """trial_id -> Ray's status (TERMINATED, ERROR, PAUSED, PENDING, ...) from the saved
    experiment state (a Result alone does not say whether an unfinished trial was stopped
    by the scheduler or interrupted)."""
    return {trial_id: t.status for trial_id, t in saved_trials(grid).items()}


def saved_error(trial):
    """The error Tune saved for a trial that did not finish (None for a TERMINATED one, and
    after Tune resumed the trial), as the exception or else its text."""
    if trial is None or trial.status == "TERMINATED":
        return None
    try:
        return trial.get_pickled_error() or trial.get_error()
    except Exception:  # an exception class that does not unpickle here
        return trial.get_error()


def epoch_rows(result, params=()) -> list[dict]:
    """One dict per reported epoch of one trial (the last report wins if a restored trial
    reported an epoch twice), with trial_id and the searched `params` in front."""
    df = result.metrics_dataframe
    if df is None or df.empty or "epoch" not in df:
        return []
    config = result.config or {}
    df = df.drop(columns=[c for c in df.columns if c in TUNE_COLUMNS or c.startswith(("config/", "summary_"))])
    df = df.drop_duplicates("epoch", keep="last").sort_values("epoch")
    head = {"trial_id": trial_id_of(result), **{p: config.get(p) for p in params}}
    return [{**head, **row} for row in df.to_dict("records")]


def trial_id_of(result) -> str:
    return (result.metrics or {}).get("trial_id") or Path(result.path).name


def trial_row(result, status: str | None, metric: str = "val_error", params=(), error=None) -> dict:
    """One trial as a flat dict: params, status, error, the epoch with the best `metric` and
    the final errors (test, many/medium/few, validation), epochs run, wall time, where it ran.
    `error`: the one Tune saved for the trial (`saved_error`), for a Result that lacks it.

    A trial with an error is ERROR whatever status Tune saved: a trial whose worker was killed
    (SIGKILL, a lost node) is saved PENDING beside Ray's "actor is dead" error when Tune was
    retrying it (--max-failures) as the driver stopped, and would otherwise pass for
    unfinished. Tune clears the error when it resumes the trial."""
    error = result.error if result.error is not None else error
    if error is not None:
        status = "ERROR"
    config = {k: v for k, v in (result.config or {}).items() if k != STAGE1_CACHE_KEY}
    epochs = epoch_rows(result)
    last = epochs[-1] if epochs else {}
    scored = [r for r in epochs if pd.notna(r.get(metric))]  # an unevaluated epoch is NaN in Tune's frame, not None
    best = min(scored, key=lambda r: r[metric]) if scored else {}
    metrics = result.metrics or {}
    row = {"trial_id": trial_id_of(result), **{p: config.get(p) for p in params},
           "status": status, "error": error_message(error),
           "completed": bool(last) and last.get("epochs_done") == config.get("epochs"),
           "epochs_run": last.get("epochs_done", 0),
           f"final_{metric}": last.get(metric), f"best_{metric}": best.get(metric),
           f"best_{metric}_epoch": best.get("epoch")}
    for k in (*error_names("test_"), *error_names("val_")):
        row.setdefault(f"final_{k}", last.get(k))
    ended, wall = metrics.get("timestamp"), metrics.get("time_total_s")
    row.update(train_time_s=last.get("wall_time_s"), wall_time_s=wall,
               started_at=None if ended is None or wall is None else ended - wall, ended_at=ended,
               node_ip=metrics.get("node_ip"), **{k: last.get(k) for k in TRIAL_FACTS},
               stage1_key=last.get("stage1_key"), stage1_wall_time_s=metrics.get("summary_stage1_wall_time_s"),
               **{k: metrics.get(f"summary_{k}") for k in (*DIAGNOSTICS, *DIAGNOSTIC_TEXT)},
               path=result.path, config=json.dumps(config, sort_keys=True),
               summary=json.dumps({k[len("summary_"):]: v for k, v in metrics.items() if k.startswith("summary_")}))
    return row


def collate(grid, metric: str = "val_error", params=()):
    """(trials, epochs) DataFrames from a ResultGrid. trials: one row per trial, including
    trials that failed before their first report (get_dataframe() drops those), with the
    error message (and status ERROR: `trial_row`); epochs: one row per trial per reported epoch."""
    saved = saved_trials(grid)
    rows = []
    for r in grid:
        trial = saved.get(trial_id_of(r))
        rows.append(trial_row(r, trial.status if trial else None, metric, params, error=saved_error(trial)))
    trials = pd.DataFrame(rows)
    trials = trials.sort_values("started_at", kind="stable", ignore_index=True)  # in the order they ran
    epochs = pd.DataFrame([row for r in grid for row in epoch_rows(r, params)])
    for df in (trials, epochs):  # an empty shot group is None: make those columns float, not object
        for c in [c for c in df.columns if c.endswith("_error")]:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return trials, epochs


# What a failed write of a result table leaves: the experiment itself, from which the tables are made.
RESULTS_INTACT = ("the experiment in --storage (every finished trial) is intact: free space and rerun the same command, "
                  "which collates it again without training")


def write_parquet(df, path: Path) -> Path:
    """Atomic write (temp file + rename) so a reader never sees half a table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.parquet")
    with writing(path, RESULTS_INTACT, tmp):  # a full disk: one line, no .tmp left (risda.trainer.failures)
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    return path


class Outcome:
    """How a set of requested trials ended: done (TERMINATED: all epochs, or stopped by the
    scheduler), failed (ERROR, diverged included; `diverged` of them diverged) and unfinished
    (never started, pending, running or paused when the driver stopped)."""

    def __init__(self, done: int, failed: int, unfinished: int, diverged: int = 0):
        self.done, self.failed, self.unfinished, self.diverged = done, failed, unfinished, diverged

    @classmethod
    def of(cls, trials, requested: int) -> "Outcome":
        status = trials["status"] if len(trials) else []
        done = int((status == "TERMINATED").sum()) if len(trials) else 0
        failed = int((status == "ERROR").sum()) if len(trials) else 0
        diverged = count_diverged(trials[status == "ERROR"]["error"]) if failed and "error" in trials else 0
        return cls(done, failed, max(0, requested - done - failed), diverged)

    def report(self, console, retry_hint: bool = False) -> int:
        """Print what did not finish; the exit code: 0 all done, 130 interrupted, 1 failures."""
        total = self.done + self.failed + self.unfinished
        if self.failed:
            console.print(f"[red]{self.failed} of {total} trial(s) failed{self.hint() if retry_hint else ''}[/red]")
        if self.unfinished:
            console.print(f"[yellow]{self.unfinished} of {total} trial(s) unfinished: the state is saved, rerun the same "
                          f"command to continue[/yellow]")
        if self.failed:
            return 1
        return 130 if self.unfinished else 0

    def hint(self) -> str:
        """--retry-errored for the failures a retry can fix; a diverged trial diverges again (training is deterministic)."""
        if self.diverged == self.failed:
            return (f" ({'all ' if self.failed > 1 else ''}diverged: a retry would diverge again; lower --lr, --alpha or "
                    f"--beta, with a new --name or --restart)")
        retry = " (rerun with --retry-errored to continue them from their last checkpoint)"
        if self.diverged:
            retry = (f" ({self.diverged} diverged, which a retry would repeat; rerun with --retry-errored to continue the "
                     f"other {self.failed - self.diverged} from their last checkpoint)")
        return retry


def count_diverged(errors) -> int:
    """How many of these trial errors are divergences (risda.trainer.DivergedError)."""
    return int(sum(isinstance(e, str) and ("DivergedError" in e or e.startswith("diverged:")) for e in errors))


def best_trial(trials, metric: str = "val_error"):
    """The row with the lowest final `metric` among trials that ran all epochs (a trial ASHA
    stopped early is not comparable, a failed one is not a result); None if there is none.
    Ties go to the lower best-epoch `metric`, then to the earlier trial (the enqueued paper
    point, if any), so the answer does not depend on the order Ray lists trials in."""
    if not len(trials):
        return None
    pool = trials[trials[f"final_{metric}"].notna() & trials["completed"] & (trials["status"] == "TERMINATED")]
    if not len(pool):
        return None
    return pool.sort_values([f"final_{metric}", f"best_{metric}", "started_at"], kind="stable").iloc[0]
