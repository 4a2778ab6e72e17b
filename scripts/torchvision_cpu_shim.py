"""Test infrastructure: lets PyPI's torchvision wheel import beside the CPU build of torch.

PyPI's torchvision 0.28.0 for x86_64 Linux is built against the CUDA build of torch 2.13.0.
Beside the CPU build its C extension (``torchvision/_C.so``) cannot load (it links
``libc10_cuda.so``), and ``import torchvision`` then dies in ``torchvision/_meta_registrations.py``:
that module registers fake kernels for the ops ``torchvision::nms`` and ``torchvision::qnms``,
whose schemas only the C extension defines ("operator torchvision::nms does not exist").
ComfyUI imports torchvision while it starts (``comfy/sd.py`` -> ``comfy/ldm/cascade/
stage_c_coder.py``) and never calls its C ops, so defining the two schemas (without kernels)
just before that module runs is all it needs. Where the C extension loads, nothing is defined.

``scripts/prepare_comfyui_venv.sh`` copies this file into the venv's site-packages with a
``.pth`` line that imports it at interpreter start. Importing it only adds an import hook (no
torch import): the schemas are defined when torchvision itself is imported. It is never part
of the pack that users install.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

# The two op schemas _meta_registrations.py registers fake kernels for, as torchvision's C
# extension declares them.
SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
           "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_libraries: list = []  # the schema libraries must live as long as the process


def define_missing_schemas(package: str = "torchvision") -> bool:
    """Define ``package``'s op schemas if its C extension did not; True when it had to."""
    import torch

    extension = importlib.import_module(f"{package}.extension")
    if extension._has_ops():
        return False
    library = torch.library.Library(package, "FRAGMENT")
    for schema in SCHEMAS:
        library.define(schema)
    _libraries.append(library)
    return True


class _DefineSchemasFirst(importlib.abc.Loader):
    """Runs the real loader of ``<package>._meta_registrations`` after defining the schemas."""

    def __init__(self, inner: importlib.abc.Loader, package: str):
        self.inner, self.package = inner, package

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        define_missing_schemas(self.package)
        self.inner.exec_module(module)

    def __getattr__(self, name: str):  # get_source, get_code, ... for tracebacks and tools
        return getattr(self.inner, name)


class SchemaShim(importlib.abc.MetaPathFinder):
    """Import hook for ``<package>._meta_registrations`` (``package`` is torchvision but in tests)."""

    def __init__(self, package: str = "torchvision"):
        self.package = package
        self.target = f"{package}._meta_registrations"

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.target:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _DefineSchemasFirst(spec.loader, self.package)
        return spec


def install(package: str = "torchvision") -> SchemaShim:
    """Put the hook for ``package`` first on ``sys.meta_path`` (once); returns it."""
    for finder in sys.meta_path:
        if isinstance(finder, SchemaShim) and finder.package == package:
            return finder
    finder = SchemaShim(package)
    sys.meta_path.insert(0, finder)
    return finder


install()
