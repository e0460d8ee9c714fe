"""Which code ran an experiment, as the reports print it: the git commit and whether the tree was dirty."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout this file is in


def git(*args: str) -> str | None:
    """A read-only git command in the repository (no index refresh written), or None."""
    try:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20,
                           env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def code_state() -> dict:
    """{"commit": sha or None, "dirty": whether tracked files differ from it (None outside git)}."""
    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if head else None
    return {"commit": head, "dirty": None if status is None else bool(status.strip())}


def ablation_command(argv) -> str:
    """The command line of `ablations/run.py` with these arguments, as plan.json's argv records them."""
    return "python ablations/run.py " + shlex.join(map(str, argv))
