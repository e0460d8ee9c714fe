"""Hyperparameter search: the trainer, unchanged, as Ray Tune trials that Optuna (TPE) steers.

    python tune/search.py --dataset cifar100lt --data-root data --imbalance 100 --num-samples 32

It tunes what the paper tuned by hand (α, β: Table 2 and Fig. 4; head_count: Fig. 5) on a
balanced validation split held out of the training pool, never on the test set: the
search metric is the validation error of each trial's final model. Test errors (overall,
many/medium/few) are recorded beside it.

Every run flag of `python -m risda.train` is accepted (they come from risda.trainer.config). A
run flag that names a searched parameter fixes it (`--head-count 20` searches α, β only).

Seeds: every trial uses the same data subset (--subset-seed) and, by default, the same
model seed (--seed): trials then differ only in their hyperparameters (common random
numbers), which makes TPE's comparisons less noisy. Search over seeds with --space
"seed=0|1|2,..." if you want that noise in the search.

Runs on an embedded local Ray unless --address / RAY_ADDRESS names a cluster. Re-running
the same command (same --name, default derived from the flags) resumes the experiment:
finished trials are kept, unfinished ones continue from their last checkpoint, the Optuna
sampler continues from its saved state. --restart starts over.

Outputs in results/<name>/: trials.parquet (one row per trial, failed ones included),
epochs.parquet (one row per trial per evaluated epoch), best.json (the best config; feed it
to the ablation runner with --config, or retrain the trial with `python -m risda.train --config`),
and the figures (risda.runner.search_figures): alpha_beta.png, history.png, slice.png.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import time
import typing
from dataclasses import fields
from pathlib import Path

import ray
from ray import tune
from rich.markup import escape
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from ..trainer.checkpoint import RESUMABLE_CHANGES
from ..trainer.config import Config, ConfigError, RunConfig, add_config_args, check_field, config_overrides, parse_field
from ..trainer.data import NUM_CLASSES
from ..trainer.evaluate import error_names
from ..trainer.failures import writing
from ..trainer.presets import TABLE2
from ..trainer.progress import set_log_every
from ..trainer.stage1 import BOOKKEEPING_FIELDS, STAGE2_FIELDS, shares_stage1
from ..trainer.storage import read_text, write_text
from .address import resolve_address
from .cluster import (add_runner_args, check_writable, cluster_summary, experiment_uri, init_ray, quiet_tune,
                      remove_trial_scratch, restore_or_new_tuner, storage_uri, trial_resources)
from .collate import RESULTS_INTACT, Outcome, best_trial, collate, write_parquet
from .datacheck import check_data, checkable
from .exits import failure_exit
from .headwatch import watch_head
from .lock import hold_experiment
from .progress import RichProgress, driver_console, print_top
from .results_owner import check_results_owner
from .retry import NoRetryWhenDiverged, max_failures
from .search_figures import write_search_figures
from .trackers import check_trackers, tracker_callbacks
from .stage1 import Stage1Failed, Stage1Interrupted, check_stage1, describe_stage1, ensure_stage1, stage1_cache_root
from .trainables import STAGE1_CACHE_KEY, absolute_paths, train_trial, trial_dirname

METRIC, MODE = "val_error", "min"
# The paper's ranges on CIFAR-100-LT (Fig. 4, Fig. 5). head_count is a share of the classes:
# 10-40 of 100 there, so 1-4 of CIFAR-10's 10 (10 or more would make every class head).
DEFAULT_SPACE = "alpha=0.25:1.5, beta=0.25:1.5, head_count=10|20|30|40"
HEAD_SHARES = (0.1, 0.2, 0.3, 0.4)
PAPER_HEAD_SHARE = 0.2  # 20 head classes of 100
DEFAULT_VAL_PER_CLASS = 20  # ImageNet-LT has its own validation list and keeps 0
IDENTITY_FILE = "risda_search.json"  # beside Ray's experiment state: what the experiment is
# Run flags a trial controls itself (its own out dir, no progress bar, Tune's checkpoints, the
# threads of the CPUs Ray reserved).
TRIAL_MANAGED = ("out", "resume", "progress", "threads", "stage1_threads")
# How the best trial ran, beside its config in best.json (`python -m risda.train --config best.json`
# replays it with them): fp32 rounding on a CPU depends on the thread count, and a shared stage I
# (risda.runner.stage1) may have had more CPUs than the stage-II trials.
RAN_WITH = ("torch_threads", "compile", "stage1_torch_threads", "stage1_compile")
CHANCE_MARGIN = 1.0  # points of validation error: a best trial this close to a guess is flagged (at_chance)


# --- the search space --------------------------------------------------------------------------
def field_type(name: str) -> type:
    """int, float, str or bool of a Config field (`int | None` -> int)."""
    hint = typing.get_type_hints(Config)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def parse_value(name: str, text: str):
    """A --space choice in its field's type: risda.trainer.config.parse_field ('flase' is an error, 'none' is None)."""
    return parse_field(name, text)


