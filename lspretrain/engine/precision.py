"""``strategy.precision: auto``: bf16 where the hardware computes it natively, else fp32.

A CPU without native bf16 (no AVX512-BF16 / AMX on x86, no BF16 extension on Arm) emulates
it, and a bf16 matmul there is an order of magnitude slower than fp32 (33x measured on an
AVX2-only AMD EPYC). ``auto`` therefore picks:

- bf16 on a CUDA device that supports it (``torch.cuda.is_bf16_supported``);
- bf16 on a CPU whose flags (``/proc/cpuinfo``) name native bf16, or, where the flags cannot
  be read, whose bf16 matmul is not slower than fp32 in a ~50 ms probe;
- fp32 otherwise.
"""
from __future__ import annotations

import functools
import logging
import time

import torch

__all__ = ["resolve_precision", "cpu_native_bf16", "cpu_bf16_slowdown"]

log = logging.getLogger(__name__)
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (AVX512 / AMX), Arm (FEAT_BF16)


def _cpu_flags() -> set[str] | None:
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, Arm
            return set(value.split())
    return None


@functools.lru_cache(maxsize=1)
def cpu_bf16_slowdown(size: int = 256, budget_s: float = 0.025) -> float:
    """Time per bf16 matmul / time per fp32 matmul on this CPU (about ``2 * budget_s``)."""

    def per_call(dtype: torch.dtype) -> float:
        a = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
        a @ a  # warm-up
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < budget_s or calls < 2:
            a @ a
            calls += 1
        return elapsed / calls

    return per_call(torch.bfloat16) / per_call(torch.float32)


@functools.lru_cache(maxsize=1)
def cpu_native_bf16() -> tuple[bool, str]:
    """(native, why) for this CPU, checked once per process."""
    flags = _cpu_flags()
    if flags is not None:
        found = sorted(flags & _NATIVE_BF16_FLAGS)
        if found:
            return True, f"CPU flags {', '.join(found)}"
        return False, "no avx512_bf16 / amx_bf16 / bf16 among the CPU flags"
    ratio = cpu_bf16_slowdown()
    return ratio <= 1.2, f"bf16 matmul probe: {ratio:.1f}x the fp32 time"


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """``requested`` ("auto", "bf16", "fp32") on ``device`` -> (precision, why)."""
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return ("bf16", "CUDA device with bf16") if supported else ("fp32", "CUDA device without bf16")
        return requested, "as configured"
    if requested == "fp32":
        return "fp32", "as configured"
    native, why = cpu_native_bf16()
    if requested == "auto":
        return ("bf16" if native else "fp32"), why
    if not native:
        log.warning("strategy.precision=bf16 on a CPU without native bf16 (%s): a bf16 matmul here takes %.0fx "
                    "the fp32 time, so expect training to be several times slower; strategy.precision=auto "
                    "chooses fp32 on such CPUs", why, cpu_bf16_slowdown())
    return "bf16", "as configured"
