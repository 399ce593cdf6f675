"""Environment: package versions from metadata, CPU and GPU descriptions."""

from __future__ import annotations

import platform
import subprocess
import sys

import torch

from pipeline.core import environment as env


def test_versions_name_every_backend() -> None:
    found = env.versions()
    assert set(env.PACKAGES) | {"python"} == set(found)
    assert found["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert found["python"] == platform.python_version()
    assert found["recede"]


def test_package_version_falls_through_and_reports_absence() -> None:
    assert env.package_version("no-such-distribution-xyz") is None
    assert env.package_version("no-such-distribution-xyz", "torch") == env.versions()["torch"]


def test_device_describes_cpu_and_gpu() -> None:
    dev = env.device()
    assert f"{env.usable_cores()} cores available" in dev["cpu"]
    assert env.cpu_model() in dev["cpu"]
    assert dev["default_threads"] == torch.get_num_threads()
    assert (dev["cuda"] is None) == (not torch.cuda.is_available())


def test_environment_merges_versions_and_device() -> None:
    merged = env.environment()
    assert {"torch", "onnxruntime", "tensorrt", "triton", "python", "cpu", "cuda"} <= set(merged)


def test_versions_import_no_heavy_backend() -> None:
    code = (
        "import sys; from pipeline.core.environment import environment; environment()\n"
        "print(','.join(m for m in ('onnx', 'onnxruntime', 'tensorrt', 'triton') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
