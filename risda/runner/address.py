"""--address checked before anything else (`resolve_address`), one line and exit 2 when it is wrong.

`auto` joins only a cluster that this user started with `ray start` on this machine and that
answers. Ray's own `auto` falls back to any Ray it finds running here: another driver's embedded
Ray (another user's, or one of this user's own searches), whose end then left this driver
retrying its GCS for ten minutes. Here `auto` reads what `ray start` records
(<ray temp dir>/ray_current_cluster; `ray stop` clears it) and accepts it only when

- the record is this user's file,
- a raylet of that cluster runs here, owned by this user, and older than the record (a Ray
  started later on a reused port is someone else's), and
- its GCS answers (a TCP connection within CONNECT_TIMEOUT_S).

Anything else is refused with what was found, and the resolved host:port is what ray.init gets.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from ..trainer.errors import ConfigError

CONNECT_TIMEOUT_S = 5.0
RECORD_SLACK_S = 5.0  # clock granularity between a raylet's start and the record `ray start` writes after it
FIX = "start one with `ray start --head`, pass its host:port, or drop --address to run on an embedded local Ray"


def resolve_address(address: str | None) -> str | None:
    """--address, else $RAY_ADDRESS: None for an embedded local Ray, else the address to join,
    `auto` resolved (`auto_address`); ConfigError when nothing answers there."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        return None
    if address == "auto":
        address = auto_address()
    check_reachable(address)
    return address


def ray_record() -> Path:
    """Where `ray start` records the cluster it started or joined (Ray's own lookup: RAY_TMPDIR, TMPDIR, /tmp)."""
    from ray._common.utils import get_ray_address_file
    return Path(get_ray_address_file(None))


def auto_address() -> str:
    record = ray_record()
    if not record.is_file():
        raise ConfigError(f"--address auto: no cluster was started with `ray start` on this machine ({record} is "
                          f"absent){others_running()}; {FIX}")
    owner = record.stat().st_uid
    if owner != os.getuid():
        raise ConfigError(f"--address auto: {record} was written by another user (uid {owner}), not by you "
                          f"(uid {os.getuid()}); {FIX}")
    address = record.read_text().strip()
    raylets = raylets_of(address)
    if not raylets:
        raise ConfigError(f"--address auto: the cluster `ray start` recorded in {record} ({address}) no longer runs here "
                          f"(no raylet of it; `ray stop` would have cleared the record){others_running()}; {FIX}")
    mine = [r for r in raylets if r["uid"] == os.getuid()]
    if not mine:
        raise ConfigError(f"--address auto: the raylet of {address} belongs to another user (uid {raylets[0]['uid']}); {FIX}")
    if not any(r["started"] <= record.stat().st_mtime + RECORD_SLACK_S for r in mine):
        raise ConfigError(f"--address auto: the Ray at {address} started after `ray start` recorded that address in "
                          f"{record}: it is another Ray on a reused port, not that cluster; {FIX}")
    return address


def raylets(flag: str = "--gcs-address=") -> list[dict]:
    """The raylets running on this machine: their GCS address, owner and start time."""
    import ray  # noqa: F401  (Ray ships the psutil it uses)
    import psutil
    found = []
    for proc in psutil.process_iter(["cmdline", "uids", "create_time"]):
        cmdline = proc.info.get("cmdline") or []
        if not cmdline or "raylet" not in os.path.basename(cmdline[0]):
            continue
        gcs = [a.split("=", 1)[1] for arg in cmdline for a in arg.split(" ") if a.startswith(flag)]
        if gcs and proc.info.get("uids") is not None:
            found.append(dict(gcs=gcs[0], uid=proc.info["uids"].real, started=proc.info["create_time"], pid=proc.pid))
    return found


def raylets_of(address: str) -> list[dict]:
    return [r for r in raylets() if r["gcs"] == address]


def others_running() -> str:
    """'; the Ray(s) running here (...) belong to other drivers or users: auto does not join them', or ''."""
    addresses = sorted({r["gcs"] for r in raylets()})
    if not addresses:
        return ""
    return (f"; the Ray instance(s) running here ({', '.join(addresses)}) were not started with `ray start` (another "
            f"driver's embedded Ray) or not by you: auto does not join them")


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ConfigError quickly when nothing listens at a host:port address (ray.init
    itself would retry for a minute and then fail with a less helpful message)."""
    host, port = host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"no Ray cluster answers at {address} ({e}): start one there with "
                          f"`ray start --head --port {port}`, fix --address / RAY_ADDRESS, "
                          f"or drop --address to run on an embedded local Ray") from None


def host_port(address: str) -> tuple[str, int]:
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r} is not host:port (or ray://host:port, or auto)")
    return host.strip("[]"), int(port)
