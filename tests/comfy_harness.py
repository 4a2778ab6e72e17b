"""Helpers for the ComfyUI integration tests: boot ComfyUI in-process on the CPU, build tiny
random-weight models from ComfyUI's real classes, and run a headless server.

They work on the ComfyUI they find by looking at it, never at its version number: the
0.3.64 checkout the tests run against and the 0.38 line users run differ in a few signatures
(``PromptExecutor(cache_args=...)``, ``FluxParams.txt_ids_dims``, QK-norm ``.weight`` keys,
throttled progress bars), and each helper below follows whichever the host has.

Nothing here imports ComfyUI at import time: the core suite collects this module on
machines without ComfyUI, where the integration tests are skipped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
COMFYUI_ENV = "COMFYUI_PATH"
REQUIRE_ENV = "ULTRARES_REQUIRE_COMFYUI"
SKIP_REASON = (
    f"{COMFYUI_ENV} is not set: the ComfyUI integration tests need a ComfyUI checkout "
    "(see tests/README.md for how to prepare one)"
)

# A Flux with ComfyUI's real classes, small enough to run in milliseconds on a CPU.
TINY_FLUX_CONFIG: dict[str, Any] = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48,
    hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
    axes_dim=[8, 12, 12], theta=10000, qkv_bias=True, guidance_embed=True, patch_size=2,
)

# An SD1.5-layout UNet (two levels, attention at both) with narrow channels; SD15 adds
# its own head settings (8 heads).
TINY_SD15_CONFIG: dict[str, Any] = dict(
    use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=32,
    num_res_blocks=[1, 1], channel_mult=[1, 2],
    transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
    context_dim=32, use_linear_in_transformer=False,
    adm_in_channels=None, use_temporal_resblock=False, use_temporal_attention=False,
    use_spatial_transformer=True, legacy=False,
)

# An SDXL-layout UNet: no attention at the full-resolution level, two transformer blocks per
# SpatialTransformer (block_index 0 and 1), linear proj_in/proj_out, and the label_emb that
# takes SDXL's 2816-wide pooled-text + size conditioning.
TINY_SDXL_CONFIG: dict[str, Any] = dict(
    TINY_SD15_CONFIG, use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential",
    transformer_depth=[0, 2], transformer_depth_output=[0, 0, 2, 2], transformer_depth_middle=2,
    num_head_channels=16,
)


def comfyui_path() -> Path | None:
    """The ComfyUI checkout named by ``COMFYUI_PATH``; raises if it is set but not a checkout."""
    value = os.environ.get(COMFYUI_ENV)
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        raise RuntimeError(f"{COMFYUI_ENV}={value} is not a ComfyUI checkout (no main.py / comfy/)")
    return path


def boot_comfyui_in_process(path: Path) -> ModuleType:
    """Import ComfyUI from ``path`` with CPU settings; returns its top-level ``nodes`` module.

    ``comfy.cli_args`` parses no command line unless asked to, so the CPU flag is set on its
    parsed ``args`` before ``comfy.model_management`` reads them.
    """
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.disable_all_custom_nodes = True
    import comfy.model_management  # noqa: F401  (reads args.cpu)
    import utils.extra_config  # noqa: F401  (as main.py does: `nodes` puts comfy/ first on sys.path,
    import nodes  # after which `utils` would name comfy/utils.py)

    unthrottle_progress_bars()
    return nodes


# Newer comfy/utils.py (Comfy-Org/ComfyUI 09708eae) sends a ProgressBar update to the UI only
# 100 ms and 0.5 % after the previous one; tests that count the updates turn that off.
PROGRESS_THROTTLE_SETTINGS = ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT")


def unthrottle_progress_bars() -> list[str]:
    """Set the host's progress-bar throttle to 0 where it has one; returns the settings changed."""
    import comfy.utils

    present = [name for name in PROGRESS_THROTTLE_SETTINGS if hasattr(comfy.utils, name)]
    for name in present:
        setattr(comfy.utils, name, 0)
    return present


def prompt_executor(server: Any):
    """ComfyUI's ``PromptExecutor`` for ``server``, with the cache settings newer hosts require.

    Newer execution.py (Comfy-Org/ComfyUI 04e2a914) reads ``cache_args["ram"]`` and
    ``["ram_inactive"]`` on every run (a missing dict raises ``TypeError``); main.py passes them
    with ``"lru"``. 0s keep the classic cache without RAM-pressure eviction.
    """
    import execution

    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        return execution.PromptExecutor(server, cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})
    return execution.PromptExecutor(server)


