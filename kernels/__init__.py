"""Fused kernels for polarised training, one op per file.

Each file holds ``<op>_ref`` (pure torch, the truth), the Triton kernel built lazily, its
launcher, and the public ``<op>(..., backend="auto")`` that picks Triton on CUDA when Triton is
importable and the reference otherwise. Importing this package never imports triton.
"""
