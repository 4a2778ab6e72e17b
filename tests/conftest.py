"""Shared test set-up: the pack is importable as ``ultrares`` from this checkout, and Triton
kernels run in Triton's CPU interpreter when no GPU is present."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Must be set before the first `import triton` anywhere in the session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _import_checkout_as_ultrares() -> None:
    """Bind the name ``ultrares`` to this checkout, whatever an installed copy points at.

    The repository root is the package (ComfyUI imports it from custom_nodes/ by path), so
    tests import it under a fixed name; binding it here keeps several checkouts of the
    pack on one machine from testing each other's code.
    """
    spec = importlib.util.spec_from_file_location(
        "ultrares", REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["ultrares"] = module
    spec.loader.exec_module(module)


_import_checkout_as_ultrares()


@pytest.fixture
def triton_device() -> str:
    """The device Triton kernels run on in this session: CUDA, or CPU under the interpreter."""
    from ultrares.kernels.backend import triton_importable

    if not triton_importable():
        pytest.fail("triton is not installed: install the test extra (pip install -e '.[test]')")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def one_cpu_thread():
    """One intra-op thread for a whole test module, then the previous setting.

    Tests built on tiny models run many small ops: a second thread only adds pool overhead,
    and stalls on a busy machine. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_cpu_thread")``. It lasts the module, and a
    module-scoped fixture that computes a result to compare with also requests it, so both
    sides of a comparison run the same arithmetic whatever the order and the machine's
    thread count (a reduction split over two threads rounds differently).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
