"""Which precision a run trains in: `--precision auto | fp32 | bf16`.

fp32 and bf16 are taken as asked (bf16 = autocast to bfloat16 around the forward pass; the
RISDA statistics and loss stay fp32 whatever is asked, see risda.trainer.risda_objective). `auto` picks bf16 only
where bf16 autocast is *fast*, not merely possible, and fp32 everywhere else:

  CUDA   bf16 when the device has native bf16 tensor cores (compute capability 8.0+, Ampere and
         later; ROCm devices count as native). `torch.cuda.is_bf16_supported()` alone also says
         yes on older GPUs (V100, T4) where bf16 is emulated and slower than fp32, so it is
         asked with `including_emulation=False` and the device's own capability is checked.
  CPU    bf16 when the CPU has native bf16 arithmetic that oneDNN (torch's convolutions
         and matmuls) uses: AVX512-BF16 (`avx512_bf16`: AMD Zen 4/5, Intel Cooper Lake) or
         AMX (`amx_bf16`: Intel Sapphire Rapids and later). Without them bf16 is emulated by
         conversions and loses badly. Measured with bench/bench_precision.py (ResNet-32
         training steps, batch 100, 1 thread) on an AMD EPYC Zen 4: bf16/fp32 = 1.8x with
         AVX512-BF16; the same machine with oneDNN held to plain AVX512 (ONEDNN_MAX_CPU_ISA=
         AVX512_CORE) 0.47x, held to AVX2 0.06x. So the AVX512-BF16 instructions are what
         makes bf16 pay off, with or without AMX; a held-down ONEDNN_MAX_CPU_ISA is respected.
         `torch.backends.cpu.get_cpu_capability()` cannot tell these apart (it says "AVX512"
         for all three), so the flags are read from torch's CPU feature probe, or from
         /proc/cpuinfo where that probe is missing. ARM CPUs (bf16 in SVE) are not measured:
         fp32.
  other  (MPS, XPU, ...) fp32.

An explicit `bf16` is honoured even where it is slow: that is the user's call.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # x86 flag names, as /proc/cpuinfo and torch spell them
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below the first one with bf16 instructions
ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision to train in, "fp32" or "bf16": `requested` as it is, or for "auto" bf16 where
    bf16_is_fast(device)."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}: choose auto, fp32 or bf16")
    if requested != "auto":
        return requested
    return "bf16" if bf16_is_fast(torch.device(device)) else "fp32"


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast beats fp32 on this device (module docstring)."""
    if device.type == "cuda":
        return cuda_has_native_bf16(device)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def cuda_has_native_bf16(device: torch.device) -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.4 has no including_emulation
        native = torch.cuda.is_bf16_supported()
    if torch.version.hip:
        return native
    # is_bf16_supported asks about the current device; the run may be on another one
    return native and torch.cuda.get_device_capability(device)[0] >= 8


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 on this CPU, and oneDNN allowed to use them (module docstring)."""
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if isa in ONEDNN_ISAS_WITHOUT_BF16:
        return False
    return bool(cpu_flags() & BF16_FLAGS)


def cpu_flags() -> set[str]:
    """The CPU's bf16 feature flags: torch's own probe, else /proc/cpuinfo."""
    probe = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)  # private: a dict of flags
    if probe is not None:
        try:
            flags = probe()
            if isinstance(flags, dict) and BF16_FLAGS <= flags.keys():
                return {name for name in BF16_FLAGS if flags[name]}
        except Exception:  # a private API: any change to it falls back to /proc/cpuinfo
            pass
    return cpuinfo_flags() & BF16_FLAGS


def cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The first processor's `flags` of /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()
