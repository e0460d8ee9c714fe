"""The one configuration of a run, shared by the CLI, the trainer and the Ray trainable.

Every field is a command-line flag (`--batch-size`, `--n-max`, ...), generated from the
dataclass below, so there is exactly one list of options in the project.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields

DATASETS = ("cifar10lt", "cifar100lt", "imagefolder", "imagenetlt", "inat2018")
ARMS = ("risda", "no_reweight", "no_reasoning", "cov_only", "isda", "ce", "ce_drw")
VARIANTS = ("paper", "reference")
PRECISIONS = ("fp32", "bf16")
MODELS = ("resnet32", "resnet50")


class ConfigError(ValueError):
    """Bad input, caught before any expensive work starts. The message names the fix."""


@dataclass
class Config:
    preset: str | None = field(default=None, metadata={"help": "fill the paper's schedule for a dataset (risda.presets: imagenetlt-r50, inat2018-r50); flags given beside it win"})
    # --- data -------------------------------------------------------------------------
    dataset: str = field(default="cifar10lt", metadata={"help": f"one of {', '.join(DATASETS)}"})
    data_root: str = field(default="data", metadata={"help": "torchvision CIFAR folder, or an ImageFolder tree <root>/train/<class>/*, <root>/test/<class>/*; for imagenetlt/inat2018 the folder of their list/JSON files (risda.data_disk)"})
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
    precision: str = field(default="fp32", metadata={"help": "fp32 or bf16 (autocast)"})
    channels_last: bool = False
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    pad_mode: str | None = field(default=None, metadata={"help": "crop padding: zeros (default) or reflect (reference variant)"})
    # --- method -----------------------------------------------------------------------
    arm: str = field(default="risda", metadata={"help": f"one of {', '.join(ARMS)}"})
    variant: str = field(default="paper", metadata={"help": "paper (default) or reference (the authors' released code)"})
    alpha: float = field(default=0.5, metadata={"help": "strength of the reasoning prototype (eq. 6)"})
    beta: float = field(default=0.75, metadata={"help": "strength of the covariance (eq. 6)"})
    head_count: int = field(default=20, metadata={"help": "the largest classes that are head (no reasoning)"})
    head_min_count: int | None = field(default=None, metadata={"help": "instead of --head-count: classes with more than this many images are head"})
    cb_gamma: float = field(default=0.9999, metadata={"help": "γ of the class-balanced weights (eq. 12)"})
    covariance: str = field(default="full", metadata={"help": "full, diag or lowrank:K"})
    graph_topk: int | None = field(default=None, metadata={"help": "keep the k strongest neighbours per class in the knowledge graph (default: dense)"})
    # --- bookkeeping ------------------------------------------------------------------
    eval_every: int = 10
    checkpoint_every: int = 10
    out: str = "runs/default"
    resume: bool = field(default=False, metadata={"help": "continue from <out>/checkpoint.pt"})
    progress: bool = field(default=True, metadata={"help": "show a rich progress bar"})

    # ------------------------------------------------------------------------------
    def resolved(self) -> "Config":
        """A copy with every derived default filled in (what a run actually used)."""
        c = dataclasses.replace(self)
        reference = c.variant == "reference"
        if c.subset_seed is None:
            c.subset_seed = 42 if reference else 0
        if c.pad_mode is None:
            c.pad_mode = "reflect" if reference else "zeros"
        if c.warmup_epochs is None:
            c.warmup_epochs = 0 if reference else int(5 * c.epochs / 200)
        if c.stage1_epochs is None:
            c.stage1_epochs = int(0.8 * c.epochs)
        if c.lr_milestones is None:
            c.lr_milestones = (int(0.8 * c.epochs), int(0.9 * c.epochs))
        if c.image_size is None:
            c.image_size = 224 if c.model == "resnet50" else 32
        if c.head_min_count is None and c.dataset in ("imagenetlt", "inat2018"):
            c.head_min_count = 100  # paper: classes with more than 100 images are head
        c.lr_milestones = tuple(int(m) for m in c.lr_milestones)
        return c

    def validate(self) -> "Config":
        """Raise ConfigError naming the problem and the fix; returns self for chaining."""
        def bad(msg):
            raise ConfigError(msg)

        if self.dataset not in DATASETS:
            bad(f"unknown dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        if self.arm not in ARMS:
            bad(f"unknown arm {self.arm!r}: choose one of {', '.join(ARMS)}")
        if self.variant not in VARIANTS:
            bad(f"unknown variant {self.variant!r}: choose paper or reference")
        if self.precision not in PRECISIONS:
            bad(f"unknown precision {self.precision!r}: choose fp32 or bf16")
        if self.model not in MODELS:
            bad(f"unknown model {self.model!r}: choose one of {', '.join(MODELS)}")
        if self.pad_mode not in (None, "zeros", "reflect"):
            bad(f"unknown pad mode {self.pad_mode!r}: choose zeros or reflect")
        if not self.imbalance >= 1:
            bad(f"imbalance must be >= 1 (it is n_max / n_min), got {self.imbalance}")
        if self.n_max is not None and self.n_max < 1:
            bad(f"--n-max must be a positive number of images, got {self.n_max}")
        if self.epochs < 1:
            bad(f"--epochs must be >= 1, got {self.epochs}")
        s1 = self.resolved().stage1_epochs
        if not 0 <= s1 < self.epochs:
            bad(f"stage-I epochs ({s1}) must be in [0, epochs={self.epochs}): stage II needs at least one epoch; lower --stage1-epochs")
        if self.batch_size < 1:
            bad(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0:
            bad(f"--lr must be > 0 and --weight-decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}")
        if self.alpha < 0 or self.beta < 0:
            bad(f"--alpha and --beta must be >= 0, got alpha={self.alpha}, beta={self.beta}")
        if self.head_count < 0:
            bad(f"--head-count must be >= 0, got {self.head_count}")
        if not 0 <= self.cb_gamma < 1:
            bad(f"--cb-gamma must be in [0, 1), got {self.cb_gamma}")
        if self.val_per_class < 0:
            bad(f"--val-per-class must be >= 0, got {self.val_per_class}")
        if self.eval_every < 1 or self.checkpoint_every < 1:
            bad("--eval-every and --checkpoint-every must be >= 1")
        cov = self.covariance
        if not (cov in ("full", "diag") or (cov.startswith("lowrank:") and cov[8:].isdigit() and int(cov[8:]) > 0)):
            bad(f"unknown covariance {cov!r}: choose full, diag or lowrank:K with K > 0")
        if self.preset is not None:
            from .presets import PRESETS
            if self.preset not in PRESETS:
                bad(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        if self.graph_topk is not None and self.graph_topk < 1:
            bad(f"--graph-topk must be >= 1, got {self.graph_topk}")
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


# --- command line -----------------------------------------------------------------------
def _base_type(tp):
    """(type, optional) from an annotation such as `int | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parser_for(tp, optional):
    base = typing.get_origin(tp) or tp
    if base is tuple:
        def parse(s):
            return None if optional and s.lower() == "none" else tuple(int(x) for x in s.split(",") if x)
        return parse
    def parse(s):
        return None if optional and s.lower() == "none" else base(s)
    return parse


def add_config_args(parser: argparse.ArgumentParser, cls=Config, skip=()) -> None:
    """One flag per dataclass field; defaults are left as None-sentinels so that only the
    flags a user typed override a spec or a base config (see `config_overrides`)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group("run configuration (risda.config.Config)")
    for f in fields(cls):
        if f.name in skip:
            continue
        tp, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "") + f" (default: {f.default})"
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        else:
            group.add_argument(flag, dest=f.name, type=_parser_for(tp, optional), default=argparse.SUPPRESS, help=help_, metavar=f.name.upper())


def config_overrides(args: argparse.Namespace, cls=Config) -> dict:
    """The config fields the user actually gave on the command line, on top of --preset's values."""
    names = {f.name for f in fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if given.get("preset") is not None:
        from .presets import apply_preset
        given = apply_preset(given)
    return given
