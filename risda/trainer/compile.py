"""Whether a run torch.compiles its backbone: `--compile auto | on | off`.

What is compiled: the backbone's training forward, and through it (AOTAutograd) its backward,
as `torch.compile(model, dynamic=False)`, on CUDA with CUDA graphs (mode "reduce-overhead"; not
yet measured on a GPU by this project), on CPU in the default mode. The loss, the RISDA
statistics, the optimiser step and every evaluation or feature pass stay eager: the loss's
per-class unique() and the statistics are data-dependent. Full batches go through the compiled
forward; an epoch's last, smaller batch through the eager one, which holds the same parameters,
so there is one graph and no recompile.

Reuse: dynamo keeps a compiled graph on the forward's code, not on the model instance, so the
next run in the same process (the next Ray trial of a reused actor) with the same shapes, dtype,
precision and memory format compiles nothing (tests/test_compile.py). Across processes torch's
inductor cache on disk makes a second compile cheaper again.

Numerics: compiled fp32 is not bit-identical to eager fp32 (fused kernels sum in another
order); the exactness contract (shared stage I, resume) is stated for eager fp32 on one thread
count, and compiled runs are tested to stay within a tolerance of it (tests/test_compile.py).

auto compiles where it pays, measured with bench/bench_speed.py (ResNet-32, batch 100):
  CUDA  on: at batch 100 ResNet-32 is bound by kernel launches, which compilation and CUDA
        graphs remove; skipped for runs under MIN_STEPS steps, which cannot repay the compile.
  CPU   on for fp32, where compiled/eager is CPU_GAIN["fp32"] (fusing batch norm and ReLU into
        fewer passes over memory), when the run is long enough to repay the compile, a minute
        or more on a small CPU: MIN_STEPS. Off for bf16: CPU_GAIN["bf16"] is within a shared
        machine's noise and does not repay the compile of a typical run.
  other off (MPS, XPU: not measured).
  and off wherever torch.compile cannot run (no C compiler for inductor's CPU kernels).
"""
from __future__ import annotations

import shutil

import torch

from .config import COMPILES

MIN_STEPS = 1000   # training steps a run needs before auto compiles: a 60-90 s compile, repaid at ~0.2 s/step
# compiled / eager images/s of the training step, bench/bench_speed.py on a 2-core AMD EPYC
# (AVX512-BF16) VM, 1 thread, contiguous, median of 5 rounds, 2026-12-07 (README, Speed); at 2
# threads 1.38 and 1.15. 2026-12-03 on another VM of the same kind: 1.48 and 1.06.
CPU_GAIN = {"fp32": 1.33, "bf16": 1.13}
CPU_PAYS = 1.15    # the gain auto asks for on CPU


def compile_available() -> str | None:
    """None if torch.compile can run here, else why not."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang", "c++", "g++")):
        return "no C compiler for inductor's kernels (install gcc)"
    return None


def resolve_compile(requested: str, device: torch.device, precision: str, steps: int) -> tuple[bool, str]:
    """(compile?, why) for a run of `steps` training steps in `precision` on `device`."""
    if requested not in COMPILES:
        raise ValueError(f"unknown compile {requested!r}: choose auto, on or off")
    if requested == "off":
        return False, "off: asked for"
    missing = compile_available()
    if requested == "on":
        if missing:
            raise RuntimeError(f"--compile on: {missing}; or pass --compile off")
        return True, "on: asked for"
    if missing:
        return False, f"auto: off, {missing}"
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        return False, f"auto: off on {device.type} (not measured)"
    if device.type == "cpu" and CPU_GAIN[precision] < CPU_PAYS:
        return False, f"auto: off, cpu {precision} compiled/eager measured {CPU_GAIN[precision]:.2f}x, under {CPU_PAYS}x"
    if steps < MIN_STEPS:
        return False, f"auto: off, {steps} training steps cannot repay the compile (under {MIN_STEPS})"
    if device.type == "cuda":
        return True, f"auto: on, cuda is launch-bound at small batches; {steps} steps"
    return True, f"auto: on, cpu {precision} compiled/eager measured {CPU_GAIN[precision]:.2f}x; {steps} steps"


def compile_forward(model: torch.nn.Module, device: torch.device):
    """The compiled forward of `model` (the same parameters; the model itself stays eager)."""
    if torch.device(device).type != "cuda":
        return torch.compile(model, dynamic=False)
    compiled = torch.compile(model, dynamic=False, mode="reduce-overhead")

    def forward(x):
        torch.compiler.cudagraph_mark_step_begin()  # a new training step: last step's outputs may be overwritten
        return compiled(x)
    return forward
