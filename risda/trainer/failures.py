"""Runtime failures a run reports as one line `error: <message>` with exit 1 (bad input is
risda.trainer.errors.ConfigError, exit 2): a storage fault while writing, a failed download. Each
message names what failed, why, what is intact and what to do.

`writing(path, intact)` turns a write that fails for lack of space, an I/O error or a
permission into a StorageFault and removes the temporary file the write had started.
"""
from __future__ import annotations

import contextlib
import errno
import re
from pathlib import Path

# The faults of the storage itself (not of the program): full, broken, read-only or forbidden.
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EIO: "I/O error", errno.EACCES: "permission denied",
                  errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system", errno.EPERM: "not permitted"}
# torch.save reports a failed write as RuntimeError("[enforce fail at inline_container.cc...] ... unexpected pos")
TORCH_WRITE_FAILURE = "inline_container.cc"


class RunFailure(RuntimeError):
    """A failure at run time (not bad input) whose message is the whole story: printed as one line."""


class StorageFault(RunFailure):
    """A file could not be written: the disk is full, broken or not writable."""


class DownloadFailed(RunFailure):
    """--download could not fetch the data set."""


def storage_fault(exc: BaseException) -> str | None:
    """The fault's name if `exc` is a write failing for lack of space, an I/O error or a permission, else None."""
    code = exc.errno if isinstance(exc, OSError) else None
    if isinstance(exc, OSError) and code is None:  # pyarrow's OSError carries the errno in its message only
        found = re.search(r"\[Errno (\d+)\]|errno (\d+)", str(exc))
        code = int(found.group(1) or found.group(2)) if found else None
    if code in STORAGE_ERRNOS:
        return f"{STORAGE_ERRNOS[code]} ({errno.errorcode[code]})"
    if isinstance(exc, RuntimeError) and TORCH_WRITE_FAILURE in str(exc):
        return "the write stopped short (torch: unexpected file position; most likely no space left on the device)"
    return None


@contextlib.contextmanager
def writing(path, intact: str, tmp=None, remove_tmp=None):
    """Writes to `path` (through the temporary local file `tmp`, if any) inside this block: a
    storage fault becomes StorageFault naming the path, the fault and `intact` (what is still
    whole and what to do), and `tmp` is removed (by `remove_tmp()` for a temporary file that is
    not local). Other errors pass through unchanged (tmp removed too)."""
    try:
        yield
    except BaseException as e:
        with contextlib.suppress(Exception):
            if remove_tmp is not None:
                remove_tmp()
            elif tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        fault = storage_fault(e)
        if fault is None:
            raise
        raise StorageFault(f"cannot write {path}: {fault}; {intact}") from e


def one_line(exc: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(exc).split())


def runtime_message(exc: BaseException) -> str | None:
    """The one-line message of a runtime failure: a RunFailure (DivergedError included), or a
    storage fault that no `writing` block named; None for anything else (a bug: a traceback)."""
    if isinstance(exc, RunFailure):
        return one_line(exc)
    for e in _chain(exc):
        fault = storage_fault(e)
        if fault is not None:
            where = getattr(e, "filename", None)
            return f"storage fault{' at ' + str(where) if where else ''}: {fault}; fix the storage and rerun the same command"
    return None


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


# The reference variant mixes the tail covariances again every step (ε[tail] @ Σ compounds);
# after a stage I this short the features have barely trained and the mixing blows the loss up.
SHORT_REFERENCE_STAGE1 = 20


def divergence_hint(variant: str, stage1_epochs: int, epochs: int, epoch: int) -> str:
    """The likely cause of a divergence, when there is one to name; '' otherwise."""
    if variant != "reference" or epoch < stage1_epochs or stage1_epochs >= SHORT_REFERENCE_STAGE1:
        return ""
    return (f"; likely cause: the reference variant after a stage I of only {stage1_epochs} epoch(s) (--epochs {epochs}): "
            f"it re-mixes the tail covariances every step, which compounds on barely trained features; give stage I "
            f"{SHORT_REFERENCE_STAGE1} epochs or more (--epochs, --stage1-epochs) or use --variant paper.")
