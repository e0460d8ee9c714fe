"""Ablation specs: what a study runs. A spec is a small TOML file in `risda/runner/specs/`;
`expand()` turns it (plus command-line overrides) into a *plan*: one cell per combination
of the grid axes, each with the full Config its trial trains.

Spec format (every table optional except [grid]):

    [study]
    title = "Table 5: ..."            # printed above the table
    paper = "CIFAR-100-LT"            # what the paper's version of this study used
    hyperparameters = "table2"        # "table2": paper Table 2 (α, β) per imbalance factor
                                      # "config": only [config] / --config / flags
    [grid]                            # the cartesian product; each combination = one trial
    arm = ["risda", "ce"]             # any Config field name is an axis ...
    imbalance = [200, 100]
    seed = [0, 1, 2]                  # ... "seed" is special, see below

    [layout]                          # the table and the figure
    rows = ["arm"]                    # table rows (one or more axes)
    cols = "imbalance"                # table columns (one axis); other axes become panels
    figure = "lines"                  # lines | bars | heatmap
    metric = "test_error"             # any error column of runs.parquet

    [config]                          # fixed Config fields for every cell
    dataset = "cifar100lt"
    epochs = 200

    [[paper.cifar100lt]]              # optional published rows, shown dim beside ours
    method = "RISDA"                  # the published method, as its source names it
    source = "RISDA paper (Chen et al., AAAI 2022), Table 1"   # paper and table
    arm = "risda"                     # only where the published method IS this arm
    errors = { "200" = 55.24, "100" = 49.84 }   # top-1 error (%) per λ, only as printed
    note = "..."                      # optional: how the numbers were read

Precedence, lowest first: Config defaults < paper Table 2 (α, β) for the cell's imbalance
factor < [config] < `--config best.json` (a search's result) < typed trainer flags < the
grid value of the cell. A typed trainer flag that names a grid axis narrows that axis to
the one value (`--alpha 0.5` on the α×β study).

Seeds: a cell's seed is both `seed` (model init, batch order, augmentation) and
`subset_seed` (which images form the long-tailed subset), so for a given imbalance factor
and seed every arm and every variant sees exactly the same training images and the arms
differ only in the method. Seed 0 is the LDAM-DRW standard subset. The reference variant's
own default subset seed (42) is deliberately *not* used, or the paper-vs-reference study
would compare different data; to reproduce the authors' subset, pin it (`subset_seed = 42`
in [config] or `--subset-seed 42`): then every cell uses that one subset and the seed axis
varies only the model seed.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from ...trainer.arms import ARMS
from ...trainer.config import VARIANTS, Config, ConfigError, parse_field
from ...trainer.data import NUM_CLASSES
from ...trainer.presets import TABLE2

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

SPEC_DIR = Path(__file__).resolve().parents[1] / "specs"  # risda/runner/specs/, shipped as package data
DEFAULT_SPEC = "table5"

DEFAULT_SEEDS = (0, 1, 2)  # a spec whose [grid] has no seed axis
FIGURES = ("lines", "bars", "heatmap")
HP_SOURCES = ("table2", "config")
# What `--config best.json` may set: the searchable method and optimiser settings, never
# the data, schedule or bookkeeping of the study.
HYPERPARAMETERS = ("alpha", "beta", "head_count", "head_min_count", "cb_gamma", "covariance", "graph_topk",
                   "lr", "momentum", "nesterov", "weight_decay", "lr_decay", "batch_size", "warmup_epochs")
# The Config fields that decide which images a cell trains and is tested on.
DATA_FIELDS = ("dataset", "data_root", "imbalance", "n_max", "val_per_class", "test_per_class",
               "subset_seed", "image_size")

ARM_LABELS = {name: arm.label for name, arm in ARMS.items()}  # declared in risda.trainer.arms
AXIS_LABELS = {"arm": "arm", "imbalance": "λ", "alpha": "α", "beta": "β", "head_count": "head classes",
               "variant": "variant", "seed": "seed"}
DATASET_LABELS = {"cifar10lt": "CIFAR-10-LT", "cifar100lt": "CIFAR-100-LT", "imagefolder": "ImageFolder",
                  "imagenetlt": "ImageNet-LT", "inat2018": "iNaturalist 2018"}

REASONING_ARMS = tuple(name for name, arm in ARMS.items() if arm.reasons)

_FIELD_TYPES = typing.get_type_hints(Config)
_FIELD_NAMES = tuple(f.name for f in fields(Config))


def axis_label(axis: str) -> str:
    return AXIS_LABELS.get(axis, axis)


def value_label(axis: str, value) -> str:
    if axis == "arm":
        return ARMS[value].label if value in ARMS else value
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def coerce(axis: str, value):
    """A grid value in its Config field's type: text (--grid, --imbalance, a TOML string) through
    risda.trainer.config.parse_field ('none', 'true', '160,180'); typed values converted as they are
    (TOML `200` -> 200.0 for imbalance; a NaN from a parquet column -> None for an optional field)."""
    tp = _FIELD_TYPES[axis]
    optional = type(None) in typing.get_args(tp)
    base = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    base = typing.get_origin(base[0]) or base[0]
    if value is None or (optional and isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        try:
            return parse_field(axis, value)
        except ConfigError as e:
            raise ConfigError(f"grid axis {axis!r}: {e}") from None
    try:
        if base is bool:
            return bool(value)
        if base is tuple:
            return tuple(int(v) for v in value)
        return base(value)
    except (TypeError, ValueError):
        raise ConfigError(f"grid axis {axis!r}: cannot read {value!r} as {base.__name__}") from None


# --- the spec ---------------------------------------------------------------------------
@dataclass
class Spec:
    name: str
    title: str = ""
    paper: str = ""
    hyperparameters: str = "table2"
    grid: dict = field(default_factory=dict)
    rows: list = field(default_factory=lambda: ["arm"])
    cols: str = "imbalance"
    figure: str = "lines"
    metric: str = "test_error"
    config: dict = field(default_factory=dict)
    paper_numbers: dict = field(default_factory=dict)
    path: str | None = None

    def to_dict(self) -> dict:
        return copy.deepcopy(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "Spec":
        return cls(**d)


def spec_path(name_or_path: str | None) -> Path:
    """`table5`, `fig4_alpha_beta` (a file in risda/runner/specs/) or a path to a .toml file."""
    name_or_path = name_or_path or DEFAULT_SPEC
    p = Path(name_or_path).expanduser()
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ConfigError(f"spec file {p} does not exist; the bundled specs are: {', '.join(list_specs())}")
        return p
    p = SPEC_DIR / f"{name_or_path}.toml"
    if not p.is_file():
        raise ConfigError(f"no spec named {name_or_path!r}: choose one of {', '.join(list_specs())} or pass a path to a .toml file")
    return p


def list_specs() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.toml"))


def load_spec(name_or_path: str | None = None) -> Spec:
    path = spec_path(name_or_path)
    if tomllib is None:
        raise ConfigError("reading a spec needs Python >= 3.11 (tomllib) or `pip install tomli` on 3.10")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"spec {path} is not valid TOML: {e}") from None
    return parse_spec(raw, name=path.stem, path=str(path))


def parse_spec(raw: dict, name: str, path: str | None = None) -> Spec:
    where = path or name

    def bad(msg):
        raise ConfigError(f"spec {where}: {msg}")

    unknown = set(raw) - {"study", "grid", "layout", "config", "paper"}
    if unknown:
        bad(f"unknown table(s) {sorted(unknown)}: a spec has [study], [grid], [layout], [config] and [paper]")
    study, layout = dict(raw.get("study", {})), dict(raw.get("layout", {}))
    for table, allowed in (("study", {"name", "title", "paper", "hyperparameters"}),
                           ("layout", {"rows", "cols", "figure", "metric"})):
        extra = set(dict(raw.get(table, {}))) - allowed
        if extra:
            bad(f"unknown key(s) {sorted(extra)} in [{table}]: allowed are {sorted(allowed)}")
    grid = {k: (list(v) if isinstance(v, list) else [v]) for k, v in dict(raw.get("grid", {})).items()}
    rows = layout.get("rows", ["arm"])
    spec = Spec(name=study.get("name", name), title=study.get("title", ""), paper=study.get("paper", ""),
                hyperparameters=study.get("hyperparameters", "table2"), grid=grid,
                rows=[rows] if isinstance(rows, str) else list(rows), cols=layout.get("cols", "imbalance"),
                figure=layout.get("figure", "lines"), metric=layout.get("metric", "test_error"),
                config=dict(raw.get("config", {})), paper_numbers=dict(raw.get("paper", {})), path=path)
    check_spec(spec)
    return spec


PUBLISHED_KEYS = ("method", "source", "errors", "arm", "note", "protocol")


def check_published(paper_numbers: dict, bad) -> None:
    """[[paper.<dataset>]] rows: each names its method and source (paper, table); `arm` only
    where the published method is exactly that arm (a published "CE" row is plain CE)."""
    fix = ("write one [[paper.<dataset>]] table per published row, with method, source (paper and table), "
           "errors = { \"<λ>\" = <top-1 error %> } and, only if the published method is exactly one of our arms, arm")
    for ds, rows in paper_numbers.items():
        if ds not in DATASET_LABELS:
            bad(f"[paper.{ds}]: unknown dataset; use one of {', '.join(DATASET_LABELS)}")
        if not isinstance(rows, list):
            bad(f"[paper.{ds}] is not a list of published rows: {fix}")
        for row in rows:
            if not isinstance(row, dict):
                bad(f"[paper.{ds}]: {row!r} is not a table: {fix}")
            missing = [k for k in ("method", "source", "errors") if not row.get(k)]
            extra = sorted(set(row) - set(PUBLISHED_KEYS))
            if missing or extra:
                bad(f"[[paper.{ds}]] row {row.get('method', '?')!r}: " + (f"missing {missing}" if missing else f"unknown keys {extra}")
                    + f"; {fix}")
            if row.get("arm") is not None and row["arm"] not in ARMS:
                bad(f"[[paper.{ds}]] row {row['method']!r}: unknown arm {row['arm']!r}: choose from {', '.join(ARMS)} or leave it out")
            if row.get("arm") is not None and row["method"] not in ARMS[row["arm"]].published:
                bad(f"[[paper.{ds}]] row {row['method']!r} is matched to arm {row['arm']!r}, which risda.trainer.arms declares as "
                    f"exactly {list(ARMS[row['arm']].published) or 'no published method'}: leave `arm` out, or fix the method")
            if row.get("protocol") is not None and row["protocol"] not in list_specs():
                bad(f"[[paper.{ds}]] row {row['method']!r}: protocol {row['protocol']!r} is not a bundled spec: name the spec "
                    f"whose settings the source trained with ({', '.join(list_specs())}), or leave it out (its own, not run here)")
            if not isinstance(row["errors"], dict):
                bad(f"[[paper.{ds}]] row {row['method']!r}: errors must be a table {{ \"<λ>\" = <error> }}")
            for lam, err in row["errors"].items():
                try:
                    float(lam)
                except ValueError:
                    bad(f"[[paper.{ds}]] row {row['method']!r}: {lam!r} is not an imbalance factor")
                if isinstance(err, bool) or not isinstance(err, (int, float)):
                    bad(f"[[paper.{ds}]] row {row['method']!r}: λ={lam}: {err!r} is not a number (leave out what was not published)")


def published_rows(spec: dict | Spec, dataset: str, arms=None) -> list[dict]:
    """The spec's published rows for `dataset`, in spec order: dicts with method, source,
    arm (or None), note (or None) and errors {λ (float): error}. With `arms`, rows matched to
    an arm outside it are left out. A plan written before published rows carried their
    method and source (a table of arm -> numbers) gives none: its labels were not checked."""
    numbers = (spec.paper_numbers if isinstance(spec, Spec) else spec.get("paper_numbers", {})).get(dataset, [])
    out = []
    for row in numbers if isinstance(numbers, list) else []:
        if not isinstance(row, dict) or not all(row.get(k) for k in ("method", "source", "errors")):
            continue
        if arms is not None and row.get("arm") is not None and row["arm"] not in arms:
            continue
        out.append(dict(method=row["method"], source=row["source"], arm=row.get("arm"), note=row.get("note"),
                        protocol=row.get("protocol"), errors={float(k): float(v) for k, v in row["errors"].items()}))
    return out


def published_now(plan: dict) -> dict:
    """The published rows a collation or report shows: the literature's numbers, not the run's, so a
    bundled spec's rows as they are today (added or corrected since the run), else the recorded ones."""
    name = plan["spec"]["name"]
    return load_spec(name).paper_numbers if name in list_specs() else plan["spec"].get("paper_numbers", {})


