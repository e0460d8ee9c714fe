"""The one configuration of a run, shared by the CLI, the trainer and the Ray trainable.

Every field is a command-line flag (`--batch-size`, `--n-max`, ...), generated from the
dataclass below, so there is exactly one list of options in the project.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass, field, fields

from .arms import ARMS
from .errors import ConfigError
from ..method.graph import DEFAULT_TEMPERATURE, GRAPH_SOURCES
from .presets import PRESETS, apply_preset

DATASETS = ("cifar10lt", "cifar100lt", "imagefolder", "imagenetlt", "inat2018")
VARIANTS = ("paper", "reference")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILES = ("auto", "on", "off")
MODELS = ("resnet32", "resnet50")


@dataclass
class Config:
    preset: str | None = field(default=None, metadata={"help": "fill the paper's schedule for a dataset (risda.trainer.presets: imagenetlt-r50, inat2018-r50); flags given beside it win"})
    # --- data -------------------------------------------------------------------------
    dataset: str = field(default="cifar10lt", metadata={"help": f"one of {', '.join(DATASETS)}"})
    data_root: str = field(default="data", metadata={"help": "torchvision CIFAR folder, or an ImageFolder tree <root>/train/<class>/*, <root>/test/<class>/*; for imagenetlt/inat2018 the folder of their list/JSON files (risda.trainer.data_disk)"})
    download: bool = field(default=False, metadata={"help": "download CIFAR with torchvision if it is missing (needs internet)"})
    imbalance: float = field(default=100.0, metadata={"help": "imbalance factor λ = n_max / n_min (1 keeps the tree as it is)"})
    n_max: int | None = field(default=None, metadata={"help": "images of the largest class (default: all a class has, 500/5000 on CIFAR)"})
    val_per_class: int = field(default=0, metadata={"help": "balanced validation images per class, held out of the training pool before subsampling"})
    test_per_class: int | None = field(default=None, metadata={"help": "cap test images per class (quick experiments only; default: the full test set)"})
    subset_seed: int | None = field(default=None, metadata={"help": "seed of the long-tailed subset and the validation split (default 0; 42 in the reference variant)"})
    image_size: int | None = field(default=None, metadata={"help": "input size (default: 32 for ResNet-32, 224 for ResNet-50)"})
    cache_dir: str = field(default="~/.cache/risda", metadata={"help": "where decoded image trees are cached"})
    num_workers: int = field(default=4, metadata={"help": "DataLoader workers for the on-disk datasets (ImageNet-LT, iNaturalist)"})
    # --- model ------------------------------------------------------------------------
    model: str = field(default="resnet32", metadata={"help": f"one of {', '.join(MODELS)}"})
    # --- schedule (paper: CIFAR-LT, ResNet-32) -----------------------------------------
    epochs: int = 200
    stage1_epochs: int | None = field(default=None, metadata={"help": "epochs of stage I (default: 80%% of --epochs, 160 of 200)"})
    batch_size: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_milestones: tuple[int, ...] | None = field(default=None, metadata={"help": "epochs where lr is multiplied by --lr-decay (default: 80%%, 90%% of --epochs)"})
    lr_decay: float = 0.01
    warmup_epochs: int | None = field(default=None, metadata={"help": "linear lr warm-up epochs (default: 5 of 200, scaled with --epochs; 0 in the reference variant)"})
    seed: int = field(default=0, metadata={"help": "seed of model init, batch order and augmentation"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast where it is measured faster than fp32: CUDA with native bf16, CPUs with AVX512-BF16 or AMX; see risda.trainer.precision), fp32, or bf16"})
    channels_last: bool = False
    compile: str = field(default="auto", metadata={"help": "torch.compile the backbone's training forward: auto (where it is measured to pay: CUDA, CPU fp32, runs of 1000+ steps; see risda.trainer.compile), on, or off"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    pad_mode: str | None = field(default=None, metadata={"help": "crop padding: zeros (default) or reflect (reference variant)"})
    # --- method -----------------------------------------------------------------------
    arm: str = field(default="risda", metadata={"help": f"one of {', '.join(ARMS)}"})
    variant: str = field(default="paper", metadata={"help": "paper (default) or reference (the authors' released code)"})
    alpha: float = field(default=0.5, metadata={"help": "strength of the reasoning prototype (eq. 6)"})
    beta: float = field(default=0.75, metadata={"help": "strength of the covariance (eq. 6)"})
    head_count: int | None = field(default=None, metadata={"help": "the largest classes that are head (no reasoning); default: 20%% of the classes, at least 1 (20 on CIFAR-100, 2 on CIFAR-10)"})
    head_min_count: int | None = field(default=None, metadata={"help": "instead of --head-count: classes with more than this many images are head"})
    cb_gamma: float = field(default=0.9999, metadata={"help": "γ of the class-balanced weights (eq. 12)"})
    covariance: str = field(default="full", metadata={"help": "full, diag or lowrank:K"})
    graph_topk: int | None = field(default=None, metadata={"help": "keep the k strongest neighbours per class in the knowledge graph (default: dense)"})
    graph_source: str = field(default="confusion", metadata={"help": f"where the knowledge graph ε comes from: {', '.join(GRAPH_SOURCES)} (confusion is the paper's eq. 3; the others are ours, risda.method.graph)"})
    graph_temperature: float | None = field(default=None, metadata={"help": "temperature of the soft and prototype graph sources (default: 1 for soft, 0.1 for prototype; soft at -> 0 is confusion)"})
    # --- the field's baselines (risda.trainer.arms; published values as defaults) ----------------
    la_tau: float = field(default=1.0, metadata={"help": "τ of logit adjustment (la_loss, ce_posthoc_la; Menon et al. 2021: 1)"})
    ldam_max_margin: float = field(default=0.5, metadata={"help": "LDAM's largest margin (Cao et al. 2019: 0.5)"})
    ldam_scale: float = field(default=30.0, metadata={"help": "LDAM's logit scale s (Cao et al. 2019: 30)"})
    # --- bookkeeping ------------------------------------------------------------------
    eval_every: int = 10
    checkpoint_every: int = 10
    out: str = "runs/default"
    resume: bool = field(default=False, metadata={"help": "continue from <out>/checkpoint.pt"})
    progress: bool = field(default=True, metadata={"help": "show a rich progress bar"})
    threads: int | None = field(default=None, metadata={"help": "torch's intra-op CPU threads (default: torch's own, one per core; a Ray trial: the CPUs Ray reserved for it). fp32 results on CPU depend on it in the last digits"})
    stage1_threads: int | None = field(default=None, metadata={"help": "threads of the stage-I epochs (default: --threads). A search trial's shared stage I may have run on more threads than its stage II: --config best.json sets both"})

    # ------------------------------------------------------------------------------
    def resolved(self) -> "RunConfig":
        """This config with every derived default filled in: what a run actually uses. Called once,
        where a run enters (the CLI, the Ray trainable, the replay, a driver's plan); everything
        below takes the RunConfig."""
        return RunConfig(**{f.name: getattr(self, f.name) for f in fields(Config)})

    def validate(self) -> "Config":
        """Raise ConfigError naming the flag and the fix; returns self for chaining."""
        def bad(msg):
            raise ConfigError(msg)

        for name in _RANGE_OF:
            check_field(name, getattr(self, name))
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                bad(f"{_flag(name)} must be true or false, got {getattr(self, name)!r}")
        if self.lr_milestones is not None and not (
                isinstance(self.lr_milestones, (tuple, list))
                and all(isinstance(m, numbers.Integral) and not isinstance(m, bool) and m >= 0 for m in self.lr_milestones)):
            bad(f"--lr-milestones must be epochs >= 0, comma-separated (e.g. 160,180), got {self.lr_milestones!r}")
        if self.nesterov and self.momentum == 0:
            bad("--nesterov needs a momentum: pass --momentum in (0, 1) or --no-nesterov")
        if self.dataset not in DATASETS:
            bad(f"unknown dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        if self.arm not in ARMS:
            bad(f"unknown arm {self.arm!r}: choose one of {', '.join(ARMS)}")
        for name, value in ARMS[self.arm].fixed.items():
            if getattr(self, name) != value:
                bad(f"--arm {self.arm} is {ARMS[self.arm].fixed_as} at {_flag(name)} {value:g}: drop {_flag(name)}, "
                    f"or use --arm {ARMS[self.arm].fixed_as} {_flag(name)} {getattr(self, name):g}")
        if self.graph_source not in GRAPH_SOURCES:
            bad(f"unknown graph source {self.graph_source!r}: choose one of {', '.join(GRAPH_SOURCES)}")
        if self.variant == "reference" and self.graph_source != "confusion":
            bad(f"--graph-source {self.graph_source} with --variant reference: the reference variant is the authors' "
                "code, whose graph is the rounded confusion of its eval passes; use --variant paper for another source")
        if self.variant not in VARIANTS:
            bad(f"unknown variant {self.variant!r}: choose paper or reference")
        if self.precision not in PRECISIONS:
            bad(f"unknown precision {self.precision!r}: choose auto, fp32 or bf16")
        if self.compile not in COMPILES:
            bad(f"unknown compile {self.compile!r}: choose auto, on or off")
        if self.model not in MODELS:
            bad(f"unknown model {self.model!r}: choose one of {', '.join(MODELS)}")
        if self.pad_mode not in (None, "zeros", "reflect"):
            bad(f"unknown pad mode {self.pad_mode!r}: choose zeros or reflect")
        s1 = self.stage1_epochs if self.stage1_epochs is not None else default_stage1_epochs(self.epochs)
        if not 0 <= s1 < self.epochs:
            bad(f"stage-I epochs ({s1}) must be in [0, epochs={self.epochs}): stage II needs at least one epoch; lower --stage1-epochs")
        cov = self.covariance
        if not (isinstance(cov, str) and (cov in ("full", "diag") or (cov.startswith("lowrank:") and cov[8:].isdigit() and int(cov[8:]) > 0))):
            bad(f"unknown covariance {cov!r}: choose full, diag or lowrank:K with K > 0")
        if self.preset is not None:
            if self.preset not in PRESETS:
                bad(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["lr_milestones"] is not None:
            d["lr_milestones"] = list(d["lr_milestones"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown config field(s) {sorted(unknown)}: valid fields are {sorted(names)}")
        d = dict(d)
        if d.get("lr_milestones") is not None:
            d["lr_milestones"] = tuple(d["lr_milestones"])
        return cls(**d)


# --- validation ---------------------------------------------------------------------------
# (field, integer?, allowed, the rule as the message states it). Every value must also be
# finite (NaN and inf are rejected); None passes for an optional field (it means "default").
_RANGES = (
    ("imbalance", False, lambda v: v >= 1, ">= 1 (it is n_max / n_min; 1 keeps the data as it is)"),
    ("n_max", True, lambda v: v >= 1, ">= 1 (images of the largest class; omit it to use all)"),
    ("val_per_class", True, lambda v: v >= 0, ">= 0 (0: no validation split)"),
    ("test_per_class", True, lambda v: v >= 1, ">= 1 (test images kept per class; omit it for the full test set)"),
    ("subset_seed", True, lambda v: 0 <= v < 2**32, "in [0, 4294967295]"),
    ("seed", True, lambda v: 0 <= v < 2**32, "in [0, 4294967295]"),
    ("image_size", True, lambda v: v >= 8, ">= 8 pixels (default: 32 for resnet32, 224 for resnet50)"),
    ("num_workers", True, lambda v: v >= 0, ">= 0 (0 decodes in the main process)"),
    ("epochs", True, lambda v: v >= 1, ">= 1"),
    ("stage1_epochs", True, lambda v: v >= 0, ">= 0 (omit it for 80% of --epochs)"),
    ("batch_size", True, lambda v: v >= 1, ">= 1"),
    ("lr", False, lambda v: v > 0, "> 0 (paper: 0.1)"),
    ("momentum", False, lambda v: 0 <= v < 1, "in [0, 1) (paper: 0.9)"),
    ("weight_decay", False, lambda v: v >= 0, ">= 0 (paper: 5e-4)"),
    ("lr_decay", False, lambda v: v > 0, "> 0 (the lr factor at each milestone; paper: 0.01)"),
    ("warmup_epochs", True, lambda v: v >= 0, ">= 0 (0: no warm-up)"),
    ("alpha", False, lambda v: v >= 0, ">= 0 (paper: 0.5)"),
    ("beta", False, lambda v: v >= 0, ">= 0 (paper: 0.75)"),
    ("head_count", True, lambda v: v >= 0, ">= 0"),
    ("head_min_count", True, lambda v: v >= 0, ">= 0 (or omit it and use --head-count)"),
    ("cb_gamma", False, lambda v: 0 <= v < 1, "in [0, 1) (paper: 0.9999)"),
    ("graph_topk", True, lambda v: v >= 1, ">= 1 (omit it for the dense graph)"),
    ("graph_temperature", False, lambda v: v > 0, "> 0 (soft: 1 is the plain softmax; prototype: try 0.1)"),
    ("la_tau", False, lambda v: v >= 0, ">= 0 (0: no adjustment; Menon et al.: 1)"),
    ("ldam_max_margin", False, lambda v: v > 0, "> 0 (Cao et al.: 0.5)"),
    ("ldam_scale", False, lambda v: v > 0, "> 0 (Cao et al.: 30)"),
    ("eval_every", True, lambda v: v >= 1, ">= 1"),
    ("checkpoint_every", True, lambda v: v >= 1, ">= 1"),
    ("threads", True, lambda v: v >= 1, ">= 1 (omit it for torch's default)"),
    ("stage1_threads", True, lambda v: v >= 1, ">= 1 (omit it for --threads)"),
)
_RANGE_OF = {name: (integer, ok, rule) for name, integer, ok, rule in _RANGES}
_FIELD_TYPES = typing.get_type_hints(Config)
_OPTIONAL = {n for n, tp in _FIELD_TYPES.items() if type(None) in typing.get_args(tp)}
_BOOLS = tuple(n for n, tp in _FIELD_TYPES.items() if tp is bool)
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")



def require_resolved(cfg, where: str) -> None:
    """A function below a run's entry takes a RunConfig: a plain Config here is a programming error
    (its derived fields are still None), caught before it computes with them."""
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"{where} takes a resolved config: pass cfg.resolved() (risda.trainer.config.RunConfig)")


def default_stage1_epochs(epochs: int) -> int:
    return int(0.8 * epochs)


@dataclass
class RunConfig(Config):
    """A Config resolved: every derived default filled in at construction (`Config.resolved()`, or
    `RunConfig.from_dict` of a recorded one), so a function that takes a RunConfig reads derived
    fields as given and never resolves again. The derived defaults and their sources:
    subset seed 0 (42 in the reference variant, the authors' seed), zero padding (reflect in the
    reference), 5 warm-up epochs of 200 (0 in the reference), stage I the first 80% of the
    epochs, lr milestones at 80% and 90%, 32×32 images for ResNet-32 (224 for ResNet-50), head =
    classes with more than 100 images on ImageNet-LT and iNaturalist (the paper), the graph
    source's default temperature, and the fields an arm pins (risda.trainer.arms)."""

    def __post_init__(self):
        reference = self.variant == "reference"
        if self.subset_seed is None:
            self.subset_seed = 42 if reference else 0
        if self.pad_mode is None:
            self.pad_mode = "reflect" if reference else "zeros"
        if self.warmup_epochs is None:
            self.warmup_epochs = 0 if reference else int(5 * self.epochs / 200)
        if self.stage1_epochs is None:
            self.stage1_epochs = default_stage1_epochs(self.epochs)
        if self.lr_milestones is None:
            self.lr_milestones = (int(0.8 * self.epochs), int(0.9 * self.epochs))
        if self.image_size is None:
            self.image_size = 224 if self.model == "resnet50" else 32
        if self.head_min_count is None and self.dataset in ("imagenetlt", "inat2018"):
            self.head_min_count = 100  # paper: classes with more than 100 images are head
        if self.graph_temperature is None:
            self.graph_temperature = DEFAULT_TEMPERATURE.get(self.graph_source, 1.0)
        for name, value in ARMS[self.arm].fixed.items() if self.arm in ARMS else ():
            setattr(self, name, value)
        self.lr_milestones = tuple(int(m) for m in self.lr_milestones)

    def resolved(self) -> "RunConfig":
        return self  # resolved at construction


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_field(name: str, value) -> None:
    """Raise ConfigError unless `value` is finite and in range for Config field `name`: the one
    rule behind validate(), a search space's bounds and choices, and grid values."""
    if name not in _RANGE_OF or (value is None and name in _OPTIONAL):
        return
    integer, ok, rule = _RANGE_OF[name]
    number = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and ok(value)):
        raise ConfigError(f"{_flag(name)} must be {'an integer ' if integer else ''}{rule}, got {value!r}")


