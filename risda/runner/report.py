"""A reproduction report: one Markdown page from an ablation's outputs.

    python ablations/report.py --results results/table5 [--out results/REPRODUCTION.md] [--command "..."]

Reads what `ablations/run.py` wrote into results/<name>/ (plan.json, runs.parquet,
summary.parquet, figure.png, and epochs.parquet if there) and writes: the machine, the code
commit (and whether the tree was dirty), the exact command(s), the wall time, the protocol,
then per imbalance factor a table with one row per arm (and variant) of three test errors,
each overall and on the many/medium/few-shot groups:

(a) at the last epoch; (b) at the best-validation epoch; (c) at the best-test epoch, what
the literature reports (model selection on test, never used for any choice).

With several seeds a cell is mean ± std (sample) over the seeds that finished, with n.
Published numbers sit beside each table, labelled with their method and source. Cells that
failed or did not run are shown as such, never dropped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from ..trainer.config import RunConfig
from ..trainer.data import NUM_CLASSES
from ..trainer.display import EMPTY, error_text
from ..trainer.evaluate import GROUPS, SELECTIONS
from .evidence import evidence_sections, finished, write_figures
from .external_check import CHECK_INTRO, external_check_lines, settings_differences
from .lambda_figure import lambda_section
from .paired_figure import plot_paired
from .ablation.spec import ARM_LABELS, DATASET_LABELS, axis_label, coerce, published_now, published_rows, value_label
from .ablation.tables import FAILED, METRICS, NOT_RUN, OK, failure_lines, fill_from_epochs, group_axes, summarize_runs
from .provenance import REPO, ablation_command, git
from .table_writers import markdown_lines

DEFAULT_OUT = "REPRODUCTION.md"   # beside the results folder: results/REPRODUCTION.md

SELECTION_LABELS = {"last": "(a) last epoch", "best_val": "(b) best-val epoch", "best_test": "(c) best-test epoch"}
SELECTION_NOTES = {
    "last": "the test error after the last epoch: no selection at all",
    "best_val": "the test error at the evaluated epoch with the lowest error on the balanced validation split "
                "(held out of the training pool); n/a when the run had none (--val-per-class 0)",
    "best_test": "what the literature reports (model selection on test, never used for any choice): "
                 "the lowest test error over the evaluated epochs, and the groups' errors at that same epoch",
}
COLUMN_GROUPS = ("all", *GROUPS)  # a selection's columns: overall, then each shot group
ROW_AXES = ("arm", "variant")
# what makes another protocol (a study on it is never paired with the main one); a variant's subset, padding
# and warm-up are the variant's, not another protocol
PROTOCOL_KEYS = ("dataset", "n_max", "val_per_class", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "epochs",
                 "lr_milestones", "precision", "model")


# --- reading the outputs ------------------------------------------------------------------
@dataclass
class Outputs:
    results: Path
    plan: dict
    runs: pd.DataFrame
    summary: pd.DataFrame
    figure: Path | None = None
    notes: list[str] = field(default_factory=list)   # how the tables were obtained


def load_outputs(results: str | Path) -> Outputs:
    """plan, runs and summary of an ablation. Metrics that runs.parquet lacks are read from
    epochs.parquet (by trial_id) when it is there; the summary is then recomputed from the
    runs (as ablations/run.py computes it), and also when summary.parquet lacks a column."""
    results = Path(results).expanduser()
    missing = [f for f in ("plan.json", "runs.parquet") if not (results / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{results}: no {' or '.join(missing)}; pass the folder an ablation wrote "
                                "(python ablations/run.py writes results/<name>/)")
    plan = json.loads((results / "plan.json").read_text())
    runs = pd.read_parquet(results / "runs.parquet")
    notes = []
    for m in METRICS:
        if m not in runs:
            runs[m] = math.nan
    epochs_path = results / "epochs.parquet"
    if epochs_path.is_file():
        before = runs[list(METRICS)].notna().sum()
        runs = fill_from_epochs(runs, pd.read_parquet(epochs_path))
        filled = [m for m in METRICS if runs[m].notna().sum() > before[m]]
        if filled:
            notes.append(f"{', '.join(filled)}: not in runs.parquet, read from the trials' epochs in epochs.parquet")
    summary_path = results / "summary.parquet"
    summary = pd.read_parquet(summary_path) if summary_path.is_file() else None
    needed = [f"{m}_{s}" for m in METRICS for s in ("mean", "std", "count")]
    if summary is None or notes or any(c not in summary for c in needed):
        why = ("there is no summary.parquet" if summary is None else "runs were completed from epochs.parquet" if notes
               else "summary.parquet lacks some of the errors")
        summary = summarize_runs(runs, plan)
        notes.append(f"the summary over seeds was recomputed from the runs ({why})")
    figure = results / "figure.png"
    return Outputs(results, plan, runs, summary, figure if figure.is_file() else None, notes)


# --- the machine, the code, the command, the time -----------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def torch_version() -> str:
    try:
        import torch
        return torch.__version__
    except Exception:  # noqa: BLE001 - the report is still useful without torch
        return "not importable"


def _values(runs: pd.DataFrame, col: str) -> list[str]:
    """`value (n cells)` for each distinct recorded value of a column."""
    if col not in runs:
        return []
    counts = runs[col].dropna().astype(str).value_counts()
    return [f"{v} ({n} cell{'s' * (n != 1)})" for v, n in counts.items()]


def machine_lines(runs: pd.DataFrame) -> list[str]:
    devices, hosts, torches = _values(runs, "device"), _values(runs, "hostname"), _values(runs, "torch")
    return [
        f"- Runs: device {', '.join(devices) if devices else 'not recorded in runs.parquet'}; "
        f"host {', '.join(hosts) if hosts else 'not recorded'}; "
        f"torch {', '.join(torches) if torches else 'not recorded per run'}.",
        f"- This report was written on {platform.node() or 'an unnamed host'}: {cpu_model()}, "
        f"{os.cpu_count()} logical cores, torch {torch_version()}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}.",
    ]


def code_lines(plan: dict) -> list[str]:
    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if head else None
    lines = []
    recorded = plan.get("commit") or plan.get("git_commit")
    if recorded:
        dirty = plan.get("dirty", plan.get("git_dirty"))
        lines.append(f"- Commit recorded by the run: `{recorded}`"
                     + ("" if dirty is None else f" (working tree {'dirty' if dirty else 'clean'})") + ".")
    if head is None:
        lines.append(f"- Code at report time: not a git checkout ({REPO}).")
    else:
        changed = [l for l in (status or "").splitlines() if l.strip()]
        state = (f"dirty: {len(changed)} tracked file{'s' * (len(changed) != 1)} modified" if changed else "clean")
        lines.append(f"- Code at report time (`git rev-parse HEAD`): `{head}`, working tree {state}.")
    if not recorded:
        lines.append("- plan.json records no commit: the code that trained may differ from the code above.")
    return lines


def recorded_commands(plan: dict) -> list[str]:
    """The command(s) plan.json records, if any: `commands` (a list of command lines),
    `command` (a command line, or its argv as a list) or `argv` (ablations/run.py's arguments)."""
    commands = plan.get("commands")
    if isinstance(commands, list) and commands:
        return [c if isinstance(c, str) else shlex.join(map(str, c)) for c in commands]
    command = plan.get("command")
    if isinstance(command, str) and command:
        return [command]
    if isinstance(command, list) and command:
        return [shlex.join(map(str, command))]
    argv = plan.get("argv")
    if isinstance(argv, list) and argv:
        return [ablation_command(argv)]
    return []


def command_lines(plan: dict, given: list[str]) -> list[str]:
    commands = recorded_commands(plan)
    if commands:
        source = "as recorded in plan.json"
    elif given:
        commands, source = list(given), "given to this report with --command (plan.json records none)"
    else:
        return ["Not recorded: plan.json has no command and none was given with --command."]
    return [f"{source}:", "", "```bash", *commands, "```"]


def duration(seconds: float) -> str:
    if seconds is None or math.isnan(seconds):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min {s:02d} s" if h else f"{m} min {s:02d} s"


def _timestamp(v) -> float | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return pd.Timestamp(v).timestamp()
    except (ValueError, TypeError):
        return None


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def wall_time_lines(runs: pd.DataFrame, plan: dict) -> list[str]:
    wall = runs.wall_time_s.dropna() if "wall_time_s" in runs else pd.Series(dtype=float)
    lines = [f"- Sum of the cells' wall times: {duration(float(wall.sum()))} ({wall.sum():.0f} s over {len(wall)} "
             f"of {len(runs)} cells" + (f"; {len(runs) - len(wall)} without a wall time" if len(wall) < len(runs) else "")
             + ")."]
    starts = [t for t in map(_timestamp, runs.get("started_at", pd.Series(dtype=float))) if t is not None]
    ends = [t for t in map(_timestamp, runs.get("ended_at", pd.Series(dtype=float))) if t is not None]
    start = min(starts) if starts else _timestamp(plan.get("started_at"))
    end = max(ends) if ends else _timestamp(plan.get("ended_at") or plan.get("finished_at"))
    if start is not None and end is not None:
        lines.append(f"- Experiment span: {duration(end - start)}, from {_iso(start)} to {_iso(end)} "
                     "(first trial start to last trial end).")
    else:
        lines.append("- Experiment span: not recorded (neither runs.parquet nor plan.json has start and end timestamps).")
    return lines


# --- the protocol --------------------------------------------------------------------------
def _resolved(cfg: dict) -> dict:
    try:
        return RunConfig.from_dict(cfg).to_dict()
    except Exception:  # noqa: BLE001 - a plan from another version: report what it says
        return dict(cfg)


def _join(values) -> str:
    vals = []
    for v in values:
        if v not in vals:
            vals.append(v)
    return ", ".join("none" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in vals)


def _by_lambda(cells: list[dict], fn) -> str:
    """One value, or `λ=200: x; λ=100: y` when it differs between imbalance factors."""
    per = {}
    for c in cells:
        per.setdefault(c["imbalance"], []).append(fn(c))
    distinct = {_join(v) for v in per.values()}
    if len(distinct) == 1:
        return distinct.pop()
    return "; ".join(f"λ={lam:g}: {_join(v)}" for lam, v in per.items())


def protocol_rows(plan: dict, runs: pd.DataFrame) -> list[tuple[str, str]]:
    cells = [_resolved(c["config"]) for c in plan["cells"]]
    hp = {}
    for c in plan["cells"]:
        hp.setdefault(c["hp_source"], None)
    c0 = cells[0]
    ds = c0["dataset"]
    n_classes = NUM_CLASSES.get(ds)

    def sizes(col):
        if col not in runs or runs[col].isna().all():
            return None
        per = {lam: sorted({int(v) for v in g[col].dropna()}) for lam, g in runs.groupby("imbalance", sort=False)}
        return "; ".join(f"λ={lam:g}: {', '.join(f'{v:,}' for v in vals)}" for lam, vals in per.items() if vals)

    def head(c):
        if c.get("head_min_count") is not None:
            return f"classes with more than {c['head_min_count']} images"
        if c.get("head_count") is None:
            k = max(1, round(0.2 * n_classes)) if n_classes else None
            return f"20% of the classes ({k})" if k else "20% of the classes"
        return str(c["head_count"])

    def test_size(c):
        if c.get("test_per_class") is not None:
            return f"{c['test_per_class']} per class" + (f" ({c['test_per_class'] * n_classes:,})" if n_classes else "")
        return "the full balanced test set" + (" (10,000 images)" if ds in ("cifar10lt", "cifar100lt") else "")

    rows = [
        ("dataset", f"{DATASET_LABELS.get(ds, ds)} (`{ds}`, data root `{c0.get('data_root')}`)"),
        ("imbalance factors λ", _join(c["imbalance"] for c in cells)),
        ("n_max (largest class)", _join(c.get("n_max") for c in cells).replace("none", "the dataset's (5,000 CIFAR-10, 500 CIFAR-100)")),
        ("train size (images)", sizes("train_size") or "not recorded in runs.parquet"),
        ("validation images per class", _join(c.get("val_per_class") for c in cells)),
        ("test size", sizes("test_size") or _by_lambda(cells, test_size)),
        ("epochs", _join(c["epochs"] for c in cells)),
        ("stage-I epochs", _join(c.get("stage1_epochs") for c in cells)),
        ("evaluated every", _join(c.get("eval_every") for c in cells) + " epochs (selections (b) and (c) choose among these)"),
        ("seeds (model)", _join(sorted({c["seed"] for c in cells}))),
        ("subset seeds", _join(sorted({c.get("subset_seed") for c in cells}, key=str))),
        ("arms", _join(ARM_LABELS.get(c["arm"], c["arm"]) for c in cells)),
        ("variants", _join(c.get("variant") for c in cells)),
        ("α, β", _by_lambda(cells, lambda c: f"({c['alpha']:g}, {c['beta']:g})") + f" — from {', '.join(hp)}"),
        ("head classes", _by_lambda(cells, head)),
        ("batch, lr, momentum, weight decay", _join(f"{c['batch_size']}, {c['lr']:g}, {c['momentum']:g}, {c['weight_decay']:g}" for c in cells)),
        ("lr milestones (×decay), warm-up epochs", _join(f"{list(c.get('lr_milestones') or [])} (×{c['lr_decay']:g}), {c.get('warmup_epochs')}" for c in cells)),
        ("model, precision", _join(f"{c['model']}, {c['precision']}" for c in cells)),
        ("as run: precision, torch threads (stage II; stage I), compile",
         f"{', '.join(_values(runs, 'precision')) or 'not recorded'}; "
         f"{', '.join(_values(runs, 'torch_threads')) or 'not recorded'}; "
         f"{', '.join(_values(runs, 'stage1_torch_threads')) or 'stage I threads not recorded'}; "
         f"{', '.join(_values(runs, 'compile')) or 'not recorded'}"),
    ]
    return rows


# --- the main tables -----------------------------------------------------------------------
def layout(plan: dict) -> tuple[list[str], list[str]]:
    """(row axes, section axes): rows are arm (and variant) where those are axes; every
    other axis but seed makes sections (one table per imbalance factor, ...)."""
    axes = group_axes(plan)
    rows = [a for a in axes if a in ROW_AXES] or [a for a in axes if a != "imbalance"] or axes
    return rows, [a for a in axes if a not in rows]


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def cell_text(r: dict, metric: str) -> str:
    if r["status"] == FAILED:
        return "FAILED"
    if r["status"] == NOT_RUN:
        return "not run"
    mean, std, n = r[f"{metric}_mean"], r[f"{metric}_std"], r[f"{metric}_count"]
    n = 0 if _nan(n) else int(n)
    if n == 0 or _nan(mean):
        return EMPTY  # an empty group (no few-shot class), or nothing measured
    text = f"{mean:.2f}" + (f" ± {std:.2f}" if n > 1 and not _nan(std) else "")
    return text + (f" (n={n})" if n < r["n_ok"] else "")


def seeds_text(r: dict) -> str:
    text = f"{int(r['n_ok'])}/{int(r['n_runs'])}"
    extra = []
    if r["n_failed"]:
        extra.append(f"{int(r['n_failed'])} FAILED" + (f" (seed {r['failed_seeds']})" if r.get("failed_seeds") else ""))
    if r["n_not_run"]:
        extra.append(f"{int(r['n_not_run'])} not run")
    return text + (": " + ", ".join(extra) if extra else "")


def row_text(axes: list[str], r: dict) -> str:
    return " / ".join(value_label(a, r[a]) if a in ROW_AXES else f"{axis_label(a)}={value_label(a, r[a])}" for a in axes)


def sections(plan: dict, summary: pd.DataFrame) -> list[tuple[dict, list[dict]]]:
    """(section key, summary rows in plan order) per combination of the section axes."""
    _, section_axes = layout(plan)
    out = {}
    for r in summary.to_dict("records"):
        key = tuple((a, coerce(a, r[a])) for a in section_axes)
        out.setdefault(key, []).append(r)
    return [(dict(k), rows) for k, rows in out.items()]


def main_table(plan: dict, rows: list[dict]) -> list[str]:
    row_axes, _ = layout(plan)
    header = [" / ".join(axis_label(a) for a in row_axes), "seeds ok/planned"]
    header += [f"{SELECTION_LABELS[sel].split(' ')[0]} {g}" for sel in SELECTIONS for g in COLUMN_GROUPS]
    table = pd.DataFrame([[row_text(row_axes, r), seeds_text(r), *(cell_text(r, m) for ms in SELECTIONS.values() for m in ms)]
                          for r in rows], columns=header)
    return markdown_lines(table, "ll" + "r" * (len(header) - 2))


def published_table(plan: dict, lam: float | None, also_arms: frozenset = frozenset()) -> list[str]:
    """The spec's published rows; `also_arms`: arms run by the other studies of the same report."""
    cells = plan["cells"]
    dataset = cells[0]["config"]["dataset"]
    rows = published_rows({"paper_numbers": published_now(plan)}, dataset)
    arms_run = {c["config"]["arm"] for c in cells} | also_arms
    if lam is not None:
        rows = [r for r in rows if lam in r["errors"]]
    if not rows:
        return []
    lams = [lam] if lam is not None else sorted({l for r in rows for l in r["errors"]}, reverse=True)
    head = ["published method", "source"] + (["top-1 error (%)"] if lam is not None else [f"λ={l:g}" for l in lams]) + ["our arm"]
    ours = lambda r: ("— (no arm of ours is this method)" if r["arm"] is None else
                      ARM_LABELS.get(r["arm"], r["arm"]) + ("" if r["arm"] in arms_run else " (not run here)"))
    table = pd.DataFrame([[r["method"], r["source"], *("—" if r["errors"].get(l) is None else f"{r['errors'][l]:.2f}" for l in lams),
                           ours(r)] for r in rows], columns=head)
    lines = markdown_lines(table, "ll" + "r" * len(lams) + "l")
    notes = [f"- {r['method']}: {r['note']}." for r in rows if r.get("note")]
    return lines + ([""] + notes if notes else [])


# --- the report ----------------------------------------------------------------------------
def per_study(studies: list[Outputs], lines) -> list[str]:
    """lines(study) for one study; for several, each under its results folder's name."""
    if len(studies) == 1:
        return [*lines(studies[0]), ""]
    return [x for o in studies for x in (f"`{o.results.name}`:", "", *lines(o), "")]


def first_config(o: Outputs) -> dict:
    return _resolved(o.plan["cells"][0]["config"])


def other_protocol(extra: Outputs, out: Outputs) -> str:
    """The training settings in which `extra` differs from the main study (batch, weight decay, ...),
    leaving out what a variant changes (subset, padding, warm-up); empty when it is the same protocol."""
    return settings_differences(first_config(extra), first_config(out), PROTOCOL_KEYS)


def same_protocol_runs(out: Outputs, extras: list[Outputs]) -> pd.DataFrame:
    """The runs the paired differences, the graph and Table 5 across λ read: the main study's and those of
    the extras on its protocol."""
    return pd.concat([out.runs, *(e.runs for e in extras if not other_protocol(e, out))], ignore_index=True)


def study_title(plan: dict) -> str:
    """The spec's title, its `λ=x` made the λ the study's cells ran at (a run may override the spec's
    imbalance factors: `--imbalance 200,50` of a λ = 100 spec is not a λ = 100 study)."""
    title = plan["spec"].get("title") or plan["spec"].get("name")
    lams = sorted({float(c["config"]["imbalance"]) for c in plan["cells"] if c["config"].get("imbalance") is not None}, reverse=True)
    return re.sub(r"λ\s*=\s*[\d.]+", "λ=" + ", ".join(f"{lam:g}" for lam in lams), title) if lams else title


def paired_lambda(plan: dict) -> float:
    """The imbalance factor the paired differences and the graph are read at: the study's own, or λ = 100
    (the paper's headline) when it has several, else its first."""
    lams = [float(c["config"]["imbalance"]) for c in plan["cells"]]
    return 100.0 if 100.0 in lams else lams[0]


def extra_intro(extra: Outputs, out: Outputs) -> str:
    other = other_protocol(extra, out)
    if other:
        return (f"Another protocol: {other}. Its cells are set beside the published numbers (external check) but never "
                "paired with the main study's.")
    variant = settings_differences(first_config(extra), first_config(out))
    return ("The same protocol" + (f" (this study's cells: {variant})" if variant else " and data")
            + ", each cell on the stage I its arm declares (the shared CE one, or the arm's own); its own cells:")


def render(out: Outputs, commands: list[str] | None = None, out_path: Path | None = None,
           extras: list[Outputs] | None = None, preface: str | None = None, figures: Path | None = None) -> str:
    """The report of `out`; `extras` (other studies, e.g. the reference variant run as its own command, or
    a baseline under its source's settings) add their tables under Results and their runs below; those on
    the same protocol join the paired differences, the others only the external check. `preface`: Markdown
    placed after the title (what the numbers say, written by a person and kept in its own file, so that the
    report can be regenerated without losing it). `figures`: where the report's figures go (default: beside
    `out_path`)."""
    plan, runs, summary = out.plan, out.runs, out.summary
    figures = figures or (out_path.parent if out_path is not None else None)
    spec = plan["spec"]
    ds = plan["cells"][0]["config"]["dataset"]
    title = study_title(plan)
    md = [f"# Reproduction report: {title}", "",
          f"{DATASET_LABELS.get(ds, ds)}, study `{spec.get('name')}`, results `{out.results}`; "
          f"written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. All numbers are top-1 error in % "
          "on the balanced test set (many / medium / few: mean per-class error of the classes with >100, 20–100, "
          "<20 training images).", ""]
    n_ok = int((runs.status == OK).sum())
    bad = runs[runs.status != OK]
    md += [f"**{n_ok} of {len(runs)} planned cells finished**" + (
        "." if not len(bad) else f"; {int((bad.status == FAILED).sum())} failed and {int((bad.status == NOT_RUN).sum())} "
                                 "did not run (listed below, and marked in the tables)."), ""]
    if preface:
        md += [preface.strip(), ""]
    studies = [out, *(extras or [])]
    md += ["## Machine", "", *machine_lines(pd.concat([o.runs for o in studies], ignore_index=True)), ""]
    md += ["## Code", "", *per_study(studies, lambda o: code_lines(o.plan))]
    md += ["## Command", "", *per_study(studies, lambda o: command_lines(o.plan, (commands or []) if o is out else []))]
    md += ["## Wall time", "", *per_study(studies, lambda o: wall_time_lines(o.runs, o.plan))]
    md += ["## Protocol", "", *markdown_lines(pd.DataFrame(protocol_rows(plan, runs), columns=["setting", "value"])), ""]

    md += ["## Results", "", "Three test errors per row, each overall (all) and on the many / medium / few-shot groups:", ""]
    md += [f"- **{SELECTION_LABELS[s]}**: {SELECTION_NOTES[s]}." for s in SELECTIONS]
    md += ["", "A cell is the mean ± std (sample std) over the seeds that finished; `seeds ok/planned` is n. "
               "FAILED / not run: no seed of that row finished; a row with some seeds missing says which.", ""]
    md += results_tables(plan, summary, also_arms=frozenset(c["config"]["arm"] for o in extras or [] for c in o.plan["cells"]))
    paired_runs = same_protocol_runs(out, extras or [])
    for extra in extras or []:
        md += [f"### Also: {study_title(extra.plan)} (`{extra.results}`)", "",
               extra_intro(extra, out), "", *results_tables(extra.plan, extra.summary, published=False)]
        runs = pd.concat([runs, extra.runs], ignore_index=True)
        bad = runs[runs.status != OK]
    check = external_check_lines([o.plan for o in studies], runs)
    if check:
        md += ["## External check: ours against each published number", "", CHECK_INTRO, "", *check, ""]
    md += lambda_section(plan, paired_runs, figures, out_path)
    lam = paired_lambda(plan)
    paired_runs = paired_runs[paired_runs.imbalance.astype(float) == lam]
    rel = (lambda p: os.path.relpath(p, out_path.parent)) if out_path is not None else (lambda p: Path(p).name)
    paired = plot_paired(paired_runs, figures / "paired_differences.png") if figures is not None else None
    md += evidence_sections(paired_runs, [o.results for o in studies], rel(paired) if paired else None, compute_runs=runs)
    if figures is not None:
        made = write_figures(paired_runs, figures)
        md += [f"![{title}]({rel(path)})" for title, path in made] + ([""] if made else [])
    return _rest(md, out, plan, runs, bad, title, out_path)


def results_tables(plan: dict, summary: pd.DataFrame, published: bool = True, also_arms: frozenset = frozenset()) -> list[str]:
    md = []
    for key, rows in sections(plan, summary):
        if key:
            md += [f"### {', '.join(f'{axis_label(a)} = {value_label(a, v)}' for a, v in key.items())}", ""]
        md += main_table(plan, rows) + [""]
        lams = {c["config"]["imbalance"] for c in plan["cells"]}
        lam = key.get("imbalance", next(iter(lams)) if len(lams) == 1 else None)
        pub = published_table(plan, lam, also_arms) if lam is not None and published else []
        if pub:
            md += ["Published, beside it (overall top-1 error as printed in the named source, not run here; "
                   "the RISDA authors' released code reports the best test error over all epochs, i.e. column (c)):", "",
                   *pub, ""]
    if published and not any("imbalance" in k for k, _ in sections(plan, summary)) \
            and len({c["config"]["imbalance"] for c in plan["cells"]}) > 1:
        pub = published_table(plan, None, also_arms)
        if pub:
            md += ["### Published numbers", "", *pub, ""]
    return md


def _rest(md, out, plan, runs, bad, title, out_path):
    if out.figure is not None:
        rel = os.path.relpath(out.figure, (out_path or out.figure).resolve().parent) if out_path else out.figure.name
        md += ["## Figure", "", f"![{title}]({rel})", ""]

    md += ["## Cells that did not finish", ""]
    if len(bad):
        md += [f"- {line}" for line in failure_lines(runs, limit=len(runs), width=200)]
    else:
        md += [f"None: all {len(runs)} cells finished."]
    md += [""]
    notes = list(plan.get("notes") or []) + out.notes
    if notes:
        md += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    md += ["## Every run", "", *markdown_lines(every_run(runs), "ll" + "r" * 6)]
    return "\n".join(md) + "\n"


def every_run(runs: pd.DataFrame) -> pd.DataFrame:
    r = runs.reindex(columns=["cell", "status", "test_error", "test_error_at_best_val", "best_test_error", "best_test_epoch",
                              "epochs_run", "wall_time_s"])
    epoch = lambda v: EMPTY if _nan(v) else f"{int(v)}"
    return pd.DataFrame({"cell": r.cell, "status": [s.upper() if s == FAILED else s for s in r.status],
                         "(a) last": r.test_error.map(error_text), "(b) best-val": r.test_error_at_best_val.map(error_text),
                         "(c) best-test": r.best_test_error.map(error_text), "best-test epoch": r.best_test_epoch.map(epoch),
                         "epochs run": r.epochs_run.map(epoch), "wall time": r.wall_time_s.map(duration)})


# --- a report of several parts (results/report.toml) -----------------------------------------
def load_manifest(path: str | Path) -> dict:
    """The report's declaration: title, preface, out and its parts in order, each `results` and `also`
    (folders relative to the manifest's own). One line on what is wrong, before anything is read."""
    from .ablation.spec import tomllib   # the specs' TOML reader (tomli on Python 3.10)
    path = Path(path)
    try:
        m = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: cannot read the report's manifest ({e}); see results/report.toml for its form")
    parts = m.get("part")
    if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) and p.get("results") for p in parts):
        raise ValueError(f"{path}: no [[part]] with `results = \"<folder>\"`; add one per part, in the report's order")
    here = path.parent
    return dict(title=m.get("title", "Reproduction report"), preface=here / m["preface"] if m.get("preface") else None,
                out=here / m.get("out", DEFAULT_OUT),
                parts=[dict(results=here / p["results"], also=[here / a for a in p.get("also", [])]) for p in parts])


