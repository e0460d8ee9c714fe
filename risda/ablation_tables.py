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

from .ablation import (DATASET_LABELS, Cell, axis_label, cell_key, coerce, format_key, plan_cells,
                       value_label)

# Error columns (%) taken from a trial's summary; the first four are the paper's.
METRICS = ("test_error", "many_error", "medium_error", "few_error", "test_error_at_best_val",
           "best_val_error", "best_test_error")
METRIC_LABELS = {"test_error": "top-1 error (%)", "many_error": "many-shot error (%)",
                 "medium_error": "medium-shot error (%)", "few_error": "few-shot error (%)",
                 "test_error_at_best_val": "top-1 error at the best validation epoch (%)",
                 "best_val_error": "best validation error (%)",
                 "best_test_error": "best test error over all epochs (%, model selection on test)"}
OTHER_RESULTS = ("last_epoch", "best_val_epoch", "best_test_epoch", "epochs_run", "wall_time_s", "train_size")
# Columns every runs table has, whether or not they are grid axes.
FIXED_CONFIG = ("arm", "variant", "imbalance", "seed", "subset_seed", "alpha", "beta", "head_count",
                "cb_gamma", "lr", "weight_decay", "batch_size", "dataset", "epochs", "n_max")
OK, FAILED, NOT_RUN, PARTIAL = "ok", "failed", "not run", "partial"


# --- runs -------------------------------------------------------------------------------
def trial_status(ray_status: str | None, result: dict) -> str:
    s = (ray_status or "").upper()
    if s == "ERROR":
        return FAILED
    if s == "TERMINATED":
        return OK if result.get("test_error") is not None and result.get("completed", True) else FAILED
    return NOT_RUN


def collate_runs(plan: dict, trials: list[dict], experiment: str = "") -> pd.DataFrame:
    """One row per planned cell. `trials`: dicts with `config` (the trial's Config dict),
    `status` (Ray's: TERMINATED, ERROR, PENDING, RUNNING...), `error` (str or None),
    `result` (the trial's last reported metrics) and optional `trial_id`, `path`."""
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
        row.update(trial_id=(t or {}).get("trial_id"), trial_path=(t or {}).get("path"),
                   config=json.dumps(cfg, sort_keys=True))
        rows.append(row)
    df = pd.DataFrame(rows)
    for m in (*METRICS, *OTHER_RESULTS):
        df[m] = pd.to_numeric(df[m], errors="coerce").astype("float64")
    return df


def _num(v):
    return math.nan if v is None else v


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
    mean, std, n = r[f"{metric}_mean"], r[f"{metric}_std"], r[f"{metric}_count"]
    val = "" if math.isnan(mean) else f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")
    if r["status"] == OK:
        return (val or "n/a"), ""
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
    paper = spec.get("paper_numbers", {}).get(dataset, {})
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
        if paper and metric == "test_error" and spec["cols"] == "imbalance" and "arm" in spec["rows"]:
            arms_here = {rk[spec["rows"].index("arm")] for rk in panel.row_keys}
            source = paper.get("source", "paper")
            for arm, numbers in paper.items():
                if arm in arms_here and isinstance(numbers, dict):
                    vals = [numbers.get(value_label("imbalance", c)) for c in panel.cols]
                    t.add_row(f"[dim]{_escape(source)}: {value_label('arm', arm)}[/]",
                              *[f"[dim]{v:.2f}[/]" if v is not None else "[dim]—[/]" for v in vals])
        tables.append((title, t, " ".join(caption)))
    return tables


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
        if sep and "." in head and " " not in head:  # risda.trainer.DivergedError -> DivergedError
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
def plain_panels(plan: dict, runs: pd.DataFrame, summary: pd.DataFrame, metric: str) -> list[tuple[str, list, list]]:
    """(title, header, rows) per panel, the cells as plain text (as in the rich table)."""
    spec = plan["spec"]
    out = []
    for panel in panels(summary, plan):
        header = [" / ".join(axis_label(a) for a in spec["rows"])] + \
                 [f"{axis_label(spec['cols'])}={value_label(spec['cols'], c)}" for c in panel.cols]
        rows = [[row_label(plan, rk)] + [cell_text(panel.cells.get((rk, c)), metric)[0] for c in panel.cols]
                for rk in panel.row_keys if any((rk, c) in panel.cells for c in panel.cols)]
        title = table_title(plan, runs, metric) + (f" — {panel.title}" if panel.key else "")
        out.append((title, header, rows))
    return out


def markdown_table(plan: dict, runs: pd.DataFrame, summary: pd.DataFrame, metric: str) -> str:
    parts = []
    for title, header, rows in plain_panels(plan, runs, summary, metric):
        parts.append(f"**{title}**\n")
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|")
        parts.extend("| " + " | ".join(r) + " |" for r in rows)
        parts.append("")
    parts.extend(f"- {line}" for line in failure_lines(runs))
    return "\n".join(parts) + "\n"


def latex_table(plan: dict, runs: pd.DataFrame, summary: pd.DataFrame, metric: str) -> str:
    def tex(s: str) -> str:
        s = s.replace("\\", "\\textbackslash{}")
        for a, b in (("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#"), ("±", "$\\pm$"), ("λ", "$\\lambda$"),
                     ("α", "$\\alpha$"), ("β", "$\\beta$"), ("—", "--")):
            s = s.replace(a, b)
        return s
    parts = ["% needs \\usepackage{booktabs}"]
    for title, header, rows in plain_panels(plan, runs, summary, metric):
        parts += ["\\begin{table}[t]", "\\centering", f"\\caption{{{tex(title)}}}",
                  "\\begin{tabular}{l" + "r" * (len(header) - 1) + "}", "\\toprule",
                  " & ".join(tex(h) for h in header) + " \\\\", "\\midrule"]
        parts += [" & ".join(tex(c) for c in r) + " \\\\" for r in rows]
        parts += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(parts)
