"""Triton kernels, installed as ``regops.kernels``. Launchers take and return tensors; no autograd here.

Each module lists its kernels in ``COMPILE_SPECS`` (kernel, signature, constexprs) so that a test can compile
every kernel for real GPU targets without a GPU.

This folder sits at the top of a checkout, so code run from the checkout's root (``python -m pytest``, ``python -m
benchmarks``, a script there) finds it first under the bare name ``kernels``. That name belongs to a real
distribution (Hugging Face's ``kernels``, which transformers imports): imported under it, this module hands the
import to the installed distribution instead, or fails as a missing module would.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
