"""Backend choice for the kernel ops: ``"auto"``, ``"torch"`` or ``"triton"``.

Triton is imported here only when a caller asks for it (CUDA tensors under ``"auto"``, or an
explicit ``"triton"``), so ``import kernels.<op>`` stays free of it.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")
_TRUE = ("1", "true", "on", "yes")


@functools.cache
def triton_importable() -> bool:
    """True when ``import triton`` succeeds (checked once, on first use)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to run kernels on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a requested backend into ``"torch"`` or ``"triton"`` for tensors on ``device``.

    ``"auto"`` picks Triton for CUDA tensors when triton imports, else the torch reference.
    ``"triton"`` on CPU tensors runs only under the interpreter (``TRITON_INTERPRET=1``).

    Raises:
        ValueError: ``backend`` is not one of :data:`BACKENDS`.
        RuntimeError: ``"triton"`` was asked for but cannot run here; the message says why.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_importable() else "torch"
    if not triton_importable():
        raise RuntimeError(
            "backend='triton' needs the `triton` package, which failed to import; "
            "install it (`pip install triton`) or pass backend='torch'"
        )
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"backend='triton' got tensors on {device}, and Triton compiles only for CUDA; "
            "move them to a GPU, set TRITON_INTERPRET=1 before triton is imported to run the "
            "kernel in the CPU interpreter, or pass backend='torch'"
        )
    return "triton"