class RecordingServer:
    """What ``PromptExecutor`` needs from the server: it records the messages sent to the UI, the
    progress texts nodes send (``PromptServer.send_progress_text``) and the progress-bar updates
    with their previews."""

    def __init__(self) -> None:
        self.client_id = self.last_node_id = self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []
        self.texts: list[tuple[str, str]] = []
        """``(node id, text)`` of every progress text."""
        self.progress: list[tuple[int, int, Any, str | None]] = []
        """``(value, total, preview, node id)`` of every progress-bar update."""

    def send_sync(self, event: str, data: dict, sid=None) -> None:
        self.messages.append((event, data))

    def send_progress_text(self, text: str, node_id: str, sid=None) -> None:
        self.texts.append((str(node_id), text))

    def previews(self) -> list:
        """The preview images sent, in order (``("JPEG", PIL image, max size)`` tuples)."""
        return [preview for _, _, preview, _ in self.progress if preview is not None]

    def queue_updated(self) -> None:
        pass

    def events(self) -> list[str]:
        return [event for event, _ in self.messages]

    def execution_error(self) -> dict:
        """The one ``execution_error`` message: what the frontend's error dialog shows."""
        (error,) = [data for event, data in self.messages if event == "execution_error"]
        return error


def source_node(node_id: str, io_type: Any, value: Any) -> type:
    """A V3 node that outputs ``value`` (a model, an image ...) as ``io_type``, to feed a node under test."""
    from comfy_api.latest import io

    class Source(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id=node_id, inputs=[], outputs=[io_type.Output()])

        @classmethod
        def execute(cls):
            return io.NodeOutput(value)

    return Source


def sink_node(node_id: str, received: dict | None = None) -> type:
    """A V3 output node that takes any value (and keeps it in ``received["value"]``)."""
    from comfy_api.latest import io

    class Sink(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id=node_id, inputs=[io.AnyType.Input("value")], outputs=[], is_output_node=True)

        @classmethod
        def execute(cls, value):
            if received is not None:
                received["value"] = value
            return io.NodeOutput()

    return Sink


def validation_errors(prompt: dict, test_nodes: dict[str, type] | None = None) -> dict:
    """ComfyUI's ``validate_prompt`` of a prompt it refuses: the node errors that ``/prompt``
    answers with (status 400) and the frontend shows on the nodes."""
    import execution
    import nodes

    nodes.NODE_CLASS_MAPPINGS.update(test_nodes or {})
    valid, _, _, node_errors = asyncio.run(execution.validate_prompt("test", prompt, None))
    assert not valid, "the prompt was accepted"
    return node_errors


def execute_prompt(prompt: dict, test_nodes: dict[str, type] | None = None, on_progress=None):
    """Validate and execute ``prompt`` as ComfyUI's server does (``validate_prompt``, then its
    ``PromptExecutor``), with ``test_nodes`` registered; returns (executor, recording server)."""
    import comfy.utils
    import execution
    import nodes

    import server as comfy_server
    from comfy_execution.utils import get_executing_context

    nodes.NODE_CLASS_MAPPINGS.update(test_nodes or {})
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("test", prompt, None))
    assert valid, json.dumps([error, node_errors], default=str)
    server = RecordingServer()
    executor = prompt_executor(server)

    def hook(value, total, preview, node_id=None):
        # As main.py's hook: the node from the executing context, and the cancel check.
        if node_id is None and get_executing_context() is not None:
            node_id = get_executing_context().node_id
        server.progress.append((value, total, preview, node_id))
        if on_progress is not None:
            on_progress(value, total)

    comfy.utils.set_progress_bar_global_hook(hook)
    had_instance = hasattr(comfy_server.PromptServer, "instance")
    previous = getattr(comfy_server.PromptServer, "instance", None)
    comfy_server.PromptServer.instance = server
    try:
        executor.execute(prompt, "test", {"client_id": "tests"}, outputs)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        if had_instance:
            comfy_server.PromptServer.instance = previous
        else:
            del comfy_server.PromptServer.instance
    return executor, server


