"""The study figure and the paired-difference figure read back from their matplotlib objects: every
seed is a point at its own value, the means and intervals are the summary's, published values sit
where they belong, and the legend stays outside the data. No training, no Ray."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from scipy import stats

from risda.runner.ablation import cli as run
from risda.runner.ablation.figures import study_figure
from risda.runner.ablation.spec import apply_overrides, expand, load_spec, make_plan, published_label
from risda.runner.ablation.tables import METRICS, OK, collate_runs, published_for, summarize_runs
from risda.runner.paired_figure import differences, paired_figure
from risda.runner.evidence import finished


def plan_for(name, grid, flags=None):
    spec, flags, notes = apply_overrides(load_spec(name), grid, flags or {})
    cells, more = expand(spec, flags)
    return make_plan(spec, cells, notes + more)


def synthetic(plan, fail=()):
    rng = random.Random(1)
    trials = []
    for i, c in enumerate(plan["cells"]):
        if i in fail:
            trials.append(dict(config=c["config"], status="ERROR", error="ValueError: boom", result={}))
            continue
        result = {m: 30 + 40 * rng.random() for m in METRICS}
        result.update(epochs_run=c["config"]["epochs"], wall_time_s=1.0, completed=True)
        trials.append(dict(config=c["config"], status="TERMINATED", error=None, result=result))
    return trials


def points(ax) -> np.ndarray:
    """(x, y) of every scatter point of an axes."""
    offsets = [c.get_offsets() for c in ax.collections if isinstance(c, PathCollection) and len(c.get_offsets())]
    return np.concatenate(offsets) if offsets else np.empty((0, 2))


def overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_one_lambda_puts_the_arms_along_an_axis_with_every_seed_the_mean_and_published_ticks():
    plan = plan_for("cifar10lt_reduced", {"arm": ["risda", "ce", "ce_drw"], "seed": ["0", "1", "2"]})
    failed = next(i for i, c in enumerate(plan["cells"]) if c["key"]["arm"] == "ce_drw" and c["key"]["seed"] == 2)
    runs = collate_runs(plan, synthetic(plan, fail={failed}))
    summary = summarize_runs(runs, plan)
    fig = study_figure(plan, runs, summary, "test_error")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["all", "many", "medium", "few"]
    published = published_for(plan, "test_error")
    unmatched = [p for p in published if p["arm"] is None]
    assert unmatched and any(p["arm"] == "ce" for p in published)  # both kinds are drawn below
    labels = [t.get_text() for t in panels[0].get_yticklabels()]
    assert labels == ["RISDA", "CE", "CE-DRW\n(2/3 seeds; 1 failed)", "published: other methods"]
    for g, (ax, metric) in enumerate(zip(panels, ("test_error", "many_error", "medium_error", "few_error"))):
        xy = points(ax)
        for row, arm in enumerate(("risda", "ce", "ce_drw")):
            ours = runs[(runs.arm == arm) & (runs.status == OK)][metric]
            assert sorted(xy[np.abs(xy[:, 1] - row) < 0.3, 0]) == pytest.approx(sorted(ours))  # one point per seed
            mean = next(l for l in ax.lines if l.get_marker() == "D" and l.get_ydata()[0] == row).get_xdata()[0]
            assert mean == pytest.approx(ours.mean())
        ticks = [l for l in ax.lines if l.get_label().startswith("published")]
        if g:
            assert not ticks  # published numbers are overall errors: the `all` panel only
            continue
        assert len({l.get_color() for l in ticks}) == len(ticks) == len(published)
        where = {l.get_label(): (l.get_xdata()[0], l.get_ydata()[0]) for l in ticks}
        for p in published:
            x, y = next(v for k, v in where.items() if k.replace("\n", " ") == published_label(p))
            assert x == p["errors"][100.0] and y == ({"ce": 1}.get(p["arm"], 3))
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert not any(overlaps(legend, ax.get_window_extent()) for ax in panels)
    assert all(published_label(p) in " ".join(t.get_text().replace("\n", " ") for t in fig.legends[0].get_texts())
               for p in published)


def test_several_lambdas_draw_a_line_per_arm_over_lambda_on_a_log_axis():
    plan = plan_for("table5", {"arm": ["risda", "ce"], "imbalance": ["100", "10"], "seed": ["0", "1"]}, {"dataset": "cifar10lt"})
    runs = collate_runs(plan, synthetic(plan))
    summary = summarize_runs(runs, plan)
    fig = study_figure(plan, runs, summary, "best_test_error")
    ax = fig.axes[0]
    assert ax.get_title() == "all" and ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["100", "10"]
    lines = {c.get_label(): c.lines[0] for c in ax.containers}
    for arm, label in (("risda", "RISDA"), ("ce", "CE")):
        want = [summary[(summary.arm == arm) & (summary.imbalance == lam)].best_test_error_mean.item() for lam in (100.0, 10.0)]
        assert list(lines[label].get_ydata()) == pytest.approx(want)
        assert sorted(points(ax)[:, 1]) == pytest.approx(sorted(runs.best_test_error))  # every seed of every arm
    ticks = [l for l in ax.lines if l.get_label().startswith("published")]
    ce = next(p for p in published_for(plan, "best_test_error") if p["arm"] == "ce")
    tick = next(l for l in ticks if l.get_label().replace("\n", " ") == published_label(ce))
    assert list(tick.get_xdata()) == [100.0, 10.0] and list(tick.get_ydata()) == [ce["errors"][100.0], ce["errors"][10.0]]
    assert [a.get_title() for a in fig.axes] == ["all", "many", "medium", "few"]
    assert fig.axes[3].get_ylabel() == "few-shot error at the best test epoch (%, model selection on test)"


def test_the_alpha_beta_study_draws_one_heat_map_per_group():
    plan = plan_for("fig4_alpha_beta", {"alpha": ["0.5", "1.0"], "beta": ["0.5", "1.0"], "imbalance": ["100"], "seed": ["0"]})
    runs = collate_runs(plan, synthetic(plan))
    summary = summarize_runs(runs, plan)
    fig = study_figure(plan, runs, summary, "test_error")
    maps = [ax for ax in fig.axes if ax.images and ax.get_title()]
    assert [ax.get_title() for ax in maps] == [f"{g} — λ=100" for g in ("all", "many", "medium", "few")]
    few = maps[3].images[0].get_array()
    want = summary.set_index(["alpha", "beta"]).few_error_mean
    assert few[1, 0] == pytest.approx(want[(1.0, 0.5)]) and few[0, 1] == pytest.approx(want[(0.5, 1.0)])


def paired_runs():
    rng = np.random.default_rng(0)
    base = rng.uniform(40, 50, size=3)
    errors = {("risda", "paper", None): base, ("no_reasoning", "paper", None): base + [1.0, 0.5, 2.0],
              ("risda", "reference", None): base + [0.3, -0.2, 0.9], ("ce", "paper", None): base[:1] + 3.0}
    rows = []
    for (arm, variant, source), e in errors.items():
        for seed, v in enumerate(e):
            rows.append(dict(arm=arm, variant=variant, graph_source=source, seed=seed, status="ok",
                             config=json.dumps({"precision": "bf16"}), test_error=v, test_error_at_best_val=v + 1,
                             best_test_error=v - 1, few_error=2 * v))
    return pd.DataFrame(rows), errors


def test_the_paired_difference_figure_has_each_seed_the_mean_its_95_interval_and_zero():
    runs, errors = paired_runs()
    fig = paired_figure(runs)
    ax = fig.axes[0]
    assert [a.get_title() for a in fig.axes] == ["(a) last", "(b) best-val", "(c) best-test", "few (last)"]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["RISDA − w/o r (no reasoning) (n=3)", "RISDA (reference) − RISDA (n=3)", "RISDA − CE (n=1)"]
    d = errors[("risda", "paper", None)] - errors[("no_reasoning", "paper", None)]
    xy = points(ax)
    assert sorted(xy[xy[:, 1] < 0, 0]) == pytest.approx(sorted(d))  # row 0's seeds sit just above it
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    bars = next(c for c in ax.containers if c.lines[0].get_ydata()[0] == pytest.approx(0.05))
    assert bars.lines[0].get_xdata()[0] == pytest.approx(d.mean())
    assert sorted(x for cap in bars.lines[1] for x in cap.get_xdata()) == pytest.approx([d.mean() - half, d.mean() + half])
    assert any(list(l.get_xdata()) == [0, 0] for l in ax.lines)  # the zero line
    one = next(c for c in ax.containers if c.lines[0].get_ydata()[0] == pytest.approx(2.05))
    assert not one.lines[1]  # one seed: no interval
    assert paired_figure(runs[(runs.arm == "risda") & (runs.variant == "paper")]) is None  # nothing to compare


def test_differences_are_a_minus_b_per_seed():
    runs, errors = paired_runs()
    d = differences(finished(runs))
    ref = d[(d.comparison == "RISDA (reference) − RISDA") & (d.error == "few (last)")].set_index("seed").difference
    want = 2 * (errors[("risda", "reference", None)] - errors[("risda", "paper", None)])
    assert list(ref) == pytest.approx(list(want))


def test_collate_only_without_the_ray_experiment_redraws_from_the_results_folder(tmp_path, capsys):
    plan = plan_for("cifar10lt_reduced", {"arm": ["risda", "no_reasoning"], "seed": ["0", "1"]})
    runs = collate_runs(plan, synthetic(plan))
    folder = tmp_path / "results" / "bundled"
    folder.mkdir(parents=True)
    (folder / "plan.json").write_text(json.dumps(plan))
    runs.to_parquet(folder / "runs.parquet", index=False)
    before = (folder / "runs.parquet").read_bytes()
    argv = ["--collate-only", "--name", "bundled", "--results", str(tmp_path / "results"), "--storage", str(tmp_path / "none")]
    assert run.main(argv) == 0
    assert "redrawn from" in capsys.readouterr().out
    assert (folder / "runs.parquet").read_bytes() == before and not (folder / "summary.parquet").exists()
    for name in ("figure.png", "paired.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (folder / "table.md").read_text()
    mean = runs[runs.arm == "risda"].test_error.mean()
    assert f"{mean:.2f} ±" in md