def published_label(row: dict) -> str:
    """`published: MetaSAug with CE — MetaSAug paper (Li et al., CVPR 2021), Table 1`."""
    return f"published: {row['method']} — {row['source']}"


def check_spec(spec: Spec) -> Spec:
    """Structural checks with a fix in every message (cells are checked by Config.validate)."""
    where = spec.path or spec.name

    def bad(msg):
        raise ConfigError(f"spec {where}: {msg}")

    if spec.hyperparameters not in HP_SOURCES:
        bad(f"[study] hyperparameters = {spec.hyperparameters!r}: choose 'table2' or 'config'")
    if spec.figure not in FIGURES:
        bad(f"[layout] figure = {spec.figure!r}: choose one of {', '.join(FIGURES)}")
    for axis, values in spec.grid.items():
        if axis not in _FIELD_NAMES:
            bad(f"[grid] axis {axis!r} is not a Config field: use one of {', '.join(_FIELD_NAMES)}")
        if axis in ("out", "resume", "subset_seed"):
            bad(f"[grid] axis {axis!r} cannot vary: the seed axis sets the subset seed, and Ray places each trial's output")
        if not values:
            bad(f"[grid] axis {axis!r} has no values: give at least one or remove it")
        if len(set(map(repr, values))) != len(values):
            bad(f"[grid] axis {axis!r} repeats a value: {values}")
        spec.grid[axis] = [coerce(axis, v) for v in values]
    for arm in spec.grid.get("arm", []):
        if arm not in ARMS:
            bad(f"unknown arm {arm!r}: choose from {', '.join(ARMS)}")
        base = ARMS[arm].derived_from
        if base and base not in spec.grid.get("arm", [base]):
            bad(f"arm {arm!r} trains nothing of its own: it is read from the {base!r} cell's evaluation; add {base} to the arms")
    for variant in spec.grid.get("variant", []):
        if variant not in VARIANTS:
            bad(f"unknown variant {variant!r}: choose paper or reference")
    spec.grid.setdefault("seed", list(DEFAULT_SEEDS))
    unknown = set(spec.config) - set(_FIELD_NAMES)
    if unknown:
        bad(f"unknown [config] field(s) {sorted(unknown)}: valid fields are the trainer's flags with _ for -")
    both = set(spec.config) & set(spec.grid)
    if both:
        bad(f"{sorted(both)} set in both [grid] and [config]: keep each in one place")
    for axis in [*spec.rows, spec.cols]:
        if axis not in spec.grid:
            bad(f"[layout] names axis {axis!r} that is not in [grid] (axes: {', '.join(spec.grid)}); add it to [grid] or change [layout]")
        if axis == "seed":
            bad("[layout] cannot use the seed axis: tables and figures average over seeds")
    if spec.cols in spec.rows:
        bad(f"[layout] axis {spec.cols!r} is both a row and the column axis")
    if spec.figure == "heatmap" and len(spec.rows) != 1:
        bad("[layout] a heatmap needs exactly one row axis")
    check_published(spec.paper_numbers, bad)
    return spec


