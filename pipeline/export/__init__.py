"""Export a pruned, folded model to deployable artefacts and record what was written.

Each module is imported on demand so that ``import pipeline.export`` stays cheap (no onnx,
onnxruntime, tensorrt or CUDA):

- :mod:`pipeline.export.onnx`: PyTorch to ONNX (float32 or float16), then checker and ONNX
  Runtime parity.
- :mod:`pipeline.export.tensorrt`: ONNX to a TensorRT engine (FP16, INT8, timing cache),
  running, verifying and timing it; :mod:`pipeline.export.calibration` feeds INT8 calibration.
- :mod:`pipeline.export.release`: every requested artefact of a release, verified.
- :mod:`pipeline.export.verify`: fold, export and verify models side by side (``recede run``).
- :mod:`pipeline.export.manifest`: a ``manifest.json`` with hashes, versions, config and metrics.

Every verification here judges under the one tolerance policy of :mod:`pipeline.core.tolerance`,
which folding and removal share.
"""
