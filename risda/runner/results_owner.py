"""A results folder belongs to one experiment, and nothing replaces its results unasked.

`<results>/<name>/` is written by the experiment it names in its table's `experiment` column
(trials.parquet of a search, runs.parquet of an ablation: the Ray experiment's path, the merged
experiments, or the run folders collated). A rerun of the same command resumes and re-collates
into it. Refused, before anything runs (`check_results_owner`):

- results of another experiment (another --storage, --from-runs folder or --merge list): pass
  another --name or --results;
- results of this experiment when there is nothing left to resume (its Ray experiment is gone
  from --storage): they are all that is left; --restart replaces them on purpose.
"""
from __future__ import annotations

from pathlib import Path

from ..trainer.errors import ConfigError

TABLES = ("trials.parquet", "runs.parquet")
RESULTS = (*TABLES, "best.json", "summary.parquet")


def holds_results(folder: Path) -> bool:
    return any((folder / name).is_file() for name in RESULTS)


def recorded_source(folder: Path) -> str | None:
    """The experiment a results folder was collated from (its table's `experiment` column), or None."""
    import pandas as pd
    for name in TABLES:
        if (folder / name).is_file():
            try:
                column = pd.read_parquet(folder / name, columns=["experiment"])["experiment"].dropna()
            except Exception:  # an older table without the column, or an unreadable one: unknown
                return None
            return str(column.iloc[0]) if len(column) else None
    return None


def check_results_owner(folder: Path, source: str, new: bool, restart: bool = False) -> None:
    """Refuse (ConfigError) to write `source`'s results into `folder` when that would replace
    results that are not a re-collation of the same experiment. `new`: a new experiment starts
    (nothing to resume); `restart`: --restart was given (replace this experiment's results)."""
    if not holds_results(folder):
        return
    recorded = recorded_source(folder)
    if recorded is not None and recorded != source:
        raise ConfigError(f"--results {folder} holds the results of another experiment ({recorded}), not of {source}: "
                          f"they are kept; pass another --name or --results")
    if new and not restart:
        raise ConfigError(f"--results {folder} holds results of an experiment named {folder.name} that cannot be resumed "
                          f"(nothing to resume at {source}): they are kept; pass --restart to replace them on purpose, "
                          f"or another --name")
