"""Collation of an ablation: trial rows -> runs table (one row per planned cell) -> summary
over seeds -> the paper-layout table (rows × columns of mean ± std).

Every planned cell is a row of `runs`, whatever happened to its trial: `ok`, `failed`
(with the trial's error) or `not run` (pending, running, or missing from the experiment).
The summary's mean/std/count are over the `ok` seeds only, beside n_ok / n_failed /
n_not_run and a status (`ok`, `partial`, `failed`, `not run`); the printed table marks any
cell that is not fully `ok`, so a failure never hides as a smaller mean.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass

import pandas as pd

from ...trainer.display import EMPTY
from ...method.diagnostics import DIAGNOSTIC_TEXT, DIAGNOSTICS, TUNED
from ...trainer.evaluate import GROUPS, SELECTIONS, SUMMARY_ERRORS, selected_errors
from ..table_writers import latex, markdown
from .spec import (DATASET_LABELS, axis_label, cell_key, coerce, format_key, plan_cells, published_label, published_rows,
                   value_label)

# Error columns (%) taken from a trial's summary (risda.trainer.evaluate: the three epoch selections,
# SELECTIONS, and the best validation error); the first four are the paper's.
METRICS = SUMMARY_ERRORS
_WORDS = ("top-1", *(f"{g}-shot" for g in GROUPS))  # as each selection lists them: overall, then the groups
METRIC_LABELS = {
    **{m: f"{w} error (%)" for m, w in zip(SELECTIONS["last"], _WORDS)},
    **{m: f"{w} error at the best validation epoch (%)" for m, w in zip(SELECTIONS["best_val"], _WORDS)},
    "best_val_error": "best validation error (%)",
    **{m: f"{w} error at the best test epoch (%, model selection on test)" for m, w in zip(SELECTIONS["best_test"], _WORDS)},
    "best_test_error": "best test error over all epochs (%, model selection on test)",  # in place of the line above's
}
# Published rows (overall top-1 error) are shown beside these metrics only.
PUBLISHED_METRICS = tuple(names[0] for names in SELECTIONS.values())  # test_error, test_error_at_best_val, best_test_error
OTHER_RESULTS = ("last_epoch", "best_val_epoch", "best_test_epoch", "epochs_run", "wall_time_s", "train_size",
                 "val_size", "test_size", "started_at", "ended_at", "stage1_wall_time_s", *DIAGNOSTICS, *TUNED)
# Where a trial ran (strings), when its result carries them.
RUN_FACTS = ("device", "hostname", "torch", "stage1_key", "precision", "torch_threads", "compile", *DIAGNOSTIC_TEXT)
# Columns every runs table has, whether or not they are grid axes.
FIXED_CONFIG = ("arm", "variant", "imbalance", "seed", "subset_seed", "alpha", "beta", "head_count",
                "cb_gamma", "lr", "weight_decay", "batch_size", "dataset", "epochs", "n_max", "graph_source")
OK, FAILED, NOT_RUN, PARTIAL = "ok", "failed", "not run", "partial"


# --- runs -------------------------------------------------------------------------------
def trial_status(ray_status: str | None, result: dict) -> str:
    s = (ray_status or "").upper()
    if s == "ERROR":
        return FAILED
    if s == "TERMINATED":
        return OK if result.get("test_error") is not None and result.get("completed", True) else FAILED
    return NOT_RUN


def trials_from_run_dirs(root) -> tuple[list[dict], pd.DataFrame]:
    """(trials, epochs) from plain `risda.train` run folders root/*/: a folder with a
    summary.json is a finished trial (its summary is the result); one without is left out, so
    its cell shows as not run. For runs made without Ray (bench/gpu_study.sh)."""
    from pathlib import Path
    trials, epochs = [], []
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        summary_path = folder / "summary.json"
        if not summary_path.is_file():
            continue
        summary = json.loads(summary_path.read_text())
        trials.append(dict(config=summary["config"], status="TERMINATED", error=None, trial_id=folder.name,
                           path=str(folder), result={**summary, "completed": True}))
        from .experiment import with_derived
        trials[-1:] = with_derived(trials[-1:])
        if (folder / "epochs.parquet").is_file():
            epochs.append(pd.read_parquet(folder / "epochs.parquet").assign(trial_id=folder.name))
    return trials, (pd.concat(epochs, ignore_index=True) if epochs else pd.DataFrame())


def collate_runs(plan: dict, trials: list[dict], experiment: str = "", epochs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per planned cell. `trials`: dicts with `config` (the trial's Config dict),
    `status` (Ray's: TERMINATED, ERROR, PENDING, RUNNING...), `error` (str or None),
    `result` (the trial's last reported metrics) and optional `trial_id`, `path`. With
    `epochs` (one row per trial_id and evaluated epoch), the metrics and RUN_FACTS a
    result lacks are read from the trial's epochs (`fill_from_epochs`)."""
    axes = plan["axes"]
    cells = plan_cells(plan)
    by_key: dict[tuple, dict] = {}
    for t in trials:
        try:
            key = cell_key(t["config"], axes)
        except (KeyError, TypeError):
            continue  # not a trial of this plan (no config to read the cell from)
        by_key[key] = t  # a resumed experiment keeps one trial per cell; the last wins
    spec = plan["spec"]
    rows = []
    for cell in cells:
        cfg = cell.config
        t = by_key.get(cell_key(cfg, axes))
        result = dict((t or {}).get("result") or {})
        status = trial_status(t.get("status") if t else None, result)
        error = (t or {}).get("error")
        if status == FAILED and not error:
            error = ("the trial finished without reporting a test error" if result.get("test_error") is None else
                     f"the trial stopped after {result.get('epochs_run')} of {cfg['epochs']} epochs")
        if status == NOT_RUN:
            error = error or ("no trial for this cell in the experiment" if t is None else f"trial is {t.get('status', '?').lower()}")
        row = dict(spec=spec["name"], experiment=experiment, cell=format_key(cell.key))
        row.update({a: cell.key[a] for a in axes})
        row.update({f: cfg[f] for f in FIXED_CONFIG if f not in row})
        row.update(hp_source=cell.hp_source, status=status, error=error)
        for m in METRICS:
            row[m] = _num(result.get(m)) if status == OK else math.nan
        for r in OTHER_RESULTS:
            row[r] = _num(result.get(r))
        for r in RUN_FACTS:
            v = result.get(r)
            row[r] = json.dumps(v) if isinstance(v, (dict, list)) else v
        row.update(trial_id=(t or {}).get("trial_id"), trial_path=(t or {}).get("path"),
                   config=json.dumps(cfg, sort_keys=True))
        rows.append(row)
    df = pd.DataFrame(rows)
    for m in (*METRICS, *OTHER_RESULTS):
        df[m] = pd.to_numeric(df[m], errors="coerce").astype("float64")
    if epochs is not None and len(epochs):
        df = fill_from_epochs(df, epochs)
    return df


def _num(v):
    return math.nan if v is None else v


def selection_errors(epochs: pd.DataFrame) -> pd.DataFrame:
    """Per trial_id (the index), from its evaluated epochs: the test errors (overall, many,
    medium, few) of the last epoch, of the best-validation epoch and of the best-test epoch
    (the earliest on ties, as the trainer's summarize), the validation error and the
    RUN_FACTS of the last report. Named as the METRICS columns."""
    if "test_error" not in epochs or "trial_id" not in epochs:
        return pd.DataFrame()
    rows = {}
    evaluated = epochs[epochs.test_error.notna()].sort_values("epoch", kind="stable")
    for trial_id, e in evaluated.groupby("trial_id", sort=False):
        e = e.reset_index(drop=True)
        last, best_test = e.iloc[-1], e.loc[e.test_error.idxmin()]
        row = {**selected_errors(last, "last"), **selected_errors(best_test, "best_test")}
        if "val_error" in e and e.val_error.notna().any():
            best_val = e.loc[e.val_error.idxmin()]
            row.update(selected_errors(best_val, "best_val"))
            row["best_val_error"] = best_val.val_error
        row.update({f: last.get(f) for f in RUN_FACTS if f in e})
        if "hostname" not in e and "host" in e:
            row["hostname"] = last.get("host")
        rows[trial_id] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def fill_from_epochs(runs: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """`runs` with the METRICS of its ok cells and the RUN_FACTS that are missing (NaN / None)
    read from their trials' epochs (matched by trial_id); values already there are kept."""
    sel = selection_errors(epochs)
    runs = runs.copy()
    if not len(sel) or "trial_id" not in runs:
        return runs
    ok = (runs.status == OK) & runs.trial_id.isin(sel.index)
    for col in [c for c in (*METRICS, *RUN_FACTS) if c in sel]:
        if col not in runs:
            runs[col] = math.nan if col in METRICS else None
        fill = runs[col].isna() & ok if col in METRICS else runs[col].isna() & runs.trial_id.isin(sel.index)
        if fill.any():
            values = sel.loc[runs.trial_id[fill], col].to_numpy()
            if col in METRICS:
                runs[col] = runs[col].astype("float64")
                values = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype="float64")
            else:
                runs[col] = runs[col].astype(object)
            runs.loc[fill, col] = values
    return runs


# --- summary ----------------------------------------------------------------------------
def group_axes(plan: dict) -> list[str]:
    return [a for a in plan["axes"] if a != "seed"]


def summarize_runs(runs: pd.DataFrame, plan: dict) -> pd.DataFrame:
    """mean, std (sample, ddof=1) and count over the ok seeds of every cell group, in plan order."""
    axes = group_axes(plan)
    keys = [a for a in axes]
    rows = []
    grouped = runs.groupby(keys, sort=False, dropna=False) if keys else [((), runs)]
    for key, g in grouped:
        key = key if isinstance(key, tuple) else (key,)
        ok = g[g.status == OK]
        row = dict(spec=g.spec.iloc[0], dataset=g.dataset.iloc[0], **dict(zip(keys, key)),
                   n_runs=len(g), n_ok=len(ok), n_failed=int((g.status == FAILED).sum()),
                   n_not_run=int((g.status == NOT_RUN).sum()),
                   seeds=",".join(str(s) for s in g.seed), failed_seeds=",".join(str(s) for s in g.seed[g.status == FAILED]))
        row["status"] = (OK if row["n_ok"] == row["n_runs"] else FAILED if row["n_ok"] == 0 and row["n_failed"]
                         else NOT_RUN if row["n_ok"] == 0 else PARTIAL)
        for m in METRICS:
            vals = ok[m].dropna()
            row[f"{m}_mean"] = vals.mean() if len(vals) else math.nan
            row[f"{m}_std"] = vals.std(ddof=1) if len(vals) > 1 else math.nan
            row[f"{m}_count"] = len(vals)
        row["wall_time_s_mean"] = ok.wall_time_s.mean() if len(ok) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


# --- layout: the same grid for the table and the figure ---------------------------------
@dataclass
class Panel:
    """One table / one subplot: rows × cols of a metric, for one value of the other axes."""
    key: dict                 # the panel's values of the axes that are neither rows nor cols
    row_keys: list[tuple]     # values of the row axes, in grid order
    cols: list                # values of the column axis, in grid order
    cells: dict               # (row_key, col) -> the summary row (a dict), if planned

    @property
    def title(self) -> str:
        return format_key(self.key)


def panels(summary: pd.DataFrame, plan: dict) -> list[Panel]:
    spec = plan["spec"]
    grid = {a: [coerce(a, v) for v in vals] for a, vals in spec["grid"].items()}
    rows_axes, col_axis = spec["rows"], spec["cols"]
    panel_axes = [a for a in group_axes(plan) if a not in rows_axes and a != col_axis]
    records = summary.to_dict("records")
    out = []
    for pvals in itertools.product(*(grid[a] for a in panel_axes)):
        pkey = dict(zip(panel_axes, pvals))
        cells = {}
        for r in records:
            if all(_same(r[a], v) for a, v in pkey.items()):
                cells[(tuple(coerce(a, r[a]) for a in rows_axes), coerce(col_axis, r[col_axis]))] = r
        if cells:
            out.append(Panel(pkey, list(itertools.product(*(grid[a] for a in rows_axes))), grid[col_axis], cells))
    return out


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b))


def row_label(plan: dict, row_key: tuple, named: bool = False) -> str:
    """`RISDA / paper`; with named=True non-arm axes carry their name (`λ=200`), for legends."""
    return " / ".join(value_label(a, v) if a == "arm" or not named else f"{axis_label(a)}={value_label(a, v)}"
                      for a, v in zip(plan["spec"]["rows"], row_key))


def cell_text(r: dict | None, metric: str, digits: int = 2) -> tuple[str, str]:
    """(text, rich style) of one table cell."""
    if r is None:
        return "—", "dim"
    mean, std = r[f"{metric}_mean"], r[f"{metric}_std"]
    val = "" if math.isnan(mean) else f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")
    if r["status"] == OK:
        return (val or EMPTY), ""  # an empty group (no few-shot class): risda.trainer.display
    if r["status"] == FAILED:
        return f"FAILED ({r['n_failed']}/{r['n_runs']})", "bold red"
    if r["status"] == NOT_RUN:
        return f"not run ({r['n_not_run']}/{r['n_runs']})", "yellow"
    missing = [f"{r['n_failed']} failed"] * bool(r["n_failed"]) + [f"{r['n_not_run']} not run"] * bool(r["n_not_run"])
    return f"{val} [{r['n_ok']}/{r['n_runs']} seeds; {', '.join(missing)}]", "red" if r["n_failed"] else "yellow"


# --- the rich table ---------------------------------------------------------------------
def table_title(plan: dict, runs: pd.DataFrame, metric: str) -> str:
    spec = plan["spec"]
    cfg0 = plan["cells"][0]["config"]
    ds = DATASET_LABELS.get(cfg0["dataset"], cfg0["dataset"])
    seeds = sorted(set(runs.seed))
    n_max = "" if cfg0.get("n_max") is None else f", n_max {cfg0['n_max']}"
    over = f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}" if seeds else "no seeds"
    return f"{spec['title'] or spec['name']} — {ds}{n_max}, {cfg0['epochs']} epoch{'s' * (cfg0['epochs'] != 1)} — {METRIC_LABELS.get(metric, metric)}, {over}"


def rich_tables(plan: dict, runs: pd.DataFrame, summary: pd.DataFrame, metric: str) -> list[tuple[str, object, str]]:
    """(title, rich Table, caption) per panel, in the paper's layout (rows axes × column
    axis); title and caption are printed around the table (rich would wrap them to its width)."""
    from rich.table import Table
    spec = plan["spec"]
    cfg0 = plan["cells"][0]["config"]
    dataset = cfg0["dataset"]
    tables = []
    for panel in panels(summary, plan):
        title = table_title(plan, runs, metric) + (f" — {panel.title}" if panel.key else "")
        caption = []
        if spec.get("paper") and DATASET_LABELS.get(dataset) != spec["paper"]:
            caption.append(f"The paper's version of this study is on {spec['paper']}; this one is on {DATASET_LABELS.get(dataset, dataset)}.")
        t = Table()
        t.add_column(" / ".join(axis_label(a) for a in spec["rows"]), style="bold")
        for c in panel.cols:
            t.add_column(f"{axis_label(spec['cols'])}={value_label(spec['cols'], c)}", justify="right")
        best = {}
        for c in panel.cols:
            means = [(r[f"{metric}_mean"], rk) for (rk, cc), r in panel.cells.items()
                     if cc == c and r["status"] == OK and not math.isnan(r[f"{metric}_mean"])]
            if len(means) > 1:
                best[c] = min(means)[1]
        for rk in panel.row_keys:
            if not any((rk, c) in panel.cells for c in panel.cols):
                continue
            texts = []
            for c in panel.cols:
                text, style = cell_text(panel.cells.get((rk, c)), metric)
                if best.get(c) == rk:
                    style = (style + " bold").strip()
                texts.append(f"[{style}]{_escape(text)}[/]" if style else _escape(text))
            t.add_row(row_label(plan, rk), *texts)
        published = panel_published(plan, panel, metric)
        for label, vals in published:
            t.add_row(f"[dim]{_escape(label)}[/]", *[f"[dim]{v:.2f}[/]" if v is not None else "[dim]—[/]" for v in vals])
        caption.extend(published_notes(plan, metric) if published else [])
        tables.append((title, t, " ".join(caption)))
    return tables


def published_for(plan: dict, metric: str) -> list[dict]:
    """The spec's published rows for the plan's dataset (risda.ablation.published_rows),
    for an overall top-1 metric against λ columns; a row matched to an arm only if that arm
    runs in the plan."""
    spec = plan["spec"]
    if metric not in PUBLISHED_METRICS or spec["cols"] != "imbalance" or not plan["cells"]:
        return []
    arms = {c["config"]["arm"] for c in plan["cells"]}
    return published_rows(spec, plan["cells"][0]["config"]["dataset"], arms)


def panel_published(plan: dict, panel: "Panel", metric: str) -> list[tuple[str, list]]:
    """(label, value or None per column) of each published row with a value in this panel."""
    out = []
    for row in published_for(plan, metric):
        vals = [row["errors"].get(float(c)) for c in panel.cols]
        if any(v is not None for v in vals):
            out.append((published_label(row), vals))
    return out


def published_notes(plan: dict, metric: str) -> list[str]:
    notes = ["Published rows: overall top-1 error as printed in the named source (not run here); "
             "the RISDA authors' released code reports the best test error over all epochs (model selection on test)."]
    notes += [f"{row['method']} ({row['source']}): {row['note']}." for row in published_for(plan, metric) if row.get("note")]
    return notes


def _escape(text: str) -> str:
    from rich.markup import escape
    return escape(text)


def failure_lines(runs: pd.DataFrame, limit: int = 20, width: int = 150) -> list[str]:
    """`status: cell: the error's last line, shortened` for every cell that is not ok (the
    full message is in the error column of runs.parquet)."""
    bad = runs[runs.status != OK]
    lines = []
    for _, r in bad.head(limit).iterrows():
        err = [l.strip() for l in (r.error or "").strip().splitlines() if l.strip()]
        last = err[-1] if err else ""  # a traceback's last line is the exception
        head, sep, rest = last.partition(": ")
        if sep and "." in head and " " not in head:  # risda.trainer.loop.DivergedError -> DivergedError
            last = f"{head.rsplit('.', 1)[-1]}: {rest}"
        prefix = f"{r.status}: {r.cell}: "
        room = max(60, width - len(prefix))
        lines.append(prefix + (last if len(last) <= room else last[:room - 1] + "…"))
    if len(bad) > limit:
        lines.append(f"... and {len(bad) - limit} more")
    if len(bad):
        lines.append("(full messages: the error column of runs.parquet)")
    return lines


# --- tables to paste into a paper ---------------------------------------------------------
def panel_frames(plan: dict, runs: pd.DataFrame, summary: pd.DataFrame, metric: str) -> list[tuple[str, pd.DataFrame]]:
    """(title, table) per panel, the cells as plain text (as in the rich table), published rows last."""
    spec = plan["spec"]
    out = []
    for panel in panels(summary, plan):
        header = [" / ".join(axis_label(a) for a in spec["rows"])] + \
                 [f"{axis_label(spec['cols'])}={value_label(spec['cols'], c)}" for c in panel.cols]
        rows = [[row_label(plan, rk)] + [cell_text(panel.cells.get((rk, c)), metric)[0] for c in panel.cols]
                for rk in panel.row_keys if any((rk, c) in panel.cells for c in panel.cols)]
        rows += [[label] + ["—" if v is None else f"{v:.2f}" for v in vals]
                 for label, vals in panel_published(plan, panel, metric)]
        title = table_title(plan, runs, metric) + (f" — {panel.title}" if panel.key else "")
        out.append((title, pd.DataFrame(rows, columns=header)))
    return out


def markdown_table(plan: dict, runs: pd.DataFrame, summary: pd.DataFrame, metric: str) -> str:
    parts = []
    for title, frame in panel_frames(plan, runs, summary, metric):
        parts += [f"**{title}**\n", markdown(frame, "l" + "r" * (frame.shape[1] - 1)), ""]
        if frame.iloc[:, 0].str.startswith("published: ").any():
            parts.extend(f"{note}\n" for note in published_notes(plan, metric))
    parts.extend(f"- {line}" for line in failure_lines(runs))
    return "\n".join(parts) + "\n"


def latex_table(plan: dict, runs: pd.DataFrame, summary: pd.DataFrame, metric: str) -> str:
    parts = ["% needs \\usepackage{booktabs}"]
    parts += [x for title, frame in panel_frames(plan, runs, summary, metric) for x in (latex(frame, title), "")]
    return "\n".join(parts)