# --- overrides -------------------------------------------------------------------------
def parse_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def apply_overrides(spec: Spec, grid: dict | None = None, flags: dict | None = None,
                    origins: dict | None = None) -> tuple[Spec, dict, list[str]]:
    """(spec, fixed trainer flags, notes). `grid`: axis -> list of values (from --arms,
    --imbalance, --seeds, --grid; `origins`: axis -> the flag that gave it, for the messages);
    `flags`: the trainer flags the user typed. A flag that names a grid axis narrows the axis
    to its value instead of being a fixed override."""
    spec = Spec.from_dict(spec.to_dict())
    notes, flags = [], dict(flags or {})
    for axis, values in (grid or {}).items():
        if axis not in _FIELD_NAMES:
            raise ConfigError(f"--grid {axis}=...: {axis!r} is not a Config field; use one of {', '.join(_FIELD_NAMES)}")
        check_override(axis, values, (origins or {}).get(axis, f"--grid {axis}="))
        spec.config.pop(axis, None)
        spec.grid[axis] = list(values)
    for name in list(flags):
        if name in spec.grid:
            spec.grid[name] = [flags.pop(name)]
            notes.append(f"--{name.replace('_', '-')} narrows the {axis_label(name)} axis to {spec.grid[name][0]}")
    check_spec(spec)
    return spec, flags, notes


