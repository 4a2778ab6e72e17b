"""ComfyUI integration tests: run against the checkout named by COMFYUI_PATH, skipped with a
reason when it is not set. Where skipping would hide them (CI sets ULTRARES_REQUIRE_COMFYUI=1),
a missing COMFYUI_PATH is an error instead."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import comfy_harness

HERE = Path(__file__).resolve().parent
COMFY_PATH = comfy_harness.comfyui_path()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if COMFY_PATH is None and os.environ.get(comfy_harness.REQUIRE_ENV) == "1":
        raise pytest.UsageError(f"{comfy_harness.REQUIRE_ENV}=1 but {comfy_harness.SKIP_REASON}")
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.comfyui)
            if COMFY_PATH is None:
                item.add_marker(pytest.mark.skip(reason=comfy_harness.SKIP_REASON))


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    assert COMFY_PATH is not None
    return COMFY_PATH


@pytest.fixture(scope="session")
def comfy_nodes(comfyui_path: Path):
    """ComfyUI booted in this process on the CPU; returns its top-level ``nodes`` module."""
    return comfy_harness.boot_comfyui_in_process(comfyui_path)


@pytest.fixture(scope="session")
def pack_nodes(comfy_nodes) -> dict[str, type]:
    """The pack's node classes by node id, from its real ``comfy_entrypoint``."""
    return comfy_harness.load_pack_entrypoint()


@pytest.fixture
def clear_dir(pack_nodes, tmp_path):
    """An empty ``models/clear`` folder registered with ComfyUI for this test, beside the others."""
    import folder_paths

    folder = tmp_path / "clear"
    folder.mkdir()
    folder_paths.add_model_folder_path("clear", str(folder))
    yield folder
    paths, extensions = folder_paths.folder_names_and_paths["clear"]
    folder_paths.folder_names_and_paths["clear"] = ([p for p in paths if p != str(folder)], extensions)


@pytest.fixture
def only_model_folder(pack_nodes, tmp_path, monkeypatch):
    """``only_model_folder(name)``: an empty folder that is ComfyUI's only ``models/<name>`` for this test."""
    import folder_paths

    def make(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name,
                            ([str(folder)], set(folder_paths.supported_pt_extensions)))
        return folder

    return make
