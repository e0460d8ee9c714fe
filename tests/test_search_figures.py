"""A search's figures (risda.runner.search_figures) from a synthetic trials table, read back from
their matplotlib objects: no training, no Ray."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection

from risda.runner.search import optuna_distribution
from risda.runner.search_figures import MIN_CONTOUR, alpha_beta_figure, optuna_figures, optuna_study, write_search_figures

SPACE = {"alpha": "0.25:1.5", "beta": "0.25:1.5", "head_count": "1|2|3|4"}
DISTRIBUTIONS = {k: optuna_distribution(k, v) for k, v in SPACE.items()}


def trials_table(n_done: int, seed: int = 0) -> pd.DataFrame:
    """n_done trials that ran all their epochs, one stopped early by ASHA, one failed; started in a shuffled order."""
    rng = np.random.default_rng(seed)
    n = n_done + 2
    return pd.DataFrame(dict(
        trial_id=[f"t{i}" for i in range(n)], alpha=rng.uniform(0.25, 1.5, n), beta=rng.uniform(0.25, 1.5, n),
        head_count=rng.integers(1, 5, n), status=["TERMINATED"] * (n - 1) + ["ERROR"],
        completed=[True] * n_done + [False, False], final_val_error=[*rng.uniform(40, 60, n_done), 70.0, None],
        started_at=rng.permutation(n).astype(float)))


def scatter_of(ax, label):
    return next(c for c in ax.collections if isinstance(c, PathCollection) and c.get_label().startswith(label))


def test_alpha_beta_colours_each_finished_trial_by_its_error_and_marks_the_rest():
    trials = trials_table(MIN_CONTOUR)
    ax = alpha_beta_figure(trials).axes[0]
    done = trials[trials.completed].sort_values("started_at")
    finished = scatter_of(ax, "ran all its epochs")
    assert np.allclose(finished.get_offsets(), done[["alpha", "beta"]].to_numpy())
    assert np.allclose(finished.get_array(), done.final_val_error)  # the colour is the validation error
    assert len(scatter_of(ax, "stopped early by ASHA").get_offsets()) == 1 and len(scatter_of(ax, "failed").get_offsets()) == 1
    best = done.loc[done.final_val_error.idxmin()]
    assert np.allclose(scatter_of(ax, "best").get_offsets(), [[best.alpha, best.beta]])
    assert any(type(c).__name__ in ("TriContourSet", "QuadContourSet") for c in ax.collections)  # enough trials: a contour
    few = alpha_beta_figure(trials_table(MIN_CONTOUR - 1)).axes[0]
    assert not any(type(c).__name__ in ("TriContourSet", "QuadContourSet") for c in few.collections)
    assert alpha_beta_figure(trials.drop(columns=["alpha"])) is None  # α not searched: no α × β figure


def test_optuna_sees_the_finished_trials_in_the_order_they_started_and_draws_the_best_so_far():
    trials = trials_table(6, seed=1)
    study = optuna_study(trials, DISTRIBUTIONS)
    done = trials[trials.completed].sort_values("started_at")
    assert [t.value for t in study.trials] == pytest.approx(list(done.final_val_error))
    assert [t.params["head_count"] for t in study.trials] == list(done.head_count)
    figures = optuna_figures(study)
    history = figures["history.png"].axes[0]
    best_line = next(line for line in history.lines if "Best" in line.get_label())
    assert list(best_line.get_ydata()) == pytest.approx(list(done.final_val_error.cummin()))
    titles = [ax.get_xlabel() for ax in figures["slice.png"].axes]
    assert {"alpha", "beta", "head_count"} <= set(titles)  # the head count against the error, beside α and β


def test_the_figures_are_written_beside_trials_parquet(tmp_path):
    written = write_search_figures(trials_table(5), DISTRIBUTIONS, tmp_path)
    assert [p.name for p in written] == ["alpha_beta.png", "history.png", "slice.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    only_heads = trials_table(5).drop(columns=["alpha", "beta"])
    assert [p.name for p in write_search_figures(only_heads, {"head_count": DISTRIBUTIONS["head_count"]}, tmp_path)] == \
           ["history.png", "slice.png"]
