"""Export a pruned, folded model to deployable artefacts and record what was written.

Each module is imported on demand so that ``import pipeline.export`` stays cheap (no onnx,
onnxruntime, tensorrt or CUDA):

- :mod:`pipeline.export.onnx`: PyTorch to ONNX (float32 or float16), then checker and ONNX
  Runtime parity.
- :mod:`pipeline.export.tensorrt`: ONNX to a TensorRT engine (FP16, INT8 from the QDQ graph,
  timing cache), running and verifying it.
- :mod:`pipeline.export.int8`: a folded fp32 graph to a QDQ INT8 graph (ONNX Runtime's static
  quantization); :mod:`pipeline.export.int8_check` judges it by agreement with fp32;
  :mod:`pipeline.export.int8_fallback` keeps the tensors INT8 hurts most in float;
  :mod:`pipeline.export.int8_export` is the stage that runs the three.
- :mod:`pipeline.export.release`: every requested artefact of a release, verified.
- :mod:`pipeline.export.verify`: fold, export and verify models side by side (``recede run``).
- :mod:`pipeline.export.manifest`: a ``manifest.json`` with hashes, versions, config and metrics.

Every verification here judges under the one tolerance policy of :mod:`pipeline.core.tolerance`,
which folding and removal share.
"""
