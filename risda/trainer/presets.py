"""Named schedules (`--preset NAME`): plain dicts of Config field values.

The CLI applies a preset first and the flags typed beside it on top (`config.config_overrides`),
so `--preset imagenetlt-r50 --epochs 10` is the paper's ImageNet-LT recipe cut to 10 epochs.
In Python: `risda.trainer.config.preset_config("imagenetlt-r50", data_root=..., epochs=10)`.

Also the paper's own hyperparameters (`TABLE2`), which the search and the ablations start from.
This module imports nothing from risda: it is plain data.

Sources: the paper's "Results on ImageNet-LT / iNaturalist 2018" paragraphs and, where the
paper is silent, the authors' ImageNet-LT code as docs/method.md describes it. Guesses are marked.
"""
from __future__ import annotations

# Paper Table 2: the best (α, β) per CIFAR-100-LT imbalance factor λ.
TABLE2: dict[float, tuple[float, float]] = {200.0: (0.5, 1.0), 100.0: (0.5, 0.75), 50.0: (0.75, 1.0), 20.0: (0.75, 0.75),
                                             10.0: (0.5, 0.5)}

PRESETS: dict[str, dict] = {
    # Paper: ResNet-50, 100 epochs, SGD 0.1, momentum 0.9, wd 2e-4, 5 warm-up epochs,
    # lr x0.1 at 60 and 80, covariance transfer only (alpha = 0), beta = 7.5, head = >100 images.
    # Authors' code: CB-weighted CE from epoch 80 (stage II), diagonal covariance.
    # Batch size: not given by the paper; 128 (the iNat value) is our choice.
    "imagenetlt-r50": dict(
        dataset="imagenetlt", model="resnet50", image_size=224, imbalance=1.0,
        epochs=100, stage1_epochs=80, batch_size=128, lr=0.1, momentum=0.9, weight_decay=2e-4,
        warmup_epochs=5, lr_milestones=(60, 80), lr_decay=0.1,
        arm="cov_only", alpha=0.0, beta=7.5, covariance="diag", head_min_count=100,
    ),
    # Paper: ResNet-50, batch 128, 120 epochs, SGD 0.05, momentum 0.9, wd 1e-4, linear warm-up,
    # lr x0.1 at 60 and 80, covariance transfer only, head = >100 images.
    # Not given by the paper (our choices): 5 warm-up epochs, stage II from epoch 80 (as on
    # ImageNet-LT), beta = 7.5 (the ImageNet-LT value). A full 8,142-class 2048x2048
    # covariance does not fit a GPU (136 GB), hence diag.
    "inat2018-r50": dict(
        dataset="inat2018", model="resnet50", image_size=224, imbalance=1.0,
        epochs=120, stage1_epochs=80, batch_size=128, lr=0.05, momentum=0.9, weight_decay=1e-4,
        warmup_epochs=5, lr_milestones=(60, 80), lr_decay=0.1,
        arm="cov_only", alpha=0.0, beta=7.5, covariance="diag", head_min_count=100,
    ),
}


EPOCH_FIELDS = ("stage1_epochs", "warmup_epochs", "lr_milestones")


def apply_preset(given: dict) -> dict:
    """The preset's values, then every field in `given` on top (given['preset'] names it).

    Given --epochs but not the epoch-valued fields, those are scaled with it (as Config scales
    its own defaults): a 10-epoch imagenetlt-r50 warms up 0, decays at 6 and 8, stage II from 8.
    An unknown name is left for Config.validate() to report."""
    preset = dict(PRESETS.get(given.get("preset"), {}))
    if preset and "epochs" in given and given["epochs"] != preset["epochs"]:
        scale = given["epochs"] / preset["epochs"]
        for k in EPOCH_FIELDS:
            v = preset[k]
            preset[k] = tuple(int(m * scale) for m in v) if isinstance(v, tuple) else int(v * scale)
    return {**preset, **given}
