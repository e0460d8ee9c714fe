"""The data check a driver makes before Ray starts (tune/search.py for its one base config,
ablations/run.py for every planned cell): each distinct data configuration is built once on
the driver, so a wrong layout, a missing class folder or a long-tailed subset that leaves a
class empty is one line and exit 2 here, not the same traceback in every trial."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..trainer.config import Config, ConfigError, RunConfig
from ..trainer.data import load_long_tail

# What a cell's splits depend on (the rest of its config acts on training only).
DATA_FIELDS = ("dataset", "data_root", "download", "imbalance", "n_max", "val_per_class", "test_per_class", "subset_seed",
               "image_size", "cache_dir")


def on_cluster(address: str | None) -> bool:
    return bool(address or os.environ.get("RAY_ADDRESS"))


def check_data(cfg: RunConfig, need_val: str | None = None) -> dict:
    """Build cfg's splits once on the driver (an image cache is filled once too); their sizes
    and class count. need_val: the fix to name when the validation split is empty (a search
    tunes on it), or None when it may be."""
    import torch
    data = load_long_tail(cfg, torch.device("cpu"))
    if need_val is not None and (data.val is None or len(data.val) == 0):
        raise ConfigError(f"the validation split is empty; a search needs one: {need_val}")
    return {**data.info, "num_classes": data.num_classes}


def checkable(cfg: Config, address: str | None) -> bool:
    """Whether the driver can see cfg's data: always on an embedded Ray; on a cluster only when
    --data-root exists here too (a cluster's data may live on its nodes only)."""
    return not on_cluster(address) or Path(cfg.data_root).expanduser().exists()


def check_cells_data(configs: list[Config], address: str | None) -> int:
    """check_data for each distinct data configuration of `configs`; how many were checked.
    The first problem stops it (ConfigError, naming the cell's flags when cells differ)."""
    seen, resolved = set(), [cfg.resolved() for cfg in configs]  # the cells, resolved once here
    for c in resolved:
        key = json.dumps([getattr(c, f) for f in DATA_FIELDS])
        if key in seen or not checkable(c, address):
            continue
        seen.add(key)
        try:
            check_data(c)
        except ConfigError as e:
            varying = ", ".join(f"--{f.replace('_', '-')} {getattr(c, f)}" for f in ("imbalance", "n_max", "subset_seed")
                                if len({getattr(o, f) for o in resolved}) > 1)
            raise ConfigError(f"{e}" + (f" (the cell with {varying})" if varying else "")) from None
    return len(seen)
