"""Fused kernels for polarised training, one op per file.

Each file holds ``<op>_ref`` (pure torch, the truth), the Triton kernel built lazily, its
launcher, and the public ``<op>(..., backend="auto")`` that picks Triton on CUDA when Triton is
importable and the reference otherwise. Importing this package never imports triton.

Ops: ``bounded_bn`` (fused bounded BN + ReLU, forward and backward), ``receding_penalty``,
``l1_penalty`` and ``polarization_penalty`` (value plus gradient added into ``.grad``, one
launch for all layers), ``ista_shrink`` (proximal step, one launch for all layers). Importing an
op's module registers it as a PyTorch custom op, ``torch.ops.recede.<name>``, so
``torch.compile`` and CUDA graphs see one op per call. Shared: ``packing`` (the flat buffer the
one-launch ops work on), ``dispatch`` (backend choice) and ``bounded_bn_kernels``.
``benchmarks/kernel_bench.py`` times them and whole training steps.
"""
