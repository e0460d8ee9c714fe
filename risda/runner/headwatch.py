"""A driver on a cluster (--address) that loses its head node ends in one line, within LOST_AFTER_S.

Without this, a driver whose head went away during ray.init retries the GCS without end (it was
killed by `timeout` after ten minutes), and one that was connected ends 60 s later on Ray's own
fatal message from C++, none of the driver's lines. `watch_head` polls the head's GCS port from
a thread; when it has not answered for LOST_AFTER_S, it prints

    error: the Ray head at <address> stopped answering ... rerun the same command

and ends the process with exit code 1 (os._exit: the main thread is inside Ray's calls, which
would wait on the dead head). The OS drops the driver's experiment lock with the process.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time

from .address import host_port

POLL_S = 5.0
LOST_AFTER_S = 30.0  # before Ray's own 60 s (gcs_rpc_server_reconnect_timeout_s), after a blip
EXIT_CODE = 1


def answers(host: str, port: int, timeout: float) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def lost_message(address: str, seconds: float, storage: str) -> str:
    return (f"error: the Ray head at {address} stopped answering ({seconds:.0f} s without a reply): this driver "
            f"stops. The experiment in {storage} is as of its last snapshot and the trials' checkpoints there are "
            f"kept; restart the cluster and rerun the same command")


@contextlib.contextmanager
def watch_head(address: str | None, storage: str, lost_after_s: float = LOST_AFTER_S, poll_s: float = POLL_S,
               exit=os._exit):
    """While the block runs, end the process (one line on stderr, EXIT_CODE) when the head at
    `address` stops answering for lost_after_s. No address (an embedded Ray): nothing to watch."""
    if not address:
        yield
        return
    host, port = host_port(address)
    stop = threading.Event()

    def watch():
        last_reply = time.monotonic()
        while not stop.wait(poll_s):
            if answers(host, port, timeout=min(poll_s, 5.0)):
                last_reply = time.monotonic()
            elif time.monotonic() - last_reply >= lost_after_s and not stop.is_set():
                print(lost_message(address, time.monotonic() - last_reply, storage), file=sys.stderr, flush=True)
                exit(EXIT_CODE)
                return

    thread = threading.Thread(target=watch, daemon=True, name=f"head watch {address}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
