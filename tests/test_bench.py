"""Every script in bench/ runs in its --smoke mode (tiny sizes; the numbers mean nothing), so that
a benchmark cannot rot unnoticed. The scripts that start Ray or a train of processes are slow tests."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
# script -> what its smoke output must say (the side-by-side ratio it exists to print)
PYTHON = {
    "bench_data.py": r"data only\s+\d+\s+\d+\s+\d+\.\d\d",
    "bench_method.py": r"ISDA / RISDA: memory .* time \d+\.\d\dx.*\n(.*\n)*.*RISDA / CE = \d+\.\d{3}",
    "bench_precision.py": r"bf16 / fp32 = \d+\.\d\dx",
    "bench_scale.py": r"tiny\s+diag\s+\S+ KiB\s+0\.\d{4}",
    "bench_verify.py": r"ResNet-32 \(CIFAR\)\s+\d+\.\d MB\s+verify\s+\d+\.\d ms",
    "bench_speed.py": r"eager\+bf16\+contiguous\s+\|\s+1 \|.*\|\s+\d+\.\d\d \|(.*\n)*.*\d+ x 1 thread / 1 x \d+ threads = \d+\.\d\dx",
    "pack_cifar10lt.py": r"training images in 50000 slots",
}
NEEDS_DATA = {"bench_data.py": "--data-root", "pack_cifar10lt.py": "--src"}
SLOW = ("bench_stage1.py", "gpu_check.sh", "gpu_study.sh")


def smoke(cmd: list[str], tmp_path: Path, timeout: int = 600) -> str:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_every_bench_script_has_a_smoke_test():
    scripts = {p.name for p in BENCH.iterdir() if p.suffix in (".py", ".sh")}
    assert scripts == set(PYTHON) | set(SLOW)
    for name in scripts:
        assert "--smoke" in (BENCH / name).read_text(), name


@pytest.mark.parametrize("script", sorted(PYTHON))
def test_smoke(script, tmp_path, request):
    cmd = [sys.executable, str(BENCH / script), "--smoke"]
    if script in NEEDS_DATA:
        cmd += [NEEDS_DATA[script], str(request.getfixturevalue("cifar10_root"))]
    out = smoke(cmd, tmp_path)
    assert re.search(PYTHON[script], out), out[-3000:]


@pytest.mark.slow
def test_smoke_stage1_sharing(cifar10_root, tmp_path):
    out = smoke([sys.executable, str(BENCH / "bench_stage1.py"), "--smoke", "--data-root", str(cifar10_root)], tmp_path)
    assert re.search(r"search\s+2 trials: epochs 4 -> 3 \(1\.33x fewer\), wall \d+ s -> \d+ s \(\d+\.\d\dx less\)", out), out[-3000:]


@pytest.mark.slow
def test_smoke_gpu_check(cifar10_root, tmp_path):
    smoke(["bash", str(BENCH / "gpu_check.sh"), "--smoke"], tmp_path)
    figures = json.loads((tmp_path / "out" / "figures.json").read_text())
    assert figures["epoch_time_fp32"]["stage1_epoch_s"] > 0 and figures["full_run"]["epochs_run"] == 2
    assert figures["concurrent"]["finished"] == 2 and figures["concurrent"]["exit_codes"] == "0,0"


@pytest.mark.slow
def test_smoke_gpu_study(cifar10_root, tmp_path):
    smoke(["bash", str(BENCH / "gpu_study.sh"), "--smoke"], tmp_path)
    figures = json.loads((tmp_path / "out" / "figures.json").read_text())
    assert figures["cells"] == figures["finished"] == 2
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir() if p.is_dir()) == ["ce-paper-seed0", "risda-reference-seed0"]
