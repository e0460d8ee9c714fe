"""How a driver (tune/search.py, ablations/run.py) ends on a runtime failure: one line
`error: <message>`, exit 1, the traceback only with --debug (`failure_exit`).

A runtime failure is what risda.trainer.failures names (a divergence, a storage fault, a failed
--download), or Ray failing to read back the experiment state it could not write."""
from __future__ import annotations

from ..trainer.failures import _chain, one_line, runtime_message

# Ray's ResultGrid reads the experiment state it wrote; on a full or broken disk that state is cut short.
RAY_STATE_HINT = ("Ray could not read back its experiment state ({what}): most likely the storage (--storage) is full or "
                  "broken and the state was cut short. The trials' last checkpoints there are kept: free space and "
                  "rerun the same command")


def driver_failure(exc: BaseException) -> str | None:
    """The one-line message of a runtime failure on the driver, or None (a bug: show the traceback)."""
    message = runtime_message(exc)
    if message is not None:
        return message
    for e in _chain(exc):
        if isinstance(e, EOFError):
            return RAY_STATE_HINT.format(what=f"{type(e).__name__}: {one_line(e)}")
    return None


def failure_exit(exc: BaseException, console, debug: bool) -> int:
    """Call inside `except Exception`: prints the one line and returns 1, or re-raises the
    exception (a bug, or --debug)."""
    from rich.markup import escape
    message = driver_failure(exc)
    if message is None or debug:
        raise exc
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # one line, however long
    return 1
