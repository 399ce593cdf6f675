"""Export a pruned, folded model to deployable artefacts and record what was written.

Three modules, each imported on demand so that ``import pipeline.export`` stays cheap (no onnx,
onnxruntime, tensorrt or CUDA):

- :mod:`pipeline.export.onnx`: PyTorch to ONNX, then checker and ONNX Runtime parity.
- :mod:`pipeline.export.tensorrt`: ONNX to a TensorRT engine, running and timing it.
- :mod:`pipeline.export.manifest`: a ``manifest.json`` with hashes, versions, config and metrics.
"""
