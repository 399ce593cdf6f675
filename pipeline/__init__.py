"""recede: polarised BatchNorm training, structured channel pruning, exact folding and export.

Importing this package is cheap: it never imports onnx, onnxruntime, tensorrt or triton, and
never touches CUDA. Each stage is a folder; a folder imports only the ones listed before it
(``tests/test_import_graph.py`` holds them to one way):

- ``core/``: what every stage shares: atomic writes and output folders, integrity, numerics,
  tolerances and verification verdicts, progress, processes.
- ``layers/``: bounded BN, BN subclasses with an activation tail, the corrected conv.
- ``config.py``, ``models/`` and ``data/``: what a run is made of: its configuration, the model
  zoo and the (pruned) model format, the datasets.
- ``graph/``: the channel graph (which channels go together, traced through any model) and
  what each channel group costs.
- ``train/``: polarised training: penalties, the budget controller, ISTA, resume, DDP.
- ``prune/``: rank, plan, remove exactly, absorb constants; the automatic threshold.
- ``fold/``: BN folded into convs; border corrections as static forms.
- ``export/``: ONNX, FP16, TensorRT, the manifest, one export-and-verify path.
- ``bench/``: latency on every backend, interleaved, with its noise, and the release gate.
- ``run/``: the stages wired into ``recede run``, its report, Markdown and plots.
- ``cli/``: the ``recede`` command line.

Import the module you need, e.g. ``from pipeline.prune.stage import prune_model``.
"""

__version__ = "0.1.0"
