"""Backend selection, and that importing the kernels never imports triton."""

import subprocess
import sys

import pytest
import torch

from kernels import dispatch

CPU = torch.device("cpu")


def test_auto_and_torch_pick_the_reference_on_cpu():
    assert dispatch.resolve_backend("auto", CPU) == "torch"
    assert dispatch.resolve_backend("torch", CPU) == "torch"


def test_unknown_backend_names_what_it_got():
    with pytest.raises(ValueError, match="got 'cuda'"):
        dispatch.resolve_backend("cuda", CPU)


def test_triton_on_cpu_without_interpreter_explains_the_fix(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_importable", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.resolve_backend("triton", CPU)


def test_triton_missing_names_the_package(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_importable", lambda: False)
    with pytest.raises(RuntimeError, match="pip install triton"):
        dispatch.resolve_backend("triton", CPU)
    assert dispatch.resolve_backend("auto", torch.device("cuda")) == "torch"


def test_importing_the_kernels_does_not_import_triton():
    code = (
        "import sys, kernels.bounded_bn, kernels.receding_penalty, kernels.l1_penalty, "
        "kernels.polarization_penalty, kernels.ista_shrink; "
        "print('triton' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("markexpr", "cuda", "want"),
    [
        ("gpu or trt", True, "0"),  # make test-gpu on a GPU: compile the kernels
        ("gpu or trt", False, "1"),
        ("not slow", True, "1"),  # the default suite interprets them on the CPU
        ("not gpu", True, "1"),
        ("", False, "1"),
    ],
)
def test_gpu_runs_compile_and_the_default_suite_interprets(markexpr, cuda, want):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "kernel_fixtures", Path(__file__).parent / "conftest.py"
    )
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)  # by path: tests/conftest.py is also named conftest
    assert fixtures.default_interpret(markexpr, cuda) == want