def check_override(axis: str, values: list, flag: str) -> None:
    """An arm or variant typed on the command line is checked there, so that a typo is blamed on
    the flag, not on the spec file."""
    known = {"arm": list(ARMS), "variant": list(VARIANTS)}.get(axis)
    for value in values if known else []:
        if value not in known:
            raise ConfigError(f"{flag}: unknown {axis} {value!r}: choose from {', '.join(known)}")


# --- hyperparameters --------------------------------------------------------------------
def table2(imbalance: float) -> tuple[float, float, float, bool]:
    """(α, β, the Table-2 λ used, exact?): the nearest Table-2 λ on a log scale otherwise."""
    if imbalance in TABLE2:
        return (*TABLE2[imbalance], imbalance, True)
    nearest = min(TABLE2, key=lambda lam: (abs(math.log(lam) - math.log(imbalance)), -lam))
    return (*TABLE2[nearest], nearest, False)


def read_best(path: str | Path) -> tuple[dict, list[str]]:
    """(hyperparameters, notes) from a search's best.json (tune/search.py writes
    {"config": {...}, "params": {...}, ...}; a flat Config dict works too). Only the method
    and optimiser fields (HYPERPARAMETERS) are taken, never the data or the schedule."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--config {p}: no such file; pass the best.json a search wrote (results/<name>/best.json)")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {p} is not JSON ({e}); pass the best.json a search wrote") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {p}: expected a JSON object with the run configuration")
    cfg = raw.get("config", raw)
    # coerce: a parquet column with a failed trial's NaN turns an int parameter into 20.0
    found = {k: coerce(k, v) for k, v in {**cfg, **raw.get("params", {})}.items() if k in HYPERPARAMETERS}
    if not found:
        raise ConfigError(f"--config {p} holds none of the hyperparameters {', '.join(HYPERPARAMETERS)}")
    notes = [f"hyperparameters from {p}: " + ", ".join(f"{k}={v}" for k, v in sorted(found.items()))]
    if "imbalance" in cfg:
        notes.append(f"{p.name} was tuned at λ={float(cfg['imbalance']):g} on {cfg.get('dataset', '?')}; "
                     "its values are used for every imbalance factor of the study")
    return found, notes


# --- expansion --------------------------------------------------------------------------
@dataclass
class Cell:
    key: dict          # axis -> value (one combination of the grid)
    config: dict       # the full Config of its trial
    hp_source: str     # where α and β came from

    def to_dict(self) -> dict:
        return dict(key=self.key, config=self.config, hp_source=self.hp_source)


def cell_key(config: dict, axes) -> tuple:
    """The identity of a trial's cell, read back from its config."""
    return tuple((a, coerce(a, config[a])) for a in axes)


