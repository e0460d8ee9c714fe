"""Where an experiment runs: Ray start-up (an embedded local Ray or a cluster), the check that
a trial's resources fit a node, storage paths (local or any URI pyarrow understands),
restore-or-new Tuners, and the command-line flags of all of it (`add_runner_args`, shared by
tune/search.py and ablations/run.py).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import warnings
from pathlib import Path
from typing import Callable

import pyarrow.fs
import ray
from ray import tune

from ..trainer.config import ConfigError
from ..trainer.progress import seconds_flag
from ..trainer.storage import delete_dir
from .address import check_reachable, resolve_address  # noqa: F401  (check_reachable: for older callers)
from .collate import trial_statuses
from .trackers import add_tracker_args
from .trainables import remove_scratch

LOCAL_STORAGE = "ray_results"      # default storage, relative to the working directory
LOOPBACK = "127.0.0.1"             # where an embedded local Ray listens


def add_runner_args(parser, default_name: str) -> None:
    """The flags of where and how an experiment runs, shared by tune/search.py and ablations/run.py."""
    w = parser.add_argument_group("where it runs (Ray)")
    w.add_argument("--address", default=None, help="Ray cluster to join: host:port, ray://host:port or auto "
                                                   "(default: $RAY_ADDRESS, else an embedded local Ray on 127.0.0.1)")
    w.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray (default: all)")
    w.add_argument("--num-gpus", type=int, default=None, help="GPUs of the embedded local Ray (default: all)")
    w.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs per trial (default: 1)")
    w.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs per trial, fractions pack trials on a GPU, "
                                                                    "e.g. 0.25 (default: 0)")
    w.add_argument("--max-failures", type=int, default=None, help="retries of a failed trial from its last checkpoint; a "
                   "diverged trial is never retried (default: 2 with --address, so that a lost node's trials restore "
                   "elsewhere; 0 on the embedded Ray; a resumed search keeps the value it was started with)")
    w.add_argument("--storage", default=None, help=f"Ray experiment storage: a path or a URI pyarrow understands "
                                                   f"(s3://, gs://; shared by all nodes) (default: ./{LOCAL_STORAGE})")
    w.add_argument("--name", default=None, help=f"experiment name (default: {default_name})")
    w.add_argument("--results", default="results", help="tables go to <results>/<name>/ (default: results)")
    w.add_argument("--restart", action="store_true", help="delete the experiment of this name and start over")
    w.add_argument("--retry-errored", action="store_true", help="on resume, also continue the trials that failed, from "
                                                                "their last checkpoint (e.g. after a crash killed them)")
    w.add_argument("--shared-stage1", action=argparse.BooleanOptionalAction, default=True,
                   help="train each distinct stage I once and fork every trial's stage II from it (default: on; "
                        "--no-shared-stage1 trains each trial's own stage I)")
    w.add_argument("--debug", action="store_true", help="on bad input or a runtime failure (divergence, storage fault, "
                                                        "failed download), show the Python traceback instead of one line")
    w.add_argument("--log-every", type=seconds_flag, default=None, metavar="SECONDS",
                   help="plain progress lines instead of the bar: one per running trial every SECONDS, one per finished "
                        "or failed trial (default when the output is not a terminal: every 60 s)")
    w.add_argument("--stage1-cache", default=None, metavar="DIR|URI",
                   help="the stage-I cache, shared by searches and ablations over the same base config "
                        "(default: <storage>/stage1)")
    add_tracker_args(parser)


# --- the cluster ----------------------------------------------------------------------------
def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             **options) -> bool:
    """Connect to the cluster at `address` (or $RAY_ADDRESS; `auto` resolved by
    risda.runner.address.resolve_address, which refuses anything but a cluster this user
    started with `ray start` and that answers); with neither, start an embedded
    local Ray with num_cpus/num_gpus (default: what the machine has), listening on 127.0.0.1
    only (a dashboard too). `options` go to ray.init either way (e.g. include_dashboard=False,
    logging_level="warning").

    Returns True when this call initialised Ray (the caller shuts it down), False when Ray
    was already initialised, e.g. by a test fixture or a notebook."""
    if ray.is_initialized():
        return False
    # The driver does not echo the workers', raylet's and GCS's own logs ("(raylet) ...", "[state-dump]"):
    # trial failures come through Tune; the logs stay in /tmp/ray/session_*/logs.
    options.setdefault("log_to_driver", False)
    address = resolve_address(address)  # `auto` only as this user's `ray start` (risda.runner.address)
    if address:
        options.pop("include_dashboard", None)  # only meaningful when starting Ray
        on_loopback = address.split("://", 1)[-1].rpartition(":")[0] in (LOOPBACK, "localhost")
        try:
            # ray.init would rewrite 127.0.0.1 to this machine's routable address, where a Ray
            # that listens on loopback only (init_ray's own, below) does not answer.
            with loopback_node_ip() if on_loopback else contextlib.nullcontext():
                ray.init(address=address, **options)
        except ConnectionError as e:  # something answers there, but not a Ray cluster (or not to us)
            token = ("" if os.environ.get("RAY_AUTH_MODE") == "token" else
                     "; a head that uses token authentication (Ray >= 2.59 says so when it starts) refuses drivers "
                     "without RAY_AUTH_MODE=token and its token (~/.ray/auth_token or RAY_AUTH_TOKEN)")
            raise ConfigError(f"{e}: is a Ray head node (`ray start --head`) running at {address}? "
                              f"Fix --address / RAY_ADDRESS, or drop it to run on an embedded local Ray{token}") from None
    else:
        # "local" and not None: None would attach to a cluster someone `ray start`ed here.
        options.setdefault("dashboard_host", LOOPBACK)
        with loopback_node_ip():
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, _node_ip_address=LOOPBACK, **options)
        where = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
        if where != [LOOPBACK]:
            warnings.warn(f"the embedded Ray runs on {', '.join(where)}, not on {LOOPBACK} only: its servers listen "
                          f"on all interfaces (a Ray other than 2.60?)", stacklevel=2)
    return True


def quiet_tune(debug: bool = False) -> None:
    """Turn Tune's own driver output off, unless --debug: for each failed trial, the traceback
    it logs ("Trial task failed ...") and the box of the trial's last result, and at each
    experiment's start, the box of its configuration and the TensorBoard hint. The driver has
    its own lines for all of it (RichProgress: `failed <trial>: <error>`; trials.parquet and
    runs.parquet keep the message; Tune's error.txt the traceback). Environment variables a
    user has set win."""
    if debug:
        return
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")  # read by Tune's controller
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's older reporter, silent at verbose=0


@contextlib.contextmanager
def loopback_node_ip():
    """Let an embedded Ray keep 127.0.0.1 as its node address, so that every server it starts
    (GCS, raylet, workers, agents) listens on loopback only. ray.init (2.60) rewrites a
    loopback _node_ip_address to the machine's routable address, and its servers then listen
    on all interfaces, unless Ray's "no multi-node clusters" switch is off (what Ray does on
    macOS and Windows), which is what this does while ray.init runs."""
    from ray._private import ray_constants
    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # another Ray: init_ray warns if it is not on loopback
        yield
        return
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def trial_resources(cpus_per_trial: float, gpus_per_trial: float) -> dict:
    """What one trial reserves, checked against the live cluster: Ray would leave a trial that
    fits on no node PENDING forever, so that is a ConfigError here instead. Fractional GPUs
    are bookkeeping only (0.25 packs four trials on one GPU)."""
    if cpus_per_trial <= 0:
        raise ConfigError(f"--cpus-per-trial must be > 0, got {cpus_per_trial}")
    if not 0 <= gpus_per_trial <= 1:
        raise ConfigError(f"--gpus-per-trial must be in [0, 1] (the trainer uses one device; fractions pack "
                          f"several trials on a GPU), got {gpus_per_trial}")
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    most_cpus = max((n.get("CPU", 0) for n in nodes), default=0)
    most_gpus = max((n.get("GPU", 0) for n in nodes), default=0)
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    if gpus_per_trial > most_gpus:
        raise ConfigError(f"--gpus-per-trial {gpus_per_trial:g} but no node of the cluster has that many GPUs "
                          f"(largest node: {most_gpus:g}, cluster total: {total_gpus:g}); lower --gpus-per-trial "
                          f"(0 trains on CPUs) or connect to a cluster with GPUs (--address)")
    if cpus_per_trial > most_cpus:
        raise ConfigError(f"--cpus-per-trial {cpus_per_trial:g} but the largest node has {most_cpus:g} CPUs; "
                          f"lower --cpus-per-trial")
    return {"cpu": cpus_per_trial, "gpu": gpus_per_trial}


def cluster_summary() -> str:
    """One line: nodes, CPUs and GPUs of the live cluster."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    total = lambda k: sum(n.get(k, 0) for n in nodes)
    return f"{len(nodes)} node(s), {total('CPU'):g} CPUs, {total('GPU'):g} GPUs"