def flux_unet_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the FluxParams fields the host requires and FLUX.1 leaves at their FLUX.1
    value: newer comfy/ldm/flux/model.py has ``txt_ids_dims`` without a default (``[]`` for
    FLUX.1 in its model_detection.py, ``[3]`` for Flux.2)."""
    import comfy.ldm.flux.model

    fields = {field.name: field for field in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    if "txt_ids_dims" in fields and "txt_ids_dims" not in config:
        config = {**config, "txt_ids_dims": []}
    return config


def load_pack_entrypoint() -> dict[str, type]:
    """Run the pack's ``comfy_entrypoint`` like ComfyUI does; returns ``node_id -> class``."""
    import ultrares

    extension = asyncio.run(ultrares.comfy_entrypoint())
    node_list = asyncio.run(extension.get_node_list())
    return {cls.GET_SCHEMA().node_id: cls for cls in node_list}


# Flux's QK-norm scales: ``.scale`` in 0.3.64's RMSNorm, ``.weight`` in newer ComfyUI's
# (operations.RMSNorm); the model's own state dict says which.
NORM_SCALE_SUFFIXES = ("norm.scale", "query_norm.weight", "key_norm.weight")


def random_state_dict(module: torch.nn.Module, seed: int, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Deterministic random weights for every tensor of ``module`` (norm scales near 1)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float32) * std
        if key.endswith(NORM_SCALE_SUFFIXES):
            noise = noise + 1.0
        state[key] = noise.to(value.dtype)
    return state


def _patcher_from_config(model_config: Any, seed: int, std: float = 0.05):
    import comfy.model_management as mm
    import comfy.model_patcher

    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    model.diffusion_model.load_state_dict(random_state_dict(model.diffusion_model, seed, std))
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def tiny_flux_patcher(seed: int = 0, std: float = 0.05, **overrides: Any):
    """A real ComfyUI Flux (``supported_models.Flux``) with hidden size 64, in a ModelPatcher;
    ``std`` is the spread of its random weights."""
    import comfy.model_detection

    config = flux_unet_config({**TINY_FLUX_CONFIG, **overrides})
    return _patcher_from_config(comfy.model_detection.model_config_from_unet_config(config), seed, std)


def tiny_sd15_patcher(seed: int = 0, **overrides: Any):
    """A real ComfyUI SD1.5 model class (``supported_models.SD15``) with 32-channel UNet."""
    import comfy.supported_models

    return _patcher_from_config(comfy.supported_models.SD15({**TINY_SD15_CONFIG, **overrides}), seed)


def tiny_sdxl_patcher(seed: int = 0, **overrides: Any):
    """A real ComfyUI SDXL model class (``supported_models.SDXL``) with 32-channel UNet."""
    import comfy.supported_models

    return _patcher_from_config(comfy.supported_models.SDXL({**TINY_SDXL_CONFIG, **overrides}), seed)


def dynamic_patcher_standin(free_bytes: int | None = None) -> type:
    """Stand-in for newer ComfyUI's ``ModelPatcherDynamic`` (comfy/model_patcher.py, Comfy-Org/ComfyUI
    08d0e510), which main.py makes ``comfy.model_patcher.CoreModelPatcher`` when Dynamic VRAM is on.

    A ``ModelPatcher`` that says it is dynamic and answers ``get_free_memory(device)`` itself, as
    the real one does (model management's reading plus the VRAM comfy-aimdo frees on demand);
    here ``free_bytes``, or model management's reading when None. Loading stays the host's: the
    real class loads through comfy-aimdo, which needs CUDA (and on a CPU load device it hands
    back a plain ``ModelPatcher`` anyway).
    """
    import comfy.model_management
    import comfy.model_patcher

    class DynamicPatcherStandIn(comfy.model_patcher.ModelPatcher):
        free_memory_reads: list[torch.device] = []

        def is_dynamic(self) -> bool:
            return True

        def get_free_memory(self, device: torch.device) -> int:
            self.free_memory_reads.append(device)
            return comfy.model_management.get_free_memory(device) if free_bytes is None else free_bytes

    return DynamicPatcherStandIn


def flux_conditioning(batch: int = 1, tokens: int = 7, seed: int = 0) -> list:
    """Random CONDITIONING that fits :data:`TINY_FLUX_CONFIG` (text width 48, pooled 32)."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, 48, generator=g),
             {"pooled_output": torch.randn(batch, 32, generator=g), "guidance": 3.5}]]


def sd15_conditioning(batch: int = 1, tokens: int = 5, seed: int = 0) -> list:
    """Random CONDITIONING that fits :data:`TINY_SD15_CONFIG` (context width 32)."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, 32, generator=g), {}]]