def expand(spec: Spec, flags: dict | None = None, best: dict | None = None, best_path: str | None = None) -> tuple[list[Cell], list[str]]:
    """(cells, notes): every combination of the grid, each a validated full Config dict."""
    flags, notes = dict(flags or {}), []
    axes = list(spec.grid)
    cells, table2_notes = [], {}
    for combo in itertools.product(*(spec.grid[a] for a in axes)):
        key = dict(zip(axes, combo))
        try:  # every value of the cell checked before any is used (table2 needs a valid λ)
            Config.from_dict({**spec.config, **(best or {}), **flags, **key}).validate()
        except ConfigError as e:
            raise ConfigError(f"cell {format_key(key)}: {e}") from None
        values = {}
        imbalance = coerce("imbalance", key.get("imbalance", spec.config.get("imbalance", flags.get("imbalance", Config.imbalance))))
        source = {"alpha": "Config default", "beta": "Config default"}
        if spec.hyperparameters == "table2":
            alpha, beta, lam, exact = table2(imbalance)
            values.update(alpha=alpha, beta=beta)
            source = dict.fromkeys(source, f"Table 2 λ={lam:g}" if exact else f"Table 2 λ={lam:g} (nearest to {imbalance:g})")
            if not exact:
                table2_notes[imbalance] = (f"λ={imbalance:g} is not in the paper's Table 2: its (α, β) = ({alpha}, {beta}) "
                                           f"come from the nearest factor, λ={lam:g}")
        layers = [(spec.config, "spec"), (best or {}, Path(best_path or "best.json").name), (flags, "command line"),
                  ({a: v for a, v in key.items() if a != "seed"}, "grid")]
        for layer, name in layers:
            values.update(layer)
            source.update({hp: name for hp in source if hp in layer})
        hp_source = source["alpha"] if source["alpha"] == source["beta"] else f"α: {source['alpha']}; β: {source['beta']}"
        if "seed" in key:
            values["seed"] = key["seed"]
            if "subset_seed" not in spec.config and "subset_seed" not in flags:
                values["subset_seed"] = key["seed"]
        values.pop("out", None), values.pop("resume", None)
        values["progress"] = False
        try:
            cfg = Config.from_dict(values).validate()
        except ConfigError as e:
            raise ConfigError(f"cell {format_key(key)}: {e}") from None
        cells.append(Cell(key=key, config=cfg.to_dict(), hp_source=hp_source))
    notes.extend(table2_notes[k] for k in sorted(table2_notes, reverse=True))
    if spec.hyperparameters == "table2" and best is None:
        ds = cells[0].config["dataset"] if cells else None
        if ds != "cifar100lt" and not {"alpha", "beta"} <= set(spec.grid) | set(spec.config) | set(flags):
            notes.append(f"α and β are the paper's Table 2 values, tuned on CIFAR-100-LT; the data here is {DATASET_LABELS.get(ds, ds)} "
                         "(pass --config best.json from a search to use tuned values)")
    notes.extend(head_count_notes(cells))
    check_same_data(cells)
    return cells, notes