def shift_headings(text: str) -> list[str]:
    """One level deeper (# -> ##), outside fenced code."""
    out, fenced = [], False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        out.append("#" + line if line.startswith("#") and not fenced else line)
    return out


def terms_across_parts(parts: list[tuple[Outputs, list[Outputs]]]) -> list[str]:
    """The reasoned terms' size and ε's tail mass per dataset and graph source (RISDA, paper variant),
    mean over seeds: what 100 classes change against 10."""
    rows = []
    for out, extras in parts:
        ok = finished(same_protocol_runs(out, extras))
        ds = out.plan["cells"][0]["config"]["dataset"]
        ok = ok[ok.cell_id.map(lambda c: c[0] == "risda" and c[1] == "paper")]
        if not len(ok) or "graph_offdiag_tail" not in ok:
            continue
        for source, g in ok.groupby(ok.cell_id.map(lambda c: c[2]), sort=False):
            rows.append([DATASET_LABELS.get(ds, ds), f"`{out.results.name}`", source, str(g.seed.nunique()),
                         *(f"{g[c].mean():.3f}" for c in ("graph_offdiag_tail", "reason_cov_ratio_first", "reason_mean_ratio_first")),
                         f"{g.test_error.mean():.2f}"])
    if not rows:
        return []
    head = ["dataset", "part", "graph", "seeds", "1−ε_cc tail", "tr Σʳ/tr Σ (switch)", "‖αμʳ‖/‖f‖ (switch)", "RISDA (a)"]
    return ["## The reasoning terms across the parts", "",
            "RISDA's ε and reasoned terms at the switch to stage II, mean over seeds, per dataset and graph source "
            "(from each part's knowledge-graph section):", "", *markdown_lines(pd.DataFrame(rows, columns=head), "llllrrrr"), ""]