def sdxl_conditioning(batch: int = 1, tokens: int = 5, seed: int = 0, width: int = 64, height: int = 48) -> list:
    """Random CONDITIONING that fits :data:`TINY_SDXL_CONFIG`: context width 32, SDXL's 1280-wide
    pooled output and the image size it turns into ``y`` (with the pooled output: 2816 wide)."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, 32, generator=g),
             {"pooled_output": torch.randn(batch, 1280, generator=g), "width": width, "height": height}]]


def sample(model, positive: list, negative: list, latent: torch.Tensor, steps: int = 2, seed: int = 0,
           cfg: float = 1.0) -> torch.Tensor:
    """Sample with ComfyUI's own KSampler path (``nodes.common_ksampler``)."""
    import nodes

    (out,) = nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", positive, negative,
                                   {"samples": latent})
    return out["samples"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A headless ComfyUI process on the CPU, bound to loopback, loading only this pack.

    The pack is exposed through a ``custom_nodes`` folder named in an extra model paths yaml
    (never copied into the checkout), and the server is stopped by its PID.
    """

    def __init__(self, comfy_path: Path, work_dir: Path, extra_yaml: dict[str, str] | None = None,
                 pack_name: str = "ultrares", extra_packs: dict[str, Path] | None = None,
                 extra_args: list[str] | None = None):
        """``extra_packs`` (folder name -> path) are loaded beside the pack (e.g. test-only
        nodes); ``extra_args`` are appended to ComfyUI's command line."""
        self.comfy_path = comfy_path
        self.work_dir = work_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        nodes_dir = work_dir / "custom_nodes"
        nodes_dir.mkdir(parents=True, exist_ok=True)
        self.packs = {pack_name: REPO_ROOT, **(extra_packs or {})}
        for name, path in self.packs.items():
            (nodes_dir / name).symlink_to(path, target_is_directory=True)
        self.extra_args = list(extra_args or [])
        yaml_lines = ["ultrares_tests:", f"  custom_nodes: {nodes_dir}"]
        yaml_lines += [f"  {key}: {value}" for key, value in (extra_yaml or {}).items()]
        self.yaml_path = work_dir / "extra_model_paths.yaml"
        self.yaml_path.write_text("\n".join(yaml_lines) + "\n")
        self.log_path = work_dir / "server.log"
        self.pack_name = pack_name
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        for sub in ("output", "input", "temp", "user"):
            (self.work_dir / sub).mkdir(exist_ok=True)
        command = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--extra-model-paths-config", str(self.yaml_path),
            "--disable-all-custom-nodes", "--whitelist-custom-nodes", *self.packs,
            "--output-directory", str(self.work_dir / "output"),
            "--input-directory", str(self.work_dir / "input"),
            "--temp-directory", str(self.work_dir / "temp"),
            "--user-directory", str(self.work_dir / "user"),
            "--database-url", "sqlite:///:memory:",
            *self.extra_args,
        ]
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, cwd=self.comfy_path, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log()}")

    def get(self, route: str) -> Any:
        return json.loads(self.get_bytes(route))

    def get_bytes(self, route: str) -> bytes:
        with urllib.request.urlopen(self.url + route, timeout=30) as response:
            return response.read()

    def post(self, route: str, payload: dict) -> Any:
        return json.loads(self.post_bytes(route, payload))

    def post_bytes(self, route: str, payload: dict) -> bytes:
        request = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        self.process = None


def clear_released_state_dict(depth: int, depth_single: int, hidden: int, down_factor: int = 1, seed: int = 0,
                              dtype: torch.dtype = torch.float32, std: float = 0.05) -> dict[str, torch.Tensor]:
    """A random CLEAR file in the released layout (diffusers names, every attention projection
    of every block, per-layer ``spatial_weight`` when ``down_factor > 1``) for a Flux of this size."""
    from ultrares.models.clear.weights import SPATIAL_SUFFIX, released_keys

    g = torch.Generator().manual_seed(seed)
    state = {}
    for key in released_keys(depth, depth_single, down_factor > 1):
        if key.endswith(SPATIAL_SUFFIX):
            cell = 1.0 / down_factor ** 2 + 0.1 * torch.randn(down_factor, down_factor, generator=g)
            state[key] = cell.reshape(1, 1, 1, down_factor, 1, down_factor, 1).to(dtype)
        else:
            shape = (hidden, hidden) if key.endswith(".weight") else (hidden,)
            state[key] = (torch.randn(shape, generator=g) * std).to(dtype)
    return state