def parse_space(text: str) -> dict[str, str]:
    """'alpha=0.25:1.5, head_count=10|20' or a file with one such entry a line (# comments)
    -> {name: spec}. A spec is lo:hi (uniform; int fields give integers), lo:hi:log, or
    a|b|c (a choice). Names are Config fields."""
    path = Path(text).expanduser()
    if path.is_file():
        text = ",".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
    names = {f.name for f in fields(Config)}
    space = {}
    for item in filter(None, (s.strip() for s in text.replace("\n", ",").split(","))):
        name, eq, spec = (s.strip() for s in item.partition("="))
        if not eq or not spec:
            raise ConfigError(f"--space entry {item!r} is not name=lo:hi, name=lo:hi:log or name=a|b|c")
        if name not in names:
            raise ConfigError(f"--space names {name!r}, which is not a run setting; choose from: {', '.join(sorted(names))}")
        if name in TRIAL_MANAGED:
            raise ConfigError(f"--space cannot search {name!r}: each trial sets it itself")
        space[name] = spec
        optuna_distribution(name, spec)  # fail now on a bad spec, not inside the searcher
    if not space:
        raise ConfigError("--space is empty: give at least one name=spec")
    return space


def optuna_distribution(name: str, spec: str):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    try:
        if "|" in spec:
            choices = [parse_value(name, v) for v in spec.split("|")]
            for v in choices:
                check_field(name, v)
            return CategoricalDistribution(choices)
        lo, hi, *log = spec.split(":")
        if log not in ([], ["log"]) or field_type(name) not in (int, float):
            raise ValueError
        lo, hi = parse_value(name, lo), parse_value(name, hi)
        check_field(name, lo)  # finite and in the field's range, as a run flag is
        check_field(name, hi)
        if field_type(name) is int:
            return IntDistribution(lo, hi, log=bool(log))
        return FloatDistribution(lo, hi, log=bool(log))
    except ConfigError as e:  # a value the field cannot take (nesterov=true|flase, alpha=0:nan, lr=0:1)
        raise ConfigError(f"--space {name}={spec}: {e}") from None
    except (ValueError, TypeError):
        raise ConfigError(f"--space {name}={spec}: expected lo:hi, lo:hi:log (numeric fields) or a|b|c "
                          f"of {field_type(name).__name__} values (low <= high, log needs low > 0)") from None


def in_space(dist, value) -> bool:
    if hasattr(dist, "choices"):
        return value in dist.choices
    return dist.low <= value <= dist.high


def head_counts(num_classes: int, shares=HEAD_SHARES) -> list[int]:
    return sorted({max(1, round(f * num_classes)) for f in shares})


def default_space(cfg: RunConfig, num_classes: int) -> dict[str, str]:
    """α, β as in the paper; head_count as 10-40% of the classes, unless head classes are
    chosen by size (--head-min-count; ImageNet-LT, iNaturalist), where it does nothing."""
    space = parse_space(DEFAULT_SPACE)
    if cfg.head_min_count is None:
        space["head_count"] = "|".join(map(str, head_counts(num_classes)))
    else:
        del space["head_count"]
    return space


