"""Fixtures for the kernel tests: each runs on the CPU interpreter and, on a GPU, compiled.

Every test that takes ``device`` (directly or through ``make_layers`` / ``triton_backend``) runs
twice: ``cpu``, under ``TRITON_INTERPRET=1`` (the default suite), and ``cuda``, marked ``gpu``,
with the kernels compiled for real (``make test-gpu``, i.e. ``pytest -m 'gpu or trt'``).

Triton decides between interpreting and compiling when a kernel is first built, so one process
runs one of the two: ``TRITON_INTERPRET`` defaults to 0 when the run selects ``gpu`` tests on a
CUDA machine and to 1 otherwise (set it yourself to override), and the other variant skips with
the reason. It must be decided before triton is first imported, hence ``pytest_configure``.
"""

import os

import pytest
import torch

from kernels.dispatch import interpreting, triton_importable


def default_interpret(markexpr: str, cuda: bool) -> str:
    """``TRITON_INTERPRET`` for a run: "0" (compile) for a gpu selection on CUDA, else "1"."""
    wants_gpu = "gpu" in markexpr and "not gpu" not in markexpr
    return "0" if wants_gpu and cuda else "1"


def pytest_configure(config: pytest.Config) -> None:
    markexpr = config.getoption("markexpr", "") or ""
    os.environ.setdefault(
        "TRITON_INTERPRET", default_interpret(markexpr, torch.cuda.is_available())
    )


@pytest.fixture(scope="session", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> torch.device:
    """``cpu`` (kernels in the Triton interpreter) or ``cuda`` (kernels compiled; marked gpu)."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device: the compiled-kernel variant needs a GPU")
        if interpreting():
            pytest.skip(
                "TRITON_INTERPRET=1 in this run, so the kernels are interpreted, not compiled; "
                "run `make test-gpu` (pytest -m gpu, TRITON_INTERPRET=0) to compile them"
            )
    return torch.device(request.param)


@pytest.fixture(scope="session")
def triton_backend(device: torch.device) -> str:
    """The string ``"triton"``, or a skip saying why the Triton backend cannot run here."""
    if not triton_importable():
        pytest.skip("triton is not importable; install it to test the Triton kernels")
    if device.type != "cuda" and not interpreting():
        pytest.skip(
            "TRITON_INTERPRET=0 in this run, so the CPU variant cannot run the kernels; "
            "run without -m gpu (or set TRITON_INTERPRET=1) to interpret them on the CPU"
        )
    return "triton"


MIXED_SIZES = (1, 7, 1000, 4099)


@pytest.fixture
def make_layers(device: torch.device):
    """Build per-layer Parameters: ``make_layers(sizes, dtype, scale, offset)``."""

    def make(sizes=MIXED_SIZES, dtype=torch.float32, scale=1.0, offset=0.0, seed=0):
        gen = torch.Generator().manual_seed(seed)
        return [
            torch.nn.Parameter((torch.randn(n, generator=gen) * scale + offset).to(device, dtype))
            for n in sizes
        ]

    return make


def clone_layers(layers):
    """Fresh Parameters with the same values (and no .grad)."""
    return [torch.nn.Parameter(p.detach().clone()) for p in layers]


@pytest.fixture
def clone():
    return clone_layers
