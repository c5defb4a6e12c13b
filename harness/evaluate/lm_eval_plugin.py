"""Makes ``lm_eval --model moe-harness`` work without importing anything of ours first.

lm-eval finds models in a registry it fills when ``lm_eval.models`` is imported, and has no
plugin discovery. The package installs this module at the top of site-packages as
``_moe_harness_lm_eval`` with a ``.pth`` line (harness/evaluate/lm_eval_plugin_startup.txt, installed as
moe_harness_lm_eval.pth) that imports it at interpreter start. It only
puts a finder first on ``sys.meta_path`` (no other import); once ``lm_eval.models`` has loaded,
the finder adds ``moe-harness`` to the registry as a lazy ``module:Class`` entry, so torch
and our model code load only when that model is asked for. The installed copy is taken at
install time: reinstall (`make install`) after editing this file.
"""

import importlib.abc
import sys

MODEL = "moe-harness"
TARGET = "harness.evaluate.lm_eval_model:HarnessLM"
WATCHED = "lm_eval.models"


def register() -> None:
    from lm_eval.api.registry import model_registry

    if MODEL not in model_registry:
        model_registry.register(MODEL, target=TARGET)


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        register()

    def __getattr__(self, name):  # resource readers and the like: the wrapped loader's
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
