"""A search's figures, beside trials.parquet (risda.runner.search writes them after every search).

- `alpha_beta.png`: the trials in α × β (the paper's Fig. 4, from our own trials), coloured by the
  final validation error (the search metric), with its contour where enough trials finished; the
  best trial starred, trials stopped early by ASHA and failed trials marked apart.
- `history.png`: Optuna's optimization history: each finished trial's validation error in the
  order the trials started, and the best so far.
- `slice.png`: Optuna's slice plot: each searched parameter (the head count among them) against
  the validation error.

Optuna's plots are drawn from an in-memory study of the trials that ran all their epochs, at their
final validation error (the value best.json is chosen by); `--optuna-storage` keeps the search's
own study for optuna-dashboard.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd

METRIC = "final_val_error"
LABEL = "final validation error (%)"
MIN_CONTOUR = 8  # finished trials at distinct (α, β) before a contour is drawn


def finished(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials that ran all their epochs, in the order they started."""
    if not len(trials):
        return trials
    done = trials[(trials.status == "TERMINATED") & trials.completed.astype(bool) & trials[METRIC].notna()]
    return done.sort_values("started_at", kind="stable")


def optuna_study(trials: pd.DataFrame, distributions: dict):
    """An in-memory Optuna study of the finished trials: their searched parameters and final value."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    for row in finished(trials).to_dict("records"):
        params = {k: _plain(row[k]) for k in distributions}
        try:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=float(row[METRIC])))
        except ValueError:  # a value outside the space (a resumed search whose space was widened): left out
            continue
    return study


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def alpha_beta_figure(trials: pd.DataFrame):
    """The trials in α × β coloured by validation error; None when α and β were not both searched."""
    if not {"alpha", "beta"} <= set(trials.columns) or trials[["alpha", "beta"]].isna().all().any():
        return None
    import matplotlib.pyplot as plt
    done = finished(trials)
    fig, ax = plt.subplots(figsize=(6.4, 5.0), layout="constrained")
    if done[["alpha", "beta"]].drop_duplicates().shape[0] >= MIN_CONTOUR:
        contour = ax.tricontourf(done.alpha, done.beta, done[METRIC], levels=8, cmap="viridis_r", alpha=0.35)
        ax.tricontour(done.alpha, done.beta, done[METRIC], levels=contour.levels, colors="grey", linewidths=0.5)
    points = ax.scatter(done.alpha, done.beta, c=done[METRIC], cmap="viridis_r", s=60, edgecolors="black", zorder=3,
                        label="ran all its epochs")
    fig.colorbar(points, ax=ax, label=LABEL)
    stopped = trials[(trials.status == "TERMINATED") & ~trials.completed.astype(bool)]
    failed = trials[trials.status == "ERROR"]
    ax.scatter(stopped.alpha, stopped.beta, marker="o", facecolors="none", edgecolors="grey", s=40, zorder=2,
               label=f"stopped early by ASHA ({len(stopped)})")
    ax.scatter(failed.alpha, failed.beta, marker="x", color="red", s=50, zorder=2, label=f"failed ({len(failed)})")
    if len(done):
        best = done.loc[done[METRIC].idxmin()]
        ax.scatter([best.alpha], [best.beta], marker="*", s=320, color="gold", edgecolors="black", zorder=4,
                   label=f"best: {best[METRIC]:.2f} (α {best.alpha:.3g}, β {best.beta:.3g})")
    for axis, set_lim in (("alpha", ax.set_xlim), ("beta", ax.set_ylim)):  # every trial inside, the star too
        lo, hi = trials[axis].min(), trials[axis].max()
        set_lim(lo - 0.06 * (hi - lo or 1), hi + 0.06 * (hi - lo or 1))
    ax.set_xlabel("α (the reasoned mean's weight)")
    ax.set_ylabel("β (the covariance's weight)")
    ax.set_title(f"{len(done)} finished trials in α × β" + (", every head count" if "head_count" in trials else ""), fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2, fontsize=7, frameon=False)
    return fig


def optuna_figures(study) -> dict:
    """Optuna's own matplotlib plots of the study: {file name: Figure}."""
    if len(study.trials) < 2:
        return {}
    import matplotlib
    from optuna.visualization import matplotlib as vis
    with warnings.catch_warnings(), matplotlib.rc_context():  # Optuna sets the ggplot style: for its own plots only
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        history = vis.plot_optimization_history(study, target_name=LABEL)
        slices = vis.plot_slice(study, target_name=LABEL)
    first = slices.flat[0] if hasattr(slices, "flat") else slices
    return {"history.png": history.figure, "slice.png": first.figure}


def write_search_figures(trials: pd.DataFrame, distributions: dict, out: Path) -> list[Path]:
    """The search's figures in `out`; the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figures = optuna_figures(optuna_study(trials, distributions))
    if (fig := alpha_beta_figure(trials)) is not None:
        figures = {"alpha_beta.png": fig, **figures}
    written = []
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(out / name)
    return written
