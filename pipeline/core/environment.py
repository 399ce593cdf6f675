"""Describe where numbers were measured: package versions, the CPU, the GPU.

Used by ``bench`` (every latency table names its machine), the run report and the release
manifest. Versions come from installed package metadata, so nothing heavy is imported; only
``torch`` is imported, to ask for the GPU and the thread count.
"""

from __future__ import annotations

import os
import platform
from typing import Any

# Report key -> distribution names, first installed wins (GPU builds ship under other names).
PACKAGES: dict[str, tuple[str, ...]] = {
    "recede": ("recede",),
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
    "triton": ("triton", "pytorch-triton"),
}


def package_version(*distributions: str) -> str | None:
    """Installed version of the first of ``distributions`` that is installed, else None."""
    from importlib import metadata

    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str | None]:
    """Versions of recede, torch, torchvision, onnx, onnxruntime, tensorrt, triton and Python
    (None for a package that is not installed)."""
    import pipeline

    found = {key: package_version(*names) for key, names in PACKAGES.items()}
    found["recede"] = found["recede"] or pipeline.__version__  # run from a checkout
    found["python"] = platform.python_version()
    return found


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def gpu_description() -> str | None:
    """``"<name>, <memory> GiB, sm_<major><minor>, CUDA <version>"``, or None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return (
        f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}, "
        f"CUDA {torch.version.cuda}"
    )


def device() -> dict[str, Any]:
    """The hardware: ``cpu`` (model and usable cores), ``default_threads`` (torch's intra-op
    threads before any pinning), ``cuda`` (GPU description, None without one), ``platform``."""
    import torch

    return {
        "cpu": f"{cpu_model()}, {usable_cores()} cores available",
        "default_threads": torch.get_num_threads(),
        "cuda": gpu_description(),
        "platform": platform.platform(),
    }


def environment() -> dict[str, Any]:
    """Versions and hardware that latency numbers depend on: :func:`versions` and
    :func:`device` in one mapping."""
    return {**versions(), **device()}
