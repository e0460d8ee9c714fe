"""risda.trainer.precision.resolve_precision: fp32/bf16 pass through; auto asks the hardware."""
from pathlib import Path

import pytest
import torch

from risda.trainer import precision
from risda.trainer.precision import cpu_flags, cpuinfo_flags, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("device", [CPU, CUDA, torch.device("mps")])
@pytest.mark.parametrize("requested", ["fp32", "bf16"])
def test_explicit_precisions_pass_through(requested, device):
    assert resolve_precision(requested, device) == requested


def test_unknown_precision_is_an_error():
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        resolve_precision("fp16", CPU)


def test_auto_on_this_cpu_follows_its_flags(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    native = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    assert resolve_precision("auto", CPU) == ("bf16" if native else "fp32")
    if Path("/proc/cpuinfo").exists():  # torch's probe and the kernel agree
        assert cpu_flags() == cpuinfo_flags() & {"avx512_bf16", "amx_bf16"}


@pytest.mark.parametrize("flags, expected", [({"avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16"),
                                             ({"avx512_bf16", "amx_bf16"}, "bf16"), (set(), "fp32")])
def test_auto_on_cpu_is_bf16_only_with_native_bf16(monkeypatch, flags, expected):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: set(flags))
    assert resolve_precision("auto", CPU) == expected


def test_auto_respects_a_held_down_onednn_isa(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16", "amx_bf16"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core")
    assert resolve_precision("auto", CPU) == "fp32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert resolve_precision("auto", CPU) == "bf16"


def test_cpu_flags_fall_back_to_proc_cpuinfo(monkeypatch, tmp_path):
    def broken():
        raise RuntimeError("private API changed")
    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", broken)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_tile amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpuinfo_flags(str(info)) >= {"avx512f", "amx_bf16"} and "avx512_bf16" not in cpuinfo_flags(str(info))
    monkeypatch.setattr(precision, "cpuinfo_flags", lambda: cpuinfo_flags(str(info)))
    assert cpu_flags() == {"amx_bf16"}
    assert cpuinfo_flags(str(tmp_path / "missing")) == set()


@pytest.mark.parametrize("capability, native, expected", [((9, 0), True, "bf16"), ((8, 0), True, "bf16"),
                                                           ((7, 0), False, "fp32"), ((7, 5), False, "fp32")])
def test_auto_on_cuda_needs_native_bf16(monkeypatch, capability, native, expected):
    """V100/T4 (7.x) emulate bf16: is_bf16_supported() says yes there, auto must not."""
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native or including_emulation
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert resolve_precision("auto", CUDA) == expected
    assert asked == [False]


def test_auto_elsewhere_is_fp32():
    assert resolve_precision("auto", torch.device("mps")) == "fp32"
    if not torch.cuda.is_available():
        assert resolve_precision("auto", CUDA) == "fp32"
