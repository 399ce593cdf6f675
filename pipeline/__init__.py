"""recede: polarised BatchNorm training, structured channel pruning, exact folding and export.

Importing this package is cheap: it never imports onnx, onnxruntime, tensorrt or triton, and
never touches CUDA. Each stage lives in its own module; import the one you need, e.g.
``from pipeline.prune import prune_model``.
"""

__version__ = "0.1.0"