def paper_point(imbalance: float, space: dict, num_classes: int = 100) -> dict | None:
    """Table 2's (α, β, 20% of the classes as head) for this imbalance factor, restricted to
    the searched names whose paper value lies in the space; None when Table 2 has no such λ."""
    if imbalance not in TABLE2:
        return None
    alpha, beta = TABLE2[imbalance]
    point = {"alpha": alpha, "beta": beta, "head_count": head_counts(num_classes, [PAPER_HEAD_SHARE])[0]}
    point = {k: v for k, v in point.items() if k in space and in_space(optuna_distribution(k, space[k]), v)}
    return point or None


# --- the parts of the experiment ---------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="run configuration flags fix the settings every trial shares; "
                                       f"--val-per-class defaults to {DEFAULT_VAL_PER_CLASS} here")
    s = p.add_argument_group("search")
    s.add_argument("--num-samples", type=int, default=16, help="trials to run (default: 16)")
    s.add_argument("--space", default=None, help=f"what to search: 'name=lo:hi, name=lo:hi:log, name=a|b|c' or a file "
                                                 f"with one entry a line (default: '{DEFAULT_SPACE}' on CIFAR-100, "
                                                 f"head_count 10-40%% of the classes elsewhere; minus the names fixed by run flags)")
    s.add_argument("--search-seed", type=int, default=0, help="seed of the TPE sampler (default: 0)")
    s.add_argument("--enqueue-paper", action=argparse.BooleanOptionalAction, default=True,
                   help="run the paper's Table 2 point for --imbalance as the first trial (default: on)")
    s.add_argument("--scheduler", choices=("asha", "none"), default="asha", help="early stopping (default: asha)")
    s.add_argument("--grace-period", type=int, default=None,
                   help="ASHA: stage-II epochs before a trial can be stopped (default: the first evaluated epoch of "
                        "stage II; ASHA's time axis and budget count stage-II epochs)")
    s.add_argument("--max-concurrent", type=int, default=4, help="trials running at once, 0 = as many as fit (default: 4)")
    s.add_argument("--optuna-storage", default=None, help="persist the Optuna study: sqlite:///study.db (any SQLAlchemy URL) "
                                                          "or a journal file path, for optuna-dashboard and friends")
    add_runner_args(p, default_name="search-<dataset>-<arm>-lt<imbalance>")
    add_config_args(p, skip=TRIAL_MANAGED)
    return p.parse_args(argv)


def base_config(args) -> Config:
    """The settings every trial shares: run flags over the search defaults."""
    given = config_overrides(args)
    dataset = given.get("dataset", Config.dataset)
    defaults = {} if dataset == "imagenetlt" else {"val_per_class": DEFAULT_VAL_PER_CLASS}
    cfg = absolute_paths(Config(**{**defaults, **given}).validate())
    if cfg.val_per_class == 0 and cfg.dataset != "imagenetlt":
        raise ConfigError("a validation split is mandatory for search (it tunes on validation, never on test): "
                          f"pass --val-per-class N (e.g. {DEFAULT_VAL_PER_CLASS})")
    return cfg


def search_space(args, given: dict, cfg: RunConfig, num_classes: int) -> dict[str, str]:
    """--space, or the default space minus the names a run flag fixed; refused (ConfigError)
    when that leaves nothing to search (`check_something_to_search`)."""
    if args.space is None:
        space = {k: v for k, v in default_space(cfg, num_classes).items() if k not in given}
        fixed = [k for k in default_space(cfg, num_classes) if k in given]
        check_something_to_search(space, "--" + ", --".join(f.replace("_", "-") for f in fixed) + " fix")
        return space
    space = parse_space(args.space)
    clash = sorted(set(space) & set(given))
    if clash:
        raise ConfigError(f"{', '.join('--' + c.replace('_', '-') for c in clash)} fixes what --space searches; drop one of them")
    check_something_to_search(space, f"--space {args.space!r} gives one value for")
    return space


def check_something_to_search(space: dict[str, str], why: str) -> None:
    """A search whose every parameter is fixed is refused, before anything trains. Its trials
    would all train the same config with the same seeds (common random numbers): N copies of
    one run, which Optuna learns nothing from; that one run is `python -m risda.train`."""
    if any(single_valued(optuna_distribution(k, v)) is False for k, v in space.items()):
        return
    raise ConfigError(f"nothing to search: {why} every parameter of the search space, so every trial would train the "
                      f"same config; leave one to the search (or pass --space, e.g. 'alpha=0.25:1.5'), or train that "
                      f"one config with `python -m risda.train`")