def head_count_notes(cells: list[Cell]) -> list[str]:
    """Warn when every class is a head class: the reasoning arms then equal no_reasoning."""
    arms = {}
    for c in cells:
        cfg = c.config
        n = NUM_CLASSES.get(cfg["dataset"])
        if (n and cfg["arm"] in REASONING_ARMS and cfg["head_min_count"] is None and cfg["head_count"] is not None
                and cfg["head_count"] >= n):
            arms.setdefault((cfg["head_count"], cfg["dataset"], n), set()).add(cfg["arm"])
    return [f"head_count {hc} >= the {n} classes of {DATASET_LABELS[ds]}: every class is head, so "
            f"{', '.join(sorted(a))} reason about nothing; pass e.g. --head-count {max(1, n // 5)} (the paper's 20% of classes)"
            for (hc, ds, n), a in sorted(arms.items())]


def format_key(key: dict) -> str:
    return ", ".join(f"{axis_label(a)}={value_label(a, v)}" for a, v in key.items())


def check_same_data(cells: list[Cell]) -> None:
    """Every cell with the same imbalance factor and seed must train on the same images
    whichever arm or variant it runs: otherwise the study does not compare methods."""
    groups = {}
    for cell in cells:
        data_key = tuple((f, cell.config[f]) for f in DATA_FIELDS)
        group = (cell.config["imbalance"], cell.config["seed"])
        groups.setdefault(group, set()).add(data_key)
    for (lam, seed), keys in groups.items():
        if len(keys) > 1:
            varying = sorted({f for k in keys for f, v in k if len({dict(kk)[f] for kk in keys}) > 1})
            raise ConfigError(f"cells with λ={lam:g}, seed {seed} would train on different data (they differ in {', '.join(varying)}); "
                              "data settings cannot be grid axes of an ablation: fix them in [config] or on the command line")


