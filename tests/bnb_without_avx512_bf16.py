"""A pytest plugin (-p bnb_without_avx512_bf16): bitsandbytes as on a CPU without AVX512-BF16, whatever this CPU is —
its native library answers no, so its packed CPU kernel is never registered. tests/test_base_layers.py runs the
repacking guards under it, so they hold on both kinds of CPU."""
import importlib.abc
import importlib.machinery
import sys


class _Lib:
    def __init__(self, lib):
        self._lib = lib

    def __getattr__(self, name):
        if name == "has_avx512bf16_cpu":
            return lambda: False
        return getattr(self._lib, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.cextension":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            module.lib = _Lib(module.lib)

        spec.loader.exec_module = patched
        return spec


sys.meta_path.insert(0, _Finder())
import bitsandbytes.functional as F  # noqa: E402

assert not F.has_avx512bf16(), "simulation failed"