def single_valued(dist) -> bool:
    if hasattr(dist, "choices"):
        return len(set(map(repr, dist.choices))) == 1
    return dist.low == dist.high


def default_name(cfg: Config) -> str:
    return f"search-{cfg.dataset}-{cfg.arm}-lt{cfg.imbalance:g}"


def default_grace_period(cfg: RunConfig) -> int:
    """The first evaluated epoch of stage II, in stage-II epochs: α, β and head_count act only
    in stage II, so before it every trial is the same run and ASHA would compare noise."""
    c = cfg
    first = next(e + 1 for e in range(c.stage1_epochs, c.epochs) if (e + 1) % c.eval_every == 0 or e + 1 == c.epochs)
    return first - c.stage1_epochs


def optuna_file(spec: str) -> Path | None:
    """The file of a sqlite URL or a journal, relative to where the command runs; None for a server URL."""
    if spec.startswith("sqlite:///"):
        return Path(spec[len("sqlite:///"):]).expanduser().resolve()
    return None if "://" in spec else Path(spec.removeprefix("journal:")).expanduser().resolve()


def check_optuna_storage(spec: str | None):
    """Before anything trains: an existing study file or a server is opened and read (a corrupt
    one is one line, ConfigError, exit 2); a file that does not exist yet must be creatable,
    and nothing is created now (a refused search leaves nothing behind). The opened storage, or None."""
    if not spec:
        return None
    path = optuna_file(spec)
    if path is not None and not path.exists():
        check_writable(path.parent, "--optuna-storage")
        return None
    return optuna_storage(spec)


def optuna_storage(spec: str | None):
    """None (in memory, saved with Ray's searcher state), an RDB URL, or a journal file, opened
    (a new file's folder created) and read once."""
    if not spec:
        return None
    import optuna
    path = optuna_file(spec)
    try:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        if path is None or spec.startswith("sqlite:///"):
            storage = optuna.storages.RDBStorage(f"sqlite:///{path}" if path is not None else spec)
        else:
            from optuna.storages.journal import JournalFileBackend
            storage = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        optuna.get_all_study_summaries(storage)  # reads it: a corrupt file fails here, not after stage I
        return storage
    except Exception as e:  # SQLAlchemy's (a corrupt file, bad URL, missing driver, unreachable server), a bad journal
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = f" ({path})" if path is not None and str(path) not in spec else ""
        raise ConfigError(f"--optuna-storage {spec}{where} cannot be read ({type(e).__name__}: {first}); move the file "
                          f"aside (Optuna cannot read it) or pass another --optuna-storage") from None


def check_fresh_study(storage, name: str, continuing: bool, restart: bool) -> None:
    """A new experiment needs a new study: an existing one of that name is refused unless
    --restart (which deletes it when the new experiment starts: `fresh_study`); TPE would
    otherwise learn from trials this experiment never ran."""
    if storage is None or continuing or restart:
        return
    import optuna
    if name in [s.study_name for s in optuna.get_all_study_summaries(storage)]:
        raise ConfigError(f"the Optuna storage already holds a study named {name!r} but there is no Ray experiment to "
                          f"resume; pass --restart to delete the study, or choose another --name")


def fresh_study(storage, name: str, restart: bool) -> None:
    """With --restart, delete the study of this name (check_fresh_study refused it otherwise)."""
    if storage is None:
        return
    import optuna
    if restart and name in [s.study_name for s in optuna.get_all_study_summaries(storage)]:
        optuna.delete_study(study_name=name, storage=storage)


