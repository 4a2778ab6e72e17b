"""End to end: a headless ComfyUI server started with this pack lists every node of it.

ComfyUI only logs an import failure and keeps running, so /object_info is the real check."""

from __future__ import annotations

import os

import pytest

import comfy_harness


@pytest.fixture(scope="module")
def server(comfyui_path, tmp_path_factory):
    instance = comfy_harness.ComfyServer(comfyui_path, tmp_path_factory.mktemp("comfy_server"))
    instance.start()
    yield instance
    pid = instance.process.pid
    instance.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.server
def test_running_server_lists_every_node_of_the_pack(server, pack_nodes):
    assert pack_nodes, "the pack declares no nodes"
    object_info = server.get("/object_info")
    missing = sorted(set(pack_nodes) - set(object_info))
    assert not missing, f"not listed by ComfyUI: {missing}\n{server.log()[-4000:]}"
    for node_id in pack_nodes:
        assert object_info[node_id]["python_module"].startswith("custom_nodes.")
    import_times = server.log().split("Import times for custom nodes:")[-1].split("\n\n")[0]
    (pack_line,) = [line for line in import_times.splitlines() if line.endswith("/ultrares")]
    assert "IMPORT FAILED" not in pack_line
