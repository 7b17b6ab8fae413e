"""Facts about the machine and the software that every figure is measured on."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

_CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
_DISTRIBUTIONS = (
    "numpy",
    "torch",
    "open_clip_torch",
    "onnx",
    "onnxruntime",
    "grpcio",
    "cdul-server",
    "cdul-client",
    "cdul-export",
)


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or the platform's processor string."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_identity() -> str:
    """Return the CPU family, model and clock that /proc/cpuinfo lists for the first CPU."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return ""
    fields: dict[str, str] = {}
    for line in cpuinfo.read_text().splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return (
        f"family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}, "
        f"{fields.get('cpu MHz', '?')} MHz"
    )


def cpu_flags() -> list[str]:
    """Return the SIMD flags of interest that /proc/cpuinfo lists for the first CPU."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return []
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in _CPU_FLAGS_OF_INTEREST if flag in present]
    return []


def usable_cores() -> int:
    """Return the number of CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def blas_info() -> list[dict[str, Any]]:
    """Return the BLAS and OpenMP libraries loaded in this process, with their thread counts."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [
        {
            "library": info.get("internal_api"),
            "file": Path(str(info.get("filepath", "?"))).name,
            "version": info.get("version"),
            "threads": info.get("num_threads"),
            "architecture": info.get("architecture"),
        }
        for info in threadpool_info()
    ]


def versions() -> dict[str, str]:
    """Return the installed versions of the distributions the benchmarks use."""
    found = {"python": platform.python_version()}
    for name in _DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine_facts() -> dict[str, Any]:
    """Return the machine's CPU, memory and kernel facts."""
    memory_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024**2, 1)
    return {
        "cpu_model": cpu_model(),
        "cpu_identity": cpu_identity(),
        "cpu_flags": cpu_flags(),
        "cores": usable_cores(),
        "memory_gib": memory_gib,
        "kernel": platform.release(),
        "machine": platform.machine(),
    }