class EvaluatedOptunaSearch(OptunaSearch):
    """OptunaSearch that hears only the reports carrying the metric: trials report every epoch,
    the validation error only on evaluated ones (OptunaSearch would raise a KeyError). A
    top-level class of an importable module: Ray pickles the searcher with the experiment.

    A trial that fails is not told to Optuna: its Optuna trial stays RUNNING (TPE learns from
    finished trials only), so that when --retry-errored continues it, its completion tells
    Optuna the real value. OptunaSearch would tell FAIL (or COMPLETE with the last evaluated
    epoch's value, as if that were the final one), then ignore the retried trial's reports
    ("already finished"). A trial that fails for good stays RUNNING in the study."""

    def on_trial_result(self, trial_id: str, result: dict):
        if self.metric in result and trial_id in self._ot_trials:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if error or trial_id not in self._ot_trials:
            return
        super().on_trial_complete(trial_id, result=result, error=False)


class RetryingConcurrencyLimiter(ConcurrencyLimiter):
    """ConcurrencyLimiter that passes on the completion of a trial it no longer tracks: it drops
    a trial from its count when the trial fails, so the completion of that trial continued by
    --retry-errored would otherwise never reach the searcher."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id not in self.live_trials:
            return self.searcher.on_trial_complete(trial_id, result=result, error=error)
        return super().on_trial_complete(trial_id, result=result, error=error)


def make_search_alg(space: dict, args, cfg: Config, storage, name: str, point: dict | None):
    import optuna
    # TPE starts with random trials (Optuna's default: 10); with a small budget, half of it.
    sampler = optuna.samplers.TPESampler(seed=args.search_seed, n_startup_trials=min(10, max(1, args.num_samples // 2)))
    searcher = EvaluatedOptunaSearch(space={k: optuna_distribution(k, v) for k, v in space.items()}, metric=METRIC, mode=MODE,
                                     points_to_evaluate=[point] if point else None, sampler=sampler,
                                     storage=storage, study_name=name)
    return RetryingConcurrencyLimiter(searcher, max_concurrent=args.max_concurrent) if args.max_concurrent > 0 else searcher


def make_scheduler(args, cfg: RunConfig):
    if args.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler
    grace = args.grace_period or default_grace_period(cfg)
    stage2 = cfg.epochs - cfg.stage1_epochs
    if not 1 <= grace <= stage2:
        raise ConfigError(f"--grace-period must be in [1, {stage2}] (stage-II epochs), got {grace}")
    # Stage-II epochs, the only ones in which trials differ; ASHA skips the reports between
    # evaluations (they carry no val_error).
    return ASHAScheduler(time_attr="stage2_epochs_done", max_t=stage2, grace_period=grace)


def experiment_identity(cfg: Config, space: dict, args) -> dict:
    """What the experiment is (everything but where it runs): a resumed experiment must be
    the same, because Tuner.restore keeps the original settings whatever the flags say."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES}
    return dict(config=config, space=space, metric=METRIC, num_samples=args.num_samples, search_seed=args.search_seed,
                enqueue_paper=args.enqueue_paper, scheduler=args.scheduler, grace_period=args.grace_period,
                max_concurrent=args.max_concurrent, cpus_per_trial=args.cpus_per_trial,
                gpus_per_trial=args.gpus_per_trial, max_failures=args.max_failures, shared_stage1=args.shared_stage1)


def saved_identity(path: str) -> dict:
    """The identity an experiment was created with ({} for one older than the file)."""
    text = read_text(f"{path}/{IDENTITY_FILE}")
    return {} if text is None else json.loads(text)


def check_same_experiment(path: str, identity: dict) -> None:
    saved = saved_identity(path)
    if not saved:
        return
    now = json.loads(json.dumps(identity))  # same JSON types (tuples -> lists) as the saved one
    diffs = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if k != "config" and saved.get(k) != now[k]]
    diffs += [f"--{k.replace('_', '-')}: {saved['config'].get(k)!r} -> {v!r}"
              for k, v in now["config"].items() if saved.get("config", {}).get(k) != v]
    if diffs:
        raise ConfigError(f"experiment {path} was started with other settings ({'; '.join(diffs)}). Ray resumes an "
                          f"experiment as it was created: rerun with the original flags, add --restart to start over, "
                          f"or pick another --name")


