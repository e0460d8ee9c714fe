"""Hyperparameter search: the trainer, unchanged, as Ray Tune trials that Optuna (TPE) steers.

    python tune/search.py --dataset cifar100lt --data-root data --imbalance 100 --num-samples 32

It tunes what the paper tuned by hand (α, β: Table 2 and Fig. 4; head_count: Fig. 5) on a
balanced validation split held out of the training pool, never on the test set: the
search metric is the validation error of each trial's final model. Test errors (overall,
many/medium/few) are recorded beside it.

Every run flag of `python -m risda.train` is accepted (they come from risda.config). A
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
to the ablation runner with --config).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import typing
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a fresh clone without `pip install -e .`

from risda import raytune  # noqa: E402
from risda.checkpoint import RESUMABLE_CHANGES  # noqa: E402
from risda.config import Config, ConfigError, add_config_args, config_overrides  # noqa: E402

METRIC, MODE = "val_error", "min"
# The paper's ranges on CIFAR-100-LT (Fig. 4, Fig. 5). head_count is a share of the classes:
# 10-40 of 100 there, so 1-4 of CIFAR-10's 10 (10 or more would make every class head).
DEFAULT_SPACE = "alpha=0.25:1.5, beta=0.25:1.5, head_count=10|20|30|40"
HEAD_SHARES = (0.1, 0.2, 0.3, 0.4)
PAPER_HEAD_SHARE = 0.2  # 20 head classes of 100
# Paper Table 2 (CIFAR-100-LT): imbalance factor -> (α, β).
PAPER_TABLE2 = {200: (0.5, 1.0), 100: (0.5, 0.75), 50: (0.75, 1.0), 20: (0.75, 0.75), 10: (0.5, 0.5)}
CLASSES = {"cifar10lt": 10, "cifar100lt": 100}  # when the driver cannot see the data
DEFAULT_VAL_PER_CLASS = 20  # ImageNet-LT has its own validation list and keeps 0
IDENTITY_FILE = "risda_search.json"  # beside Ray's experiment state: what the experiment is
# Run flags a trial controls itself (its own out dir, no progress bar, Tune's checkpoints).
TRIAL_MANAGED = ("out", "resume", "progress")


# --- the search space --------------------------------------------------------------------------
def field_type(name: str) -> type:
    """int, float, str or bool of a Config field (`int | None` -> int)."""
    hint = typing.get_type_hints(Config)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def parse_value(name: str, text: str):
    tp = field_type(name)
    if tp is bool:
        return text.strip().lower() in ("1", "true", "yes", "on")
    return tp(text.strip())


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
            return CategoricalDistribution([parse_value(name, v) for v in spec.split("|")])
        lo, hi, *log = spec.split(":")
        if log not in ([], ["log"]) or field_type(name) not in (int, float):
            raise ValueError
        if field_type(name) is int:
            return IntDistribution(int(lo), int(hi), log=bool(log))
        return FloatDistribution(float(lo), float(hi), log=bool(log))
    except ValueError:
        raise ConfigError(f"--space {name}={spec}: expected lo:hi, lo:hi:log (numeric fields) or a|b|c "
                          f"of {field_type(name).__name__} values (low <= high, log needs low > 0)") from None


def in_space(dist, value) -> bool:
    if hasattr(dist, "choices"):
        return value in dist.choices
    return dist.low <= value <= dist.high


def head_counts(num_classes: int, shares=HEAD_SHARES) -> list[int]:
    return sorted({max(1, round(f * num_classes)) for f in shares})


def default_space(cfg: Config, num_classes: int) -> dict[str, str]:
    """α, β as in the paper; head_count as 10-40% of the classes, unless head classes are
    chosen by size (--head-min-count; ImageNet-LT, iNaturalist), where it does nothing."""
    space = parse_space(DEFAULT_SPACE)
    if cfg.resolved().head_min_count is None:
        space["head_count"] = "|".join(map(str, head_counts(num_classes)))
    else:
        del space["head_count"]
    return space


def paper_point(imbalance: float, space: dict, num_classes: int = 100) -> dict | None:
    """Table 2's (α, β, 20% of the classes as head) for this imbalance factor, restricted to
    the searched names whose paper value lies in the space; None when Table 2 has no such λ."""
    if imbalance not in PAPER_TABLE2:
        return None
    alpha, beta = PAPER_TABLE2[imbalance]
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
                   help="ASHA: epochs before a trial can be stopped (default: the first evaluated epoch of stage II; "
                        "stage I does not depend on the searched parameters)")
    s.add_argument("--max-concurrent", type=int, default=4, help="trials running at once, 0 = as many as fit (default: 4)")
    s.add_argument("--optuna-storage", default=None, help="persist the Optuna study: sqlite:///study.db (any SQLAlchemy URL) "
                                                          "or a journal file path, for optuna-dashboard and friends")
    w = p.add_argument_group("where it runs")
    w.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded local Ray)")
    w.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray (default: all)")
    w.add_argument("--num-gpus", type=int, default=None, help="GPUs of the embedded local Ray (default: all)")
    w.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs per trial (default: 1)")
    w.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs per trial, fractions pack trials on a GPU (default: 0)")
    w.add_argument("--max-failures", type=int, default=0, help="retries of a failed trial from its last checkpoint (default: 0)")
    w.add_argument("--storage", default=None, help=f"Ray experiment storage: a path or a URI pyarrow understands "
                                                   f"(s3://, gs://; shared by all nodes) (default: ./{raytune.LOCAL_STORAGE})")
    w.add_argument("--name", default=None, help="experiment name (default: search-<dataset>-<arm>-lt<imbalance>)")
    w.add_argument("--results", default="results", help="tables go to <results>/<name>/ (default: results)")
    w.add_argument("--restart", action="store_true", help="delete the experiment of this name and start over")
    w.add_argument("--retry-errored", action="store_true", help="on resume, also continue the trials that failed, from "
                                                                "their last checkpoint (e.g. after a crash killed them)")
    add_config_args(p, skip=TRIAL_MANAGED)
    return p.parse_args(argv)


def base_config(args) -> Config:
    """The settings every trial shares: run flags over the search defaults."""
    given = config_overrides(args)
    dataset = given.get("dataset", Config.dataset)
    defaults = {} if dataset == "imagenetlt" else {"val_per_class": DEFAULT_VAL_PER_CLASS}
    cfg = raytune.absolute_paths(Config(**{**defaults, **given}).validate())
    if cfg.val_per_class == 0 and cfg.dataset != "imagenetlt":
        raise ConfigError("a validation split is mandatory for search (it tunes on validation, never on test): "
                          f"pass --val-per-class N (e.g. {DEFAULT_VAL_PER_CLASS})")
    return cfg


def search_space(args, given: dict, cfg: Config, num_classes: int) -> dict[str, str]:
    """--space, or the default space minus the names a run flag fixed."""
    if args.space is None:
        return {k: v for k, v in default_space(cfg, num_classes).items() if k not in given}
    space = parse_space(args.space)
    clash = sorted(set(space) & set(given))
    if clash:
        raise ConfigError(f"{', '.join('--' + c.replace('_', '-') for c in clash)} fixes what --space searches; drop one of them")
    return space


def check_data(cfg: Config) -> dict:
    """Build the splits once on the driver: bad data flags fail here, not in every trial,
    an image cache is filled once, and an empty validation split is an error."""
    import torch
    from risda.data import load_long_tail
    data = load_long_tail(cfg, torch.device("cpu"))
    if data.val is None or len(data.val) == 0:
        raise ConfigError("the validation split is empty; a search needs one: pass --val-per-class N "
                          f"(e.g. {DEFAULT_VAL_PER_CLASS})")
    return {**data.info, "num_classes": data.num_classes}


def default_name(cfg: Config) -> str:
    return f"search-{cfg.dataset}-{cfg.arm}-lt{cfg.imbalance:g}"


def default_grace_period(cfg: Config) -> int:
    """The first evaluated epoch of stage II: α, β and head_count act only in stage II, so
    before it every trial is the same run and ASHA would compare noise."""
    c = cfg.resolved()
    first = next(e + 1 for e in range(c.stage1_epochs, c.epochs) if (e + 1) % c.eval_every == 0 or e + 1 == c.epochs)
    return min(first, c.epochs)


def optuna_storage(spec: str | None):
    """None (in memory, saved with Ray's searcher state), an RDB URL, or a journal file."""
    if not spec:
        return None
    import optuna
    if "://" in spec:
        if spec.startswith("sqlite:///"):  # relative to where the command runs; the folder may not exist yet
            db = Path(spec[len("sqlite:///"):]).expanduser().resolve()
            db.parent.mkdir(parents=True, exist_ok=True)
            spec = f"sqlite:///{db}"
        try:
            return optuna.storages.RDBStorage(spec)
        except Exception as e:  # SQLAlchemy's errors: bad URL, missing driver, unreachable server
            raise ConfigError(f"--optuna-storage {spec}: {e}") from None
    from optuna.storages.journal import JournalFileBackend
    path = Path(spec.removeprefix("journal:")).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def fresh_study(storage, name: str, restart: bool) -> None:
    """A new experiment needs a new study: delete the old one with --restart, else refuse
    (TPE would otherwise learn from trials this experiment never ran)."""
    if storage is None:
        return
    import optuna
    if name not in [s.study_name for s in optuna.get_all_study_summaries(storage)]:
        return
    if not restart:
        raise ConfigError(f"the Optuna storage already holds a study named {name!r} but there is no Ray experiment to "
                          f"resume; pass --restart to delete the study, or choose another --name")
    optuna.delete_study(study_name=name, storage=storage)


def make_search_alg(space: dict, args, cfg: Config, storage, name: str, point: dict | None):
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch
    # TPE starts with random trials (Optuna's default: 10); with a small budget, half of it.
    sampler = optuna.samplers.TPESampler(seed=args.search_seed, n_startup_trials=min(10, max(1, args.num_samples // 2)))
    searcher = OptunaSearch(space={k: optuna_distribution(k, v) for k, v in space.items()}, metric=METRIC, mode=MODE,
                            points_to_evaluate=[point] if point else None, sampler=sampler,
                            storage=storage, study_name=name)
    return ConcurrencyLimiter(searcher, max_concurrent=args.max_concurrent) if args.max_concurrent > 0 else searcher


def make_scheduler(args, cfg: Config):
    if args.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler
    grace = args.grace_period or default_grace_period(cfg)
    if not 1 <= grace <= cfg.epochs:
        raise ConfigError(f"--grace-period must be in [1, epochs={cfg.epochs}], got {grace}")
    # ASHA counts epochs, not reports: one report per evaluated epoch.
    return ASHAScheduler(time_attr="epochs_done", max_t=cfg.epochs, grace_period=grace)


def experiment_identity(cfg: Config, space: dict, args) -> dict:
    """What the experiment is (everything but where it runs): a resumed experiment must be
    the same, because Tuner.restore keeps the original settings whatever the flags say."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES}
    return dict(config=config, space=space, metric=METRIC, num_samples=args.num_samples, search_seed=args.search_seed,
                enqueue_paper=args.enqueue_paper, scheduler=args.scheduler, grace_period=args.grace_period,
                max_concurrent=args.max_concurrent, cpus_per_trial=args.cpus_per_trial,
                gpus_per_trial=args.gpus_per_trial, max_failures=args.max_failures)


def check_same_experiment(path: str, identity: dict) -> None:
    text = raytune.read_text(f"{path}/{IDENTITY_FILE}")
    if text is None:
        return
    saved = json.loads(text)
    now = json.loads(json.dumps(identity))  # same JSON types (tuples -> lists) as the saved one
    diffs = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if k != "config" and saved.get(k) != now[k]]
    diffs += [f"--{k.replace('_', '-')}: {saved['config'].get(k)!r} -> {v!r}"
              for k, v in now["config"].items() if saved.get("config", {}).get(k) != v]
    if diffs:
        raise ConfigError(f"experiment {path} was started with other settings ({'; '.join(diffs)}). Ray resumes an "
                          f"experiment as it was created: rerun with the original flags, add --restart to start over, "
                          f"or pick another --name")


# --- outputs ---------------------------------------------------------------------------------------
def write_results(grid, out: Path, params: list[str], info: dict) -> tuple:
    """trials.parquet, epochs.parquet and best.json in `out`; returns (trials, best row)."""
    trials, epochs = raytune.collate(grid, metric=METRIC, params=params)
    for k in ("search_seed", "experiment"):
        trials[k] = info[k]
    raytune.write_parquet(trials, out / "trials.parquet")
    raytune.write_parquet(epochs, out / "epochs.parquet")
    best = raytune.best_trial(trials, METRIC)
    if best is not None:
        best_json = {
            "config": json.loads(best["config"]), "params": {p: _plain(best[p]) for p in params},
            "metric": METRIC, "value": _plain(best[f"final_{METRIC}"]), "completed": bool(best["completed"]),
            "trial_id": best["trial_id"], "test_error": _plain(best["final_test_error"]),
            **{f"test_{g}_error": _plain(best[f"final_test_{g}_error"]) for g in ("many", "medium", "few")},
            **info}
        tmp = out / "best.json.tmp"
        tmp.write_text(json.dumps(best_json, indent=2))
        tmp.replace(out / "best.json")
    return trials, best


def _plain(v):
    """numpy scalars and NaN -> JSON."""
    if hasattr(v, "item"):
        v = v.item()
    return None if isinstance(v, float) and v != v else v


# --- main ------------------------------------------------------------------------------------------
def main(argv=None, trainable=None) -> int:
    """Run (or resume) the search; `trainable` replaces raytune.train_trial (tests only)."""
    from rich.console import Console
    from ray import tune
    console = Console(stderr=True)
    # Tune warns when checkpoints force frequent state snapshots: they are what make resuming exact.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    args = parse_args(argv)
    owns_ray = False
    started = time.time()
    try:
        cfg = base_config(args)
        on_cluster = bool(args.address or os.environ.get("RAY_ADDRESS"))
        num_classes = CLASSES.get(cfg.dataset, 100)
        if not on_cluster or Path(cfg.data_root).exists():  # a cluster's data may live on its nodes only
            data_info = check_data(cfg)
            num_classes = data_info["num_classes"]
            console.log(f"data: {data_info['train_size']} train / {data_info['val_size']} val / "
                        f"{data_info['test_size']} test images, {num_classes} classes ({data_info['source']})")
        space = search_space(args, config_overrides(args), cfg, num_classes)
        point = paper_point(cfg.imbalance, space, num_classes) if args.enqueue_paper else None
        name = args.name or default_name(cfg)
        storage = raytune.storage_uri(args.storage)
        path = raytune.experiment_uri(storage, name)
        out = Path(args.results).expanduser().resolve() / name
        params = list(space)
        identity = experiment_identity(cfg, space, args)
        if not args.restart and tune.Tuner.can_restore(path):
            check_same_experiment(path, identity)
        owns_ray = raytune.init_ray(args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                                    logging_level="warning")
        resources = raytune.trial_resources(args.cpus_per_trial, args.gpus_per_trial)
        console.log(f"ray: {raytune.cluster_summary()}; per trial {resources}")
        train = tune.with_resources(trainable or raytune.train_trial, resources)
        study_storage = optuna_storage(args.optuna_storage)

        def new_tuner():
            fresh_study(study_storage, name, args.restart)
            return tune.Tuner(
                train, param_space=cfg.to_dict(),
                tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, num_samples=args.num_samples,
                                            search_alg=make_search_alg(space, args, cfg, study_storage, name, point),
                                            scheduler=make_scheduler(args, cfg),
                                            trial_dirname_creator=raytune.trial_dirname),
                run_config=tune.RunConfig(
                    name=name, storage_path=storage, verbose=0,
                    callbacks=[raytune.RichProgress(args.num_samples, METRIC, params)],
                    failure_config=tune.FailureConfig(max_failures=args.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))

        tuner, restored = raytune.restore_or_new_tuner(path, train, new_tuner, restart=args.restart,
                                                       retry_errored=args.retry_errored)
        if not restored:
            raytune.write_text(f"{path}/{IDENTITY_FILE}", json.dumps(identity, indent=1))
        console.log(f"{'resuming' if restored else 'new'} experiment {path}: {args.num_samples} trials over "
                    + ", ".join(f"{k}={v}" for k, v in space.items())
                    + (f"; first trial: paper Table 2 point {point}" if point and not restored else ""))
        grid = tuner.fit()
        trials, best = write_results(grid, out, params, dict(search_seed=args.search_seed, experiment=path, name=name))
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    finally:
        if owns_ray:
            import ray
            ray.shutdown()
    raytune.print_top(trials, METRIC, params, title=f"{name}: top trials by final {METRIC}")
    unfinished = trials[~trials["status"].isin(["TERMINATED", "ERROR"])]
    if len(unfinished):
        console.print(f"[yellow]{len(unfinished)} trial(s) unfinished: rerun the same command to resume[/yellow]")
    errored = trials[trials["status"] == "ERROR"]
    if len(errored):
        console.print(f"[yellow]{len(errored)} trial(s) failed: if a crash killed them, rerun with --retry-errored "
                      f"to continue them from their last checkpoint[/yellow]")
    if best is not None:
        shown = ", ".join(f"{p}={v:.4g}" if isinstance(v, float) else f"{p}={v}" for p, v in ((p, _plain(best[p])) for p in params))
        console.print(f"best: {shown}  {METRIC} {best[f'final_{METRIC}']:.2f}  "
                      f"test {best['final_test_error']:.2f}  -> {out / 'best.json'}")
    console.print(f"wrote {out}/trials.parquet, epochs.parquet{', best.json' if best is not None else ''} "
                  f"({len(trials)} trials, {time.time() - started:.0f}s)")
    return 0 if best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
