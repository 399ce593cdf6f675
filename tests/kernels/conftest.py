"""Fixtures for the kernel tests: the Triton backend runs in the CPU interpreter by default.

``TRITON_INTERPRET`` must be set before triton is first imported, hence at the top. On a GPU
machine, ``TRITON_INTERPRET=0 pytest tests/kernels`` compiles the kernels for real instead.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels._dispatch import interpreting, triton_importable  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when the kernels can be compiled for it, else the CPU (interpreter)."""
    if torch.cuda.is_available() and not interpreting():
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(scope="session")
def triton_backend(device: torch.device) -> str:
    """The string ``"triton"``, or a skip saying why the Triton backend cannot run here."""
    if not triton_importable():
        pytest.skip("triton is not importable; install it to test the Triton kernels")
    if device.type != "cuda" and not interpreting():
        pytest.skip("no CUDA and TRITON_INTERPRET is off; set TRITON_INTERPRET=1")
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