def stage1_configs(cfg: RunConfig, space: dict, args, console) -> list[Config] | None:
    """The base configs whose stage Is the trials will fork, or None for independent trials.

    The searched names normally act in stage II only: one stage I serves every trial. A searched
    stage-I field with a few choices (seed=0|1|2) means one stage I per choice; a continuous one
    means a new stage I per trial, which sharing cannot save: then every trial trains its own."""
    if not args.shared_stage1 or not shares_stage1(cfg):
        return None
    stage1_names = [k for k in space if k not in STAGE2_FIELDS | BOOKKEEPING_FIELDS]
    dists = {k: optuna_distribution(k, space[k]) for k in stage1_names}
    continuous = [k for k, d in dists.items() if not hasattr(d, "choices")]
    if continuous:
        console.log(f"note: {', '.join(continuous)} change stage I and are searched over a range: every trial "
                    f"trains its own stage I (sharing saves nothing there)")
        return None
    choices = [[(k, v) for v in d.choices] for k, d in dists.items()]
    return [Config(**{**cfg.to_dict(), **dict(combo)}) for combo in itertools.product(*choices)]


# --- outputs ---------------------------------------------------------------------------------------
def chance_error(num_classes: int) -> float:
    """The top-1 error of a guess, in percent, on a balanced split (the validation split is)."""
    return 100 * (1 - 1 / num_classes)


def at_chance(value, num_classes: int) -> bool:
    """A validation error within CHANCE_MARGIN points of a guess's: the trial learned nothing."""
    return value is not None and value >= chance_error(num_classes) - CHANCE_MARGIN


def write_results(grid, out: Path, params: list[str], info: dict, stage1=None, distributions=None,
                  num_classes: int | None = None) -> tuple:
    """trials.parquet, epochs.parquet, stage1.parquet, the figures of the search over `distributions`
    (risda.runner.search_figures) and best.json in `out`; returns (trials, best row, figures). best.json
    comes only from a trial that ran all its epochs, and says how many did; with none, an earlier
    best.json is removed rather than left looking current. It says `at_chance` when even the best
    trial is no better than a guess (num_classes given)."""
    trials, epochs = collate(grid, metric=METRIC, params=params)
    for k in ("search_seed", "experiment"):
        trials[k] = info[k]
    if stage1 is not None:
        write_parquet(stage1, out / "stage1.parquet")
        # A trial ASHA stopped never sent its summary; its stage I's cost is in the stage-I table.
        cost = dict(zip(stage1["stage1_key"], stage1["wall_time_s"]))
        trials["stage1_wall_time_s"] = trials["stage1_key"].map(cost)
    write_parquet(trials, out / "trials.parquet")
    write_parquet(epochs, out / "epochs.parquet")
    figures = write_search_figures(trials, distributions, out) if distributions else []
    best = best_trial(trials, METRIC)
    best_path = out / "best.json"
    if best is None:
        best_path.unlink(missing_ok=True)
        return trials, None, figures
    ok = trials[trials["completed"] & (trials["status"] == "TERMINATED")]
    summary = json.loads(best["summary"]) if isinstance(best.get("summary"), str) else {}
    best_json = {
        "config": json.loads(best["config"]), "params": {p: _plain(best[p]) for p in params},
        "metric": METRIC, "value": _plain(best[f"final_{METRIC}"]), "completed": True,
        "trial_id": best["trial_id"], **{k: _plain(best[f"final_{k}"]) for k in error_names("test_")},
        "stage1_key": _plain(best.get("stage1_key")), **{k: _plain(summary.get(k)) for k in RAN_WITH},
        "trials_completed": int(len(ok)), "trials_requested": info["num_samples"],
        "trials_failed": int((trials["status"] == "ERROR").sum()), **info,
        **({"at_chance": at_chance(_plain(best[f"final_{METRIC}"]), num_classes),
            "chance_error": chance_error(num_classes)} if num_classes else {})}
    tmp = out / "best.json.tmp"
    with writing(best_path, RESULTS_INTACT, tmp):  # a full disk: one line, no .tmp left (risda.trainer.failures)
        tmp.write_text(json.dumps(best_json, indent=2))
        tmp.replace(best_path)
    return trials, best, figures