# --- storage ----------------------------------------------------------------------------------
def storage_uri(storage: str | None) -> str:
    """An absolute local path (default ./ray_results), or a URI as given (s3://, gs://,
    file://, anything pyarrow understands; on a multi-node cluster it must be shared)."""
    if storage and "://" in storage:
        return storage.rstrip("/")
    return str(Path(storage or LOCAL_STORAGE).expanduser().resolve())


def experiment_uri(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def restore_or_new_tuner(path: str, trainable, new_tuner: Callable[[], tune.Tuner],
                         restart: bool = False, retry_errored: bool = False) -> tuple[tune.Tuner, bool]:
    """(Tuner, restored). Tuner.restore(path) when a restorable experiment is there: finished
    trials are kept, unfinished ones continue from their last checkpoint, the searcher and
    scheduler continue from their saved state. Errored trials stay errored unless
    retry_errored (then they continue from their last checkpoint too: for trials that a
    crash or a lost node killed). Otherwise (or with restart=True, which deletes the old
    experiment first) `new_tuner()`. `trainable` must be the one the experiment was created with."""
    if restart:
        delete_dir(path)
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=retry_errored), True
    return new_tuner(), False


def remove_trial_scratch(grid):
    """After tuner.fit(): remove the scratch folders its trials left on this machine (a trial
    whose worker was killed never removes its own; risda.runner.trainables.trial_scratch).
    Returns the grid, so `remove_trial_scratch(tuner.fit())` reads as one step."""
    remove_scratch(trial_statuses(grid))
    return grid


