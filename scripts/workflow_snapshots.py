"""Refresh what the workflow tests compare against: the node-definition snapshot and the API twins.

    COMFYUI_PATH=/path/to/ComfyUI <ComfyUI's python> scripts/workflow_snapshots.py definitions
    python scripts/workflow_snapshots.py twins
    python scripts/workflow_snapshots.py labels

``definitions`` starts a headless ComfyUI (CPU, a fresh base directory, only this pack loaded),
puts one probe file into every model folder and the input folder, and writes
``tests/workflows/node_definitions.json``: the ``/object_info`` interface data (inputs, widget
order, outputs; no tooltips) of every node type the workflows in ``workflows/`` use and of
every node of this pack. The probe marks which choice lists are folder contents. ``twins`` writes
``tests/workflows/<name>.api.json`` from each UI workflow with that snapshot; ``labels`` writes
the pack's ``locales/en/nodeDefs.json`` (the input labels the frontend shows) from it. The tests
check that all three are current (the snapshot against a live ComfyUI when one is available).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import workflow_graph as wg  # noqa: E402

PACK_PREFIX = wg.PACK_PREFIX


def used_node_types() -> set[str]:
    return {node["type"] for path in wg.workflow_paths() for node in wg.load_workflow(path)["nodes"]
            if node["type"] not in wg.FRONTEND_ONLY}


def snapshot(object_info: dict, version: str) -> dict:
    """The snapshot of the used node types and of every pack node, from a live ``/object_info``."""
    wanted = used_node_types() | {name for name in object_info if name.startswith(PACK_PREFIX)}
    missing = sorted(wanted - set(object_info))
    if missing:
        raise SystemExit(f"ComfyUI does not know the node types {missing}")
    return {"comfyui_version": version,
            "nodes": {name: wg.snapshot_entry(object_info[name]) for name in sorted(wanted)}}


def place_probes(folder_names: list[str], models_dir: Path, input_dir: Path) -> None:
    """One probe file per model folder (ComfyUI rescans a folder when it changes) and input folder."""
    for name in folder_names:
        if name != "custom_nodes":
            (models_dir / name).mkdir(parents=True, exist_ok=True)
            (models_dir / name / f"{wg.FILE_PROBE}.safetensors").write_bytes(b"")
    (input_dir / f"{wg.FILE_PROBE}.png").write_bytes(b"")


def refresh_definitions() -> None:
    import comfy_harness  # needs torch: ComfyUI's Python

    path = comfy_harness.comfyui_path()
    if path is None:
        raise SystemExit(comfy_harness.SKIP_REASON)
    with tempfile.TemporaryDirectory() as work:
        base = Path(work) / "base"
        (base / "custom_nodes").mkdir(parents=True)
        server = comfy_harness.ComfyServer(path, Path(work), extra_args=["--base-directory", str(base)])
        server.start()
        try:
            place_probes(server.get("/models"), base / "models", Path(work) / "input")
            data = snapshot(server.get("/object_info"), server.get("/system_stats")["system"]["comfyui_version"])
        finally:
            server.stop()
    wg.DEFINITIONS_PATH.write_text(wg.dump_json(data))
    print(f"wrote {wg.DEFINITIONS_PATH} ({len(data['nodes'])} node types, ComfyUI {data['comfyui_version']})")


def refresh_twins() -> None:
    definitions = wg.load_definitions()
    for path in wg.workflow_paths():
        twin = wg.twin_path(path)
        twin.write_text(wg.dump_json(wg.ui_to_api(wg.load_workflow(path), definitions)))
        print(f"wrote {twin}")


def refresh_labels() -> None:
    wg.LABELS_PATH.parent.mkdir(parents=True, exist_ok=True)
    wg.LABELS_PATH.write_text(wg.dump_json(wg.node_labels(wg.load_definitions())))
    print(f"wrote {wg.LABELS_PATH}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["definitions", "twins", "labels"])
    args = parser.parse_args()
    {"definitions": refresh_definitions, "twins": refresh_twins, "labels": refresh_labels}[args.what]()


if __name__ == "__main__":
    main()
