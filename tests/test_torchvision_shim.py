"""The import hook that lets PyPI's CUDA-built torchvision import beside CPU torch in the
ComfyUI test venv (``scripts/torchvision_cpu_shim.py``), on a small stand-in package shaped
like torchvision: an ``extension`` module saying whether the C ops loaded and a
``_meta_registrations`` module registering fake kernels for ``nms``/``qnms``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import uuid
from pathlib import Path

import pytest
import torch

SHIM = Path(__file__).resolve().parents[1] / "scripts" / "torchvision_cpu_shim.py"

META_REGISTRATIONS = '''
import torch

@torch.library.register_fake("{package}::nms")
def meta_nms(dets, scores, iou_threshold):
    return dets.new_empty(0, dtype=torch.long)

@torch.library.register_fake("{package}::qnms")
def meta_qnms(dets, scores, iou_threshold):
    return dets.new_empty(0, dtype=torch.long)
'''


@pytest.fixture
def shim(monkeypatch):
    """The shim module, loaded from scripts/ with its hooks confined to this test."""
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    spec = importlib.util.spec_from_file_location(f"shim_{uuid.uuid4().hex}", SHIM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def vision_like_package(tmp_path, monkeypatch, has_ops: bool) -> str:
    package = f"vision_{uuid.uuid4().hex[:12]}"  # op namespaces cannot be defined twice in a process
    folder = tmp_path / package
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "extension.py").write_text(f"def _has_ops():\n    return {has_ops}\n")
    (folder / "_meta_registrations.py").write_text(META_REGISTRATIONS.format(package=package))
    monkeypatch.syspath_prepend(str(tmp_path))
    return package


def test_without_the_hook_the_fake_kernel_registrations_fail_to_import(tmp_path, monkeypatch):
    package = vision_like_package(tmp_path, monkeypatch, has_ops=False)
    with pytest.raises(Exception, match="nms"):
        importlib.import_module(f"{package}._meta_registrations")


def test_the_hook_defines_the_schemas_the_missing_c_ops_would_have(shim, tmp_path, monkeypatch):
    package = vision_like_package(tmp_path, monkeypatch, has_ops=False)
    shim.install(package)
    module = importlib.import_module(f"{package}._meta_registrations")
    assert callable(module.meta_nms)
    ops = getattr(torch.ops, package)
    for op in ("nms", "qnms"):
        schema = f"{package}::{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
        assert str(getattr(ops, op).default._schema) == schema


def test_the_hook_defines_nothing_where_the_c_ops_loaded(shim, tmp_path, monkeypatch):
    package = vision_like_package(tmp_path, monkeypatch, has_ops=True)
    assert shim.define_missing_schemas(package) is False
    assert not hasattr(getattr(torch.ops, package), "nms")


def test_installing_twice_keeps_one_hook_and_the_hook_ignores_other_modules(shim):
    first = shim.install("torchvision")
    assert shim.install("torchvision") is first
    assert sum(isinstance(finder, shim.SchemaShim) for finder in sys.meta_path) == 1
    assert first.find_spec("torchvision.ops", None) is None
