"""Triton kernels, installed as ``regops.kernels``. Launchers take and return tensors; no autograd here.

Each module lists its kernels in ``COMPILE_SPECS`` (kernel, signature, constexprs) so that a test can compile
every kernel for real GPU targets without a GPU.
"""