def parse_field(name: str, text: str):
    """The typed value of Config field `name` read from text: the one parser behind the CLI
    flags, tune/search.py's --space and the ablation grid (--grid, spec values given as text).

    bool: true/false, yes/no, on/off, 1/0 (anything else is an error); `none` -> None for an
    optional field; a tuple (lr_milestones) from "160,180". Raises ConfigError naming the flag."""
    if name not in _FIELD_TYPES:
        raise ConfigError(f"unknown config field {name!r}: valid fields are {', '.join(f.name for f in fields(Config))}")
    tp, optional = _base_type(_FIELD_TYPES[name])
    base = typing.get_origin(tp) or tp
    s = str(text).strip()
    if optional and s.lower() == "none":
        return None
    if base is bool:
        if s.lower() in TRUE_WORDS + FALSE_WORDS:
            return s.lower() in TRUE_WORDS
        raise ConfigError(f"{_flag(name)} {text!r}: expected true or false (or yes/no, on/off, 1/0)")
    try:
        if base is tuple:
            return tuple(int(x) for x in s.split(",") if x.strip())
        return base(s)
    except ValueError:
        want = {int: "an integer", float: "a number", tuple: "comma-separated integers such as 160,180"}[base]
        raise ConfigError(f"{_flag(name)} {text!r}: expected {want}" + (" or none" if optional else "")) from None


