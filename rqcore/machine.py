"""Which CPU this is: every speed figure names the CPU it came from (AVX2-only and AVX-512/AMX machines differ
a lot, and so does what runs fastest on them)."""
from __future__ import annotations

import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides fp32 / bf16 speed here


def cpu_flags() -> list[str]:
    """The CPU_FLAGS this CPU has (from /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [flag for flag in CPU_FLAGS if flag in flags]


def native_bf16(device: torch.device | None = None) -> bool:
    """Does `device` (default: the CPU) multiply bf16 in hardware? Elsewhere (e.g. AVX2-only CPUs) bf16 is emulated
    and slower."""
    device = torch.device("cpu") if device is None else device
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    return device.type == "cpu" and any(getattr(cpu, name, lambda: False)()
                                        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def cpu_tag() -> dict:
    """Attached to every record: figures from CPUs with and without AVX-512 / native bf16 differ a lot."""
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)()
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "torch_cpu_capability": capability}
