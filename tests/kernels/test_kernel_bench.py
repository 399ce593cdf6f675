"""Smoke test of ``benchmarks/kernel_bench.py`` at tiny sizes on the CPU (timings not checked)."""

import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_bench.py"
_SPEC = importlib.util.spec_from_file_location("kernel_bench", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

TINY = ["--device", "cpu", "--batch-size", "2", "--image-size", "16", "--steps", "1"]


def test_cpu_run_prints_a_row_per_variant(capsys):
    bench.main([*TINY, "--warmup", "1", "--compile-backend", "aot_eager"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| vgg10 b2 16px")]
    assert [row.split("|")[2].strip() for row in rows] == ["eager", "compile"]
    for row in rows:
        step_ms, speedup, penalty_ms, share = (float(c) for c in row.split("|")[3:7])
        assert step_ms > 0 and speedup > 0 and 0 < penalty_ms < step_ms
        # Every figure is printed rounded (step .2f, penalty .3f, share .2f): the share must lie
        # in the interval the printed step and penalty allow, not at their rounded ratio.
        low = 100 * (penalty_ms - 5e-4) / (step_ms + 5e-3) - 5e-3
        high = 100 * (penalty_ms + 5e-4) / max(step_ms - 5e-3, 1e-9) + 5e-3
        assert low <= share <= high, (share, low, high)


def test_bounded_model_fuses_bn_relu_only_for_triton(device, triton_backend):
    from pipeline.layers.bounded_bn import BoundedBatchNorm2d

    x = torch.randn(2, 3, 16, 16, device=device)
    for backend, fused in (("torch", 0), (triton_backend, 10)):
        bns = [
            m
            for m in bench.bounded_model("vgg10", backend, x).modules()
            if isinstance(m, BoundedBatchNorm2d)
        ]
        assert len(bns) == 10 and sum(m.relu for m in bns) == fused
        assert all(m.backend == backend and m.training for m in bns)


@pytest.mark.parametrize(
    "argv",
    [["--variants", "triton"], ["--cases", "alexnet"], ["--device", "cuda"]],
    ids=["triton_on_cpu", "unknown_case", "cuda_without_gpu"],
)
def test_bad_options_exit_2(argv, capsys):
    if argv == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as exc:
        bench.main([*TINY[2:], "--device", "cpu", *argv] if argv[0] != "--device" else argv)
    assert exc.value.code == 2
    assert argv[-1] in capsys.readouterr().err