def render_parts(parts: list[tuple[Outputs, list[Outputs]]], out_path: Path, title: str, preface: str | None = None) -> str:
    """Each part rendered as its own report (its figures in its main results folder), one heading level
    down, under one title and preface; then the terms across the parts."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    names = [study_title(o.plan) for o, _ in parts]
    md = [f"# {title}", "", f"Written {now}. All numbers are top-1 error in % on the balanced test set. Parts:", "",
          *(f"{i}. {n} (`{o.results.name}`)" for i, (n, (o, _)) in enumerate(zip(names, parts), 1)), ""]
    if preface:
        md += [preface.strip(), ""]
    for i, (out, extras) in enumerate(parts, 1):
        body = shift_headings(render(out, None, out_path, extras, None, figures=out.results))
        body[0] = f"## Part {i}: {names[i - 1]}"
        md += body + [""]
    md += terms_across_parts(parts)
    return "\n".join(md).rstrip() + "\n"


def write_manifest_report(manifest: str | Path) -> Path:
    m = load_manifest(manifest)
    parts = [(load_outputs(p["results"]), [load_outputs(a) for a in p["also"]]) for p in m["parts"]]
    path = m["out"]
    text = render_parts(parts, path.resolve(), m["title"], m["preface"].read_text() if m["preface"] else None)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_report(results: str | Path, out: str | Path | None = None, commands: list[str] | None = None,
                 also: list[str | Path] | None = None, preface: str | Path | None = None) -> Path:
    outputs = load_outputs(results)
    path = Path(out) if out else outputs.results.parent / DEFAULT_OUT
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render(outputs, commands, path.resolve(), [load_outputs(a) for a in also or []],
                  Path(preface).read_text() if preface else None)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write a Markdown reproduction report from an ablation's outputs "
                                            "(results/<name>/ as ablations/run.py writes it).")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--results", help="the ablation's results folder, e.g. results/table5")
    which.add_argument("--manifest", help="a report of several parts declared in a TOML file (results/report.toml: "
                       "title, preface, out, and [[part]] results = ..., also = [...]); the other options do not apply")
    p.add_argument("--out", help=f"the Markdown file (default: {DEFAULT_OUT} beside the results folder, e.g. results/{DEFAULT_OUT})")
    p.add_argument("--command", action="append", default=[],
                   help="the command that ran the ablation, when plan.json does not record it; repeatable")
    p.add_argument("--also", action="append", default=[], metavar="RESULTS",
                   help="another results folder of the same protocol (e.g. the reference variant's), added to the "
                        "report; repeatable")
    p.add_argument("--preface", metavar="MD_FILE", help="Markdown placed after the title: what the numbers say, "
                   "kept in its own file so that regenerating the report keeps it")
    args = p.parse_args(argv)
    try:
        path = (write_manifest_report(args.manifest) if args.manifest else
                write_report(args.results, args.out, args.command, args.also, args.preface))
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