def check_writable(path: str | Path, flag: str) -> None:
    """An output folder that can be created and written, checked before Ray starts and without
    creating anything (a refused command leaves no empty folder): a local path's nearest existing
    folder takes a probe file; a URI (s3://, gs://) is reached and takes a probe object."""
    if "://" in str(path) and not str(path).startswith("file://"):
        return check_object_storage(str(path), flag)
    path = Path(str(path).removeprefix("file://")).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        probe = existing / f".risda-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{flag} {path} is not writable ({e.strerror or e}); choose a folder you can write to") from None


def check_object_storage(uri: str, flag: str) -> None:
    """A storage URI that pyarrow can open and write to (one small probe object, deleted)."""
    from ..trainer.failures import one_line
    from ..trainer.storage import delete_file, filesystem, write_text
    probe = f"{uri.rstrip('/')}/.risda-write-test-{os.getpid()}"
    try:
        fs, where = filesystem(uri)
        if fs.get_file_info(where).type == pyarrow.fs.FileType.File:
            raise OSError("it is a file, not a folder")
        write_text(probe, "")
        delete_file(probe)
    except Exception as e:  # pyarrow: ArrowInvalid (an unknown scheme), OSError (no such bucket, credentials, network)
        raise ConfigError(f"{flag} {uri} cannot be used ({type(e).__name__}: {one_line(e)[:300]}): check the URI, the "
                          f"bucket and its credentials") from None
