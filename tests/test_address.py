"""Issue 25, item 3: `--address auto` joins only a cluster that this user started with `ray start`
and that answers, else one line and exit 2 in seconds, before anything else; a driver whose head
stops answering ends in one line, exit 1, within a bounded time. The fast tests fake Ray's traces
(the record `ray start` writes, a raylet process, a GCS port); the slow one starts a real head
in its own temp dir and port (never touching another Ray on this machine) and kills it."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from risda.trainer.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_tmp(tmp_path, monkeypatch):
    """Ray's temp dir for this test only: where `ray start` would record its cluster."""
    root = tmp_path / "rt"
    (root / "ray").mkdir(parents=True)
    monkeypatch.setenv("RAY_TMPDIR", str(root))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return root / "ray" / "ray_current_cluster"


@pytest.fixture
def fake_raylet(tmp_path):
    """start(port): a process named raylet (python under that name) with --gcs-address=127.0.0.1:<port>,
    listening on that port as a GCS would."""
    exe = tmp_path / "bin" / "raylet"
    exe.parent.mkdir()
    exe.symlink_to(sys.executable)
    procs = []

    def start(port: int, listen: bool = True):
        serve = f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); " if listen else ""
        code = f"import socket, time; {serve}print('ready', flush=True); time.sleep(600)"
        proc = subprocess.Popen([str(exe), "-c", code, f"--gcs-address=127.0.0.1:{port}"], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        procs.append(proc)
        return proc
    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def driver_argv(cifar10_root, tmp_path, *extra):
    return ["--dataset", "cifar10lt", "--data-root", str(cifar10_root), "--n-max", "50", "--epochs", "2",
            "--storage", str(tmp_path / "ray"), "--results", str(tmp_path / "res"), "--name", "x", *extra]


@pytest.mark.parametrize("runner", ["search", "ablation"])
def test_auto_without_a_ray_start_cluster_is_one_line_before_anything(cifar10_root, tmp_path, capsys, monkeypatch,
                                                                    ray_tmp, runner):
    """Nothing recorded by `ray start` (another driver's embedded Ray may run here: auto does not join it)."""
    import ray
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    started = time.monotonic()
    if runner == "search":
        from risda.runner.search import main
        rc = main(driver_argv(cifar10_root, tmp_path, "--address", "auto"))
    else:
        from risda.runner.ablation.cli import main
        rc = main(driver_argv(cifar10_root, tmp_path, "--address", "auto", "--arms", "ce", "--seeds", "0"))
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1, out
    assert lines[0].startswith(f"error: --address auto: no cluster was started with `ray start` on this machine ({ray_tmp} "
                               f"is absent")
    assert lines[0].endswith("or drop --address to run on an embedded local Ray")
    assert time.monotonic() - started < 10
    assert not (tmp_path / "res").exists() and not (tmp_path / "ray").exists()  # no folder, no lock


def test_auto_with_a_stale_record_is_refused(ray_tmp, monkeypatch):
    """`ray start` recorded a cluster that is gone (killed without `ray stop`): refused, not retried."""
    from risda.runner.address import resolve_address
    ray_tmp.write_text(f"127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match=r"the cluster `ray start` recorded in .* no longer runs here \(no raylet of it"):
        resolve_address("auto")


def test_auto_joins_this_users_ray_start_cluster_only(ray_tmp, fake_raylet):
    from risda.runner.address import resolve_address
    port = free_port()
    fake_raylet(port)
    time.sleep(0.05)
    ray_tmp.write_text(f"127.0.0.1:{port}")  # `ray start` writes its record after the raylet started
    assert resolve_address("auto") == f"127.0.0.1:{port}"

    os.utime(ray_tmp, (time.time() - 3600, time.time() - 3600))  # recorded long before this raylet started
    with pytest.raises(ConfigError, match="started after `ray start` recorded that address .* another Ray on a reused port"):
        resolve_address("auto")

    os.utime(ray_tmp, None)
    if os.getuid() == 0:  # a record that another user's `ray start` wrote
        os.chown(ray_tmp, 4242, -1)
        with pytest.raises(ConfigError, match=r"was written by another user \(uid 4242\), not by you"):
            resolve_address("auto")


def test_auto_does_not_take_a_recorded_ray_that_does_not_answer(ray_tmp, fake_raylet):
    """The recorded cluster's raylet runs, but nothing answers at its GCS port: refused in seconds."""
    from risda.runner.address import resolve_address
    port = free_port()
    fake_raylet(port, listen=False)
    ray_tmp.write_text(f"127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        resolve_address("auto")
    assert time.monotonic() - started < 6


# --- a head lost during a run ----------------------------------------------------------------
def test_a_lost_head_is_one_line_and_exit_1_within_the_bound(capsys):
    from risda.runner import headwatch
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    exits = []
    with headwatch.watch_head(address, "/s/exp", lost_after_s=1.0, poll_s=0.1, exit=exits.append):
        time.sleep(1.5)
        assert exits == []  # a head that answers is left alone
        server.close()
        lost = time.monotonic()
        while not exits and time.monotonic() - lost < 5:
            time.sleep(0.05)
    assert exits == [1] and 0.8 <= time.monotonic() - lost < 3  # lost_after_s counts from the last reply (a poll earlier)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: the Ray head at {address} stopped answering")
    assert "The experiment in /s/exp is as of its last snapshot" in err and err.endswith("rerun the same command")


def ray_processes(temp_dir: str) -> list[int]:
    """The pids of the processes of the Ray started in temp_dir (and of no other Ray)."""
    import ray  # noqa: F401  (Ray ships psutil)
    import psutil
    pids = []
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_dir in arg for arg in p.info.get("cmdline") or []):
            pids.append(p.pid)
    return pids


@pytest.mark.slow
def test_a_search_on_a_ray_start_cluster_whose_head_dies(cifar10_root, tmp_path):
    """`ray start --head` in a temp dir of its own; `tune/search.py --address auto` joins it (RAY_TMPDIR points
    at its record) and trains; the head's processes are killed: the driver prints one line and exits 1
    within LOST_AFTER_S and a poll (Ray alone: 60 s, then its own fatal message; during ray.init: forever)."""
    from risda.runner import headwatch
    short = tempfile.mkdtemp(prefix="r25-", dir="/tmp")  # Ray's socket paths must stay short
    # TMPDIR too: the killed trials' scratch folders go there, and with it
    env = {**os.environ, "RAY_TMPDIR": short, "TMPDIR": short, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    subprocess.run(["ray", "start", "--head", "--port", str(port), "--temp-dir", f"{short}/ray", "--num-cpus", "1",
                    "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True, capture_output=True)
    driver = None
    try:
        argv = [sys.executable, str(REPO / "tune" / "search.py"), "--address", "auto", "--dataset", "cifar10lt",
                "--data-root", str(cifar10_root), "--imbalance", "10", "--n-max", "100", "--val-per-class", "5",
                "--test-per-class", "10", "--epochs", "400", "--num-samples", "1", "--scheduler", "none",
                "--storage", str(tmp_path / "ray"), "--results", str(tmp_path / "res"), "--name", "lost",
                "--log-every", "5"]
        driver = subprocess.Popen(argv, env={**env, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
        seen = []
        for line in driver.stdout:  # until stage I trains on the cluster
            seen.append(line)
            if "stage I:" in line and "running" in line and "0 running" not in line:
                break
        assert driver.poll() is None, "".join(seen)
        for pid in ray_processes(short):
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        rest, _ = driver.communicate(timeout=headwatch.LOST_AFTER_S + 4 * headwatch.POLL_S + 30)
        took = time.monotonic() - killed
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        for pid in ray_processes(short):
            os.kill(pid, signal.SIGKILL)
        record_file = Path(short, "ray", "ray_current_cluster")
        record = record_file.read_text() if record_file.is_file() else "?"
        shutil.rmtree(short, ignore_errors=True)
    errors = [line for line in rest.splitlines() if line.startswith("error:")]
    assert driver.returncode == 1, "".join(seen) + rest
    assert len(errors) == 1 and errors[0].startswith(f"error: the Ray head at {record} stopped answering"), rest
    assert took < headwatch.LOST_AFTER_S + 2 * headwatch.POLL_S + 5, took
