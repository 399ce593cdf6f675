import subprocess
import sys


def test_import_pipeline_pulls_in_no_heavy_backend():
    code = (
        "import sys, pipeline, pipeline.cli.main, pipeline.prune.stage, pipeline.fold.batchnorm, pipeline.run.pipeline, kernels.bounded_bn\n"
        "heavy = [m for m in ('onnx', 'onnxruntime', 'tensorrt', 'triton') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import pipeline imported {out.stdout.strip()}"