# --- the plan written beside the results ------------------------------------------------
def make_plan(spec: Spec, cells: list[Cell], notes: list[str]) -> dict:
    return dict(spec=spec.to_dict(), axes=list(spec.grid), cells=[c.to_dict() for c in cells], notes=list(notes))


def plan_cells(plan: dict) -> list[Cell]:
    return [Cell(key={a: coerce(a, v) for a, v in c["key"].items()}, config=c["config"], hp_source=c["hp_source"])
            for c in plan["cells"]]


def merge_plans(plans: dict[str, dict]) -> dict:
    """One plan over the cells of several experiments of one spec, e.g. seeds run one after
    another (`--collate-only --merge`). Their axes must agree, and a cell planned twice must
    have the same config. The provenance of each experiment is kept in `merged`."""
    names, first = list(plans), next(iter(plans.values()))
    for n, p in plans.items():
        if p["spec"]["name"] != first["spec"]["name"] or p["axes"] != first["axes"]:
            raise ConfigError(f"--merge: experiment {n!r} ran spec {p['spec']['name']!r} over axes {p['axes']}, "
                              f"{names[0]!r} ran {first['spec']['name']!r} over {first['axes']}: merge only experiments "
                              "of one spec and grid axes")
    cells: dict[str, dict] = {}
    for n, p in plans.items():
        for c in p["cells"]:
            k = json.dumps(c["key"], sort_keys=True)
            if k in cells and cells[k]["config"] != c["config"]:
                raise ConfigError(f"--merge: cell {k} is in several experiments with different configs "
                                  f"({'; '.join(plan_differences({'cells': [cells[k]]}, {'cells': [c]}))})")
            cells.setdefault(k, c)
    spec = copy.deepcopy(first["spec"])
    for axis in first["axes"]:  # every value any experiment ran, in first-seen order
        spec["grid"][axis] = list(dict.fromkeys(v for p in plans.values() for v in p["spec"]["grid"][axis]))
    merged = dict(spec=spec, axes=list(first["axes"]), cells=list(cells.values()),
                  notes=list(dict.fromkeys(x for p in plans.values() for x in p.get("notes", []))))
    merged["merged"] = {n: {f: p.get(f) for f in ("commit", "dirty", "argv", "started_at", "ended_at")}
                        for n, p in plans.items()}
    commits = {p.get("commit") for p in plans.values()}
    if len(commits) == 1:
        merged["commit"] = commits.pop()
        merged["dirty"] = any(p.get("dirty") for p in plans.values())
    starts = [p["started_at"] for p in plans.values() if p.get("started_at")]
    ends = [p["ended_at"] for p in plans.values() if p.get("ended_at")]
    if starts and ends:
        merged["started_at"], merged["ended_at"] = min(starts), max(ends)
    return merged


def plan_differences(old: dict, new: dict, limit: int = 5) -> list[str]:
    """What changed between two plans (cells added/removed, config fields that differ)."""
    def index(plan):
        return {json.dumps(c["key"], sort_keys=True): c["config"] for c in plan["cells"]}
    a, b = index(old), index(new)
    diffs = []
    if set(a) != set(b):
        gone, added = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        if gone:
            diffs.append(f"{len(gone)} cell(s) no longer in the plan, e.g. {gone[0]}")
        if added:
            diffs.append(f"{len(added)} new cell(s), e.g. {added[0]}")
    changed = {}
    for k in set(a) & set(b):
        for f in sorted(set(a[k]) | set(b[k])):
            if a[k].get(f) != b[k].get(f) and f not in changed:
                changed[f] = f"{f}: {a[k].get(f)!r} -> {b[k].get(f)!r}"
    diffs.extend(list(changed.values())[:limit])
    return diffs