def _plain(v):
    """numpy scalars and NaN -> JSON."""
    if hasattr(v, "item"):
        v = v.item()
    return None if isinstance(v, float) and v != v else v


# --- main ------------------------------------------------------------------------------------------
def main(argv=None, trainable=None) -> int:
    """Run (or resume) the search; `trainable` replaces trainables.train_trial (tests only).

    Exit codes: 0 every requested trial finished (ran its epochs, or ASHA stopped it); 1 some
    failed or are unfinished (the message says how many); 2 bad input; 130 interrupted (the
    state is saved: rerun the same command)."""
    console = driver_console(stderr=True)
    # Tune warns when checkpoints force frequent state snapshots: they are what make resuming exact.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Trials report every epoch; the metric only on evaluated ones.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    args = parse_args(argv)
    set_log_every(args.log_every)  # plain progress lines (risda.runner.progress)
    quiet_tune(args.debug)  # no Tune tracebacks or boxes in the log (risda.runner.cluster)
    given_max_failures = args.max_failures
    args.max_failures = max_failures(args.max_failures, args.address)  # 2 on a cluster (risda.runner.retry)
    owns_ray = False
    started = time.time()
    held = contextlib.ExitStack()
    try:
        cfg = base_config(args)
        run = cfg.resolved()  # the driver's entry: what every trial's config resolves to, but the searched names
        check_trackers(args.tracker)  # a missing extra: one line, before anything starts
        name = args.name or default_name(cfg)
        args.address = resolve_address(args.address)  # `auto`, a dead head: one line first (risda.runner.address)
        storage = storage_uri(args.storage)
        check_writable(storage, "--storage")
        path = experiment_uri(storage, name)
        out = Path(args.results).expanduser().resolve() / name
        check_writable(out, "--results")  # creates nothing: a refusal leaves no empty folder
        continuing = not args.restart and tune.Tuner.can_restore(path)
        check_results_owner(out, path, new=not continuing, restart=args.restart)  # nothing replaced unasked
        given = config_overrides(args)
        search_space(args, given, cfg, NUM_CLASSES.get(cfg.dataset, 100))  # the plan, before the data is read
        held.enter_context(hold_experiment(storage, name))  # one driver per experiment (risda.runner.lock)
        num_classes = NUM_CLASSES.get(cfg.dataset, 100)
        if checkable(cfg, args.address):  # bad data: one line before Ray starts (risda.runner.datacheck)
            data_info = check_data(run, need_val=f"pass --val-per-class N (e.g. {DEFAULT_VAL_PER_CLASS})")
            num_classes = data_info["num_classes"]
            console.log(f"data: {data_info['train_size']} train / {data_info['val_size']} val / "
                        f"{data_info['test_size']} test images, {num_classes} classes ({data_info['source']})")
        space = search_space(args, given, run, num_classes)
        point = paper_point(cfg.imbalance, space, num_classes) if args.enqueue_paper else None
        params = list(space)
        if continuing and given_max_failures is None:  # resumed elsewhere (a laptop, a cluster): Tune keeps its retries
            args.max_failures = saved_identity(path).get("max_failures", args.max_failures)
        identity = experiment_identity(cfg, space, args)
        if continuing:
            check_same_experiment(path, identity)
        shared = stage1_configs(run, space, args, console)
        cache_root = stage1_cache_root(args.stage1_cache, storage) if shared else None
        make_scheduler(args, run)  # a bad --grace-period fails before Ray starts
        study_storage = check_optuna_storage(args.optuna_storage)  # a corrupt study file: one line, before stage I
        check_fresh_study(study_storage, name, continuing, args.restart)
        stage1_plan = None
        if shared:
            check_writable(cache_root, "--stage1-cache")
            stage1_plan = check_stage1(shared, cache_root, say=lambda line: console.log(escape(line)))  # verified
        if not continuing:  # a new experiment: an older best.json is not its result
            (out / "best.json").unlink(missing_ok=True)
        owns_ray = not ray.is_initialized()  # set first: a ray.init interrupted halfway is shut down too
        held.enter_context(watch_head(args.address, path))  # a lost head: one line, exit 1 (risda.runner.headwatch)
        init_ray(args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus, logging_level="warning")
        resources = trial_resources(args.cpus_per_trial, args.gpus_per_trial)
        console.log(f"ray: {cluster_summary()}; per trial {resources}")
        stage1 = None
        if shared:
            stage1 = ensure_stage1(stage1_plan, cache_root, storage, name, resources, args.max_failures)
            console.log(describe_stage1(stage1))
        train = tune.with_resources(trainable or train_trial, resources)
        study_storage = study_storage or optuna_storage(args.optuna_storage)  # a new study file: created now
        param_space = {**cfg.to_dict(), **({STAGE1_CACHE_KEY: cache_root} if cache_root else {})}

        def new_tuner():
            fresh_study(study_storage, name, args.restart)
            return tune.Tuner(
                train, param_space=param_space,
                tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, num_samples=args.num_samples, reuse_actors=True,
                                            search_alg=make_search_alg(space, args, cfg, study_storage, name, point),
                                            scheduler=make_scheduler(args, run),
                                            trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(
                    name=name, storage_path=storage, verbose=0,
                    callbacks=[NoRetryWhenDiverged(), RichProgress(args.num_samples, METRIC, params),
                               *tracker_callbacks(args.tracker, name, out)],
                    failure_config=tune.FailureConfig(max_failures=args.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))

        tuner, restored = restore_or_new_tuner(path, train, new_tuner, restart=args.restart,
                                               retry_errored=args.retry_errored)
        if not restored:
            write_text(f"{path}/{IDENTITY_FILE}", json.dumps(identity, indent=1))
        console.log(f"{'resuming' if restored else 'new'} experiment {path}: {args.num_samples} trials over "
                    + ", ".join(f"{k}={v}" for k, v in space.items())
                    + (f"; first trial: paper Table 2 point {point}" if point and not restored else ""))
        grid = remove_trial_scratch(tuner.fit())  # what killed trials left in the temp folder
        trials, best, figures = write_results(grid, out, params, dict(search_seed=args.search_seed, experiment=path, name=name,
                                                                      num_samples=args.num_samples), stage1,
                                              {k: optuna_distribution(k, v) for k, v in space.items()}, num_classes)
    except Stage1Interrupted as e:
        console.print(f"[yellow]interrupted:[/yellow] {e}")
        return 130
    except (ConfigError, Stage1Failed) as e:
        if args.debug:
            raise
        console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)  # one line, however long
        return 2 if isinstance(e, ConfigError) else 1
    except Exception as e:  # a runtime failure on the driver: one line (risda.runner.exits), else the traceback
        return failure_exit(e, console, args.debug)
    finally:
        if owns_ray:
            ray.shutdown()
        held.close()
    print_top(trials, METRIC, params, title=f"{name}: top trials by final {METRIC}")
    outcome = Outcome.of(trials, args.num_samples)
    if best is not None:
        shown = ", ".join(f"{p}={v:.4g}" if isinstance(v, float) else f"{p}={v}" for p, v in ((p, _plain(best[p])) for p in params))
        console.print(f"best of {outcome.done} finished trial(s): {shown}  {METRIC} {best[f'final_{METRIC}']:.2f}  "
                      f"test {best['final_test_error']:.2f}  -> {out / 'best.json'}")
        if at_chance(_plain(best[f"final_{METRIC}"]), num_classes):
            console.print(f"[yellow]warning:[/yellow] even the best trial is at chance level ({METRIC} "
                          f"{best[f'final_{METRIC}']:.2f}; a guess among {num_classes} classes gets "
                          f"{chance_error(num_classes):.1f}): no trial learned anything, so best.json (marked at_chance) "
                          f"is no tuned setting; give the trials more epochs or data, or check --lr", soft_wrap=True)
    else:
        console.print("[red]no trial ran all its epochs: no best.json[/red]")
    console.print(f"wrote {out}/trials.parquet, epochs.parquet{', stage1.parquet' if stage1 is not None else ''}"
                  f"{', best.json' if best is not None else ''}{''.join(', ' + f.name for f in figures)} "
                  f"({len(trials)} trials, {time.time() - started:.0f}s)")
    return outcome.report(console, retry_hint=True)