# --- command line -----------------------------------------------------------------------
def _base_type(tp):
    """(type, optional) from an annotation such as `int | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parser_for(name: str):
    """argparse `type=` for a field: parse_field, with argparse's own error for a bad value
    ("argument --lr: invalid float value: 'x'")."""
    def parse(text):
        try:
            return parse_field(name, text)
        except ConfigError:
            raise ValueError(text) from None
    tp, _ = _base_type(_FIELD_TYPES[name])
    parse.__name__ = "comma-separated int" if (typing.get_origin(tp) or tp) is tuple else tp.__name__
    return parse


def add_config_args(parser: argparse.ArgumentParser, cls=Config, skip=()) -> None:
    """One flag per dataclass field; defaults are left as None-sentinels so that only the
    flags a user typed override a spec or a base config (see `config_overrides`)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group("run configuration (risda.trainer.config.Config)")
    for f in fields(cls):
        if f.name in skip:
            continue
        tp, _ = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "") + f" (default: {f.default})"
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        else:
            group.add_argument(flag, dest=f.name, type=_parser_for(f.name), default=argparse.SUPPRESS, help=help_, metavar=f.name.upper())


def config_overrides(args: argparse.Namespace, cls=Config) -> dict:
    """The config fields the user actually gave on the command line, on top of --preset's values."""
    names = {f.name for f in fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if given.get("preset") is not None:
        given = apply_preset(given)
    return given


def preset_config(name: str, **overrides) -> Config:
    """A Config with preset `name` (risda.trainer.presets) and `overrides` on top."""
    return Config(**apply_preset({"preset": name, **overrides}))
