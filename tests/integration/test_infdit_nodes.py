"""The Inf-DiT nodes inside a real ComfyUI (in-process, CPU) with a tiny random model.

Prompts run through ComfyUI's own validation and ``PromptExecutor``: the loader reads a file
in the released DeepSpeed layout from a ``models/infdit`` folder, the upscaler reports
progress through ComfyUI's progress-bar hook and stops when the cancel flag is raised. With
``devices`` set to ``cpu,cpu`` the node runs two gloo ranks in worker processes, as it would
run one per GPU.
"""

from __future__ import annotations

import re

import pytest
import torch

import comfy_harness
from ultrares.models.infdit.budget import UpscaleOptions, plan_stage, weight_bytes
from ultrares.models.infdit.checkpoint import convert_checkpoint, load_infdit
from ultrares.models.infdit.memory import GiB
from ultrares.models.infdit.preprocess import clip_view, resize_bicubic
from ultrares.models.infdit.tiny import TINY_CLIP, tiny_weights
from ultrares.models.infdit.upscale import upscale
from infdit_release import released_state_dict, save_released_layout

RELEASED = "mp_rank_00_model_states.pt"
CONVERTED = "infdit_tiny.safetensors"


@pytest.fixture(scope="module")
def model_folder(pack_nodes, tmp_path_factory):
    import folder_paths

    folder = tmp_path_factory.mktemp("models") / "infdit"
    folder.mkdir()
    weights = tiny_weights(seed=5)
    save_released_layout({k: v.bfloat16() for k, v in released_state_dict(weights).items()}, folder / RELEASED)
    convert_checkpoint(folder / RELEASED, folder / CONVERTED, torch.float32)
    state = released_state_dict(weights)
    del state["transformer.layers.1.attention.dense.bias"]
    save_released_layout(state, folder / "broken.pt")
    folder_paths.add_model_folder_path("infdit", str(folder))
    folder_paths.set_temp_directory(str(tmp_path_factory.mktemp("comfy_temp")))
    nodes = __import__("nodes")
    nodes.NODE_CLASS_MAPPINGS.update(pack_nodes)  # as ComfyUI's loader does (checked in test_comfyui_pack)
    yield folder
    # Leave ComfyUI's model folders as found: later modules list the "infdit" folder themselves.
    folder_paths.folder_names_and_paths["infdit"][0].remove(str(folder))
    folder_paths.filename_list_cache.pop("infdit", None)


def upscale_prompt(checkpoint: str, image: torch.Tensor, **upscale_inputs) -> dict:
    inputs = dict(scale="4", steps=2, seed=3, init_noise=True, vram_budget_gb=0.0, scan="auto", offload_cache=False)
    inputs.update(upscale_inputs)
    return {
        "1": {"class_type": "UltraResInfDiTLoader", "inputs": {"checkpoint": checkpoint, "clip_vision": "from checkpoint",
                                                                "dtype": "fp32"}},
        "2": {"class_type": "UltraResTestImage", "inputs": {}},
        "3": {"class_type": "UltraResInfDiTUpscale", "inputs": {"infdit_model": ["1", 0], "image": ["2", 0], **inputs}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def run_prompt(comfy_nodes, prompt: dict, image: torch.Tensor, on_progress=None):
    """Validate and execute ``prompt`` like the server does; returns (executor, server, upscaled image)."""
    from comfy_api.latest import io

    results = {}
    prompt = dict(prompt, **{"5": {"class_type": "UltraResCapture", "inputs": {"value": ["3", 0]}}})
    test_nodes = {"UltraResTestImage": comfy_harness.source_node("UltraResTestImage", io.Image, image),
                  "UltraResCapture": comfy_harness.sink_node("UltraResCapture", results)}
    executor, server = comfy_harness.execute_prompt(prompt, test_nodes, on_progress)
    return executor, server, results.get("value")


def events(server) -> list[str]:
    return server.events()


def test_the_upscaler_runs_the_released_file_with_progress_per_evaluation_and_batch(comfy_nodes, model_folder):
    image = torch.rand(1, 12, 20, 3)
    reports = []
    executor, server, out = run_prompt(comfy_nodes, upscale_prompt(RELEASED, image), image,
                                       lambda value, total: reports.append((value, total)))
    assert executor.success, server.messages[-1]
    assert "execution_success" in events(server)
    assert out.shape == (1, 48, 80, 3) and 0 <= out.min() and out.max() <= 1
    total = reports[-1][1]
    assert reports == [(value, total) for value in range(1, total + 1)]
    # The same sample as the host-free pipeline on the same (bf16-stored) weights.
    weights = load_infdit(model_folder / RELEASED)
    expected = upscale(weights, image.movedim(-1, 1), UpscaleOptions(scale=4, steps=2, seed=3), torch.device("cpu"))
    torch.testing.assert_close(out, expected.movedim(1, -1), rtol=0, atol=1e-5)


@pytest.fixture
def previews_on(monkeypatch):
    """ComfyUI's preview setting on (``--preview-method auto``; its default is none)."""
    from comfy.cli_args import LatentPreviewMethod, args

    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Auto)
    return args


STATUS = r"evaluation [1-3]/3 · batch \d+/15( · about .+ left)?"


def test_the_node_shows_its_plan_where_it_is_and_a_preview_of_the_image_being_built(comfy_nodes, model_folder,
                                                                                    previews_on):
    import numpy as np

    image = torch.rand(1, 12, 20, 3)
    executor, server, out = run_prompt(comfy_nodes, upscale_prompt(RELEASED, image), image)
    assert executor.success, server.messages[-1]
    texts = [text for node, text in server.texts if node == "3"]
    assert {node for node, _ in server.texts} == {"3"}
    plan = texts[0].split("\n")
    assert plan[0] == "4× upscale → 80×48" and re.fullmatch(r"\d+×\d+ blocks per batch, \d+ batch(es)? × 3 evaluations",
                                                            plan[1])
    assert re.fullmatch(r"CPU RAM: about [\d.]+ (KiB|MiB) of [\d.]+ (MiB|GiB) \(all that is free once the model is "
                        r"loaded\)", plan[2])
    lines = [text.split("\n") for text in texts[1:]]
    assert all(line[:3] == plan for line in lines)
    assert texts[-1].split("\n")[-1].startswith("finished: 80×48 in ")
    batches = int(re.search(r"(\d+) batch", plan[1]).group(1))
    assert all(re.fullmatch(STATUS.replace("15", str(batches)), line[-1]) for line in lines[:-1])
    # The preview: ComfyUI's ("JPEG", image, --preview-size) tuple on the progress bar, throttled (the
    # first and the last of this short run), the last one being the finished image.
    previews = server.previews()
    assert 2 <= len(previews) < len([update for update in server.progress if update[3] == "3"])
    assert all(kind == "JPEG" and size == previews_on.preview_size for kind, _, size in previews)
    last = np.asarray(previews[-1][1]).astype(np.float32)
    assert last.shape == (48, 80, 3) and np.abs(last - out[0].numpy() * 255).max() <= 1


def test_without_previews_in_comfyuis_settings_none_is_sent_and_the_result_is_the_same(comfy_nodes, model_folder,
                                                                                      previews_on, monkeypatch):
    from comfy.cli_args import LatentPreviewMethod

    image = torch.rand(1, 12, 20, 3)
    _, with_previews, shown = run_prompt(comfy_nodes, upscale_prompt(RELEASED, image), image)
    monkeypatch.setattr(previews_on, "preview_method", LatentPreviewMethod.NoPreviews)
    executor, server, out = run_prompt(comfy_nodes, upscale_prompt(RELEASED, image), image)
    assert executor.success and with_previews.previews() and not server.previews()
    assert torch.equal(out, shown)


def test_the_clip_list_offers_the_openclip_towers_but_not_the_checkpoints(comfy_nodes, model_folder):
    from safetensors.torch import save_file

    loader = comfy_nodes.NODE_CLASS_MAPPINGS["UltraResInfDiTLoader"]

    def offered() -> list[str]:
        return loader.INPUT_TYPES()["required"]["clip_vision"][1]["options"]

    assert {RELEASED, CONVERTED, "broken.pt"} <= set(loader.INPUT_TYPES()["required"]["checkpoint"][1]["options"])
    assert offered()[0] == "from checkpoint" and not {RELEASED, CONVERTED, "broken.pt"} & set(offered())
    tower = model_folder / "open_clip_vit_l14.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in tiny_weights(seed=5).clip.state_dict().items()}, str(tower))
    try:
        assert "open_clip_vit_l14.safetensors" in offered()
    finally:
        tower.unlink()


def test_the_budget_offloading_and_alpha_inputs_reach_the_sampler(comfy_nodes, model_folder):
    image = torch.rand(2, 8, 16, 4)
    executor, server, out = run_prompt(comfy_nodes, upscale_prompt(CONVERTED, image, scale="8", vram_budget_gb=0.01,
                                                                   offload_cache=True, scan="column"), image)
    assert executor.success, server.messages[-1]
    assert out.shape == (2, 64, 128, 4)


def test_budgets_that_fit_better_offloaded_offload_or_say_so_and_one_above_free_memory_is_lowered(
        comfy_nodes, model_folder, caplog):
    import comfy.model_management

    image = torch.rand(1, 12, 20, 3)
    weights = load_infdit(model_folder / RELEASED)
    floor = {offload: plan_stage(weights, 48, 80, UpscaleOptions(batch_blocks=1, offload=offload)).total
             for offload in (False, True)}
    expected = upscale(weights, image.movedim(-1, 1), UpscaleOptions(scale=4, steps=2, seed=3), torch.device("cpu"))
    between = (floor[False] + floor[True]) / 2 / GiB
    with caplog.at_level("INFO"):
        executor, server, out = run_prompt(comfy_nodes, upscale_prompt(RELEASED, image, vram_budget_gb=between), image)
    assert executor.success, server.messages[-1]
    assert "keeping them in CPU RAM instead (same result, slower)" in caplog.text
    assert "Inf-DiT: 1 x 1 blocks per batch: weights" in caplog.text
    torch.testing.assert_close(out, expected.movedim(1, -1), rtol=0, atol=1e-5)
    caplog.clear()
    # A budget for two blocks per batch offloaded, but only one on the device.
    two = {offload: plan_stage(weights, 48, 80, UpscaleOptions(batch_blocks=2, offload=offload)).total
           for offload in (False, True)}
    assert floor[False] <= two[True] < two[False]
    with caplog.at_level("INFO"):
        executor, server, out = run_prompt(comfy_nodes, upscale_prompt(RELEASED, image, vram_budget_gb=two[True] / GiB),
                                           image)
    assert executor.success, server.messages[-1]
    assert "1 x 1 blocks per batch" in caplog.text and "with offloading on, the same budget allows" in caplog.text
    caplog.clear()
    above_free = min(2 * comfy.model_management.get_free_memory(torch.device("cpu")) / GiB, 1024.0)
    with caplog.at_level("WARNING"):
        executor, server, out = run_prompt(comfy_nodes, upscale_prompt(RELEASED, image, vram_budget_gb=above_free),
                                           image)
    assert executor.success, server.messages[-1]
    assert "is more than the" in caplog.text and "available with the model loaded" in caplog.text


def test_the_loader_uses_comfyuis_patcher_class_and_the_budget_its_free_memory_reading(comfy_nodes, model_folder,
                                                                                       monkeypatch, caplog):
    # Dynamic VRAM: the patcher's get_free_memory counts VRAM that comfy-aimdo frees on demand,
    # which model management's reading leaves out (comfy/model_management.py, Comfy-Org/ComfyUI
    # 02b2b388, asks code that sizes work to use the patcher's).
    import comfy.model_patcher

    weights = load_infdit(model_folder / RELEASED)
    one, two = (plan_stage(weights, 48, 80, UpscaleOptions(batch_blocks=n)).total for n in (1, 2))
    patcher_class = comfy_harness.dynamic_patcher_standin(free_bytes=one - weight_bytes(weights))
    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", patcher_class, raising=False)
    (loaded,) = comfy_nodes.NODE_CLASS_MAPPINGS["UltraResInfDiTLoader"].execute(RELEASED, "from checkpoint",
                                                                                "fp32").result
    assert type(loaded.patcher) is patcher_class
    image = torch.rand(1, 12, 20, 3)
    with caplog.at_level("INFO"):
        executor, server, out = run_prompt(comfy_nodes, upscale_prompt(RELEASED, image), image)
    assert executor.success, server.messages[-1]
    assert patcher_class.free_memory_reads, "the plan did not ask the patcher"
    assert one < two and "Inf-DiT: 1 x 1 blocks per batch: weights" in caplog.text
    assert "offloading" not in caplog.text
    expected = upscale(weights, image.movedim(-1, 1), UpscaleOptions(scale=4, steps=2, seed=3), torch.device("cpu"))
    torch.testing.assert_close(out, expected.movedim(1, -1), rtol=0, atol=1e-5)


def test_cancelling_stops_between_block_batches(comfy_nodes, model_folder):
    import comfy.model_management

    image = torch.rand(1, 12, 20, 3)
    reports = []

    def cancel_after_three(value, total):
        reports.append(value)
        if value == 3:
            comfy.model_management.interrupt_current_processing(True)

    executor, server, out = run_prompt(comfy_nodes, upscale_prompt(RELEASED, image, seed=4, steps=4), image,
                                       cancel_after_three)
    comfy.model_management.interrupt_current_processing(False)
    assert "execution_interrupted" in events(server)
    assert out is None and reports == [1, 2, 3]


@pytest.mark.parametrize("checkpoint, budget, message", [
    ("broken.pt", 0.0, r"missing Inf-DiT keys: transformer\.layers\.1\.attention\.dense\.bias"),
    (RELEASED, 1e-6, r"below the minimum for a 128x128 output"),
])
def test_errors_name_the_problem(comfy_nodes, model_folder, checkpoint, budget, message):
    image = torch.rand(1, 32, 32, 3)
    executor, server, _ = run_prompt(comfy_nodes, upscale_prompt(checkpoint, image, vram_budget_gb=budget), image)
    assert not executor.success
    error = server.execution_error()
    assert __import__("re").search(message, error["exception_message"]), error["exception_message"]


@pytest.mark.parametrize("operations", ["disable_weight_init", "manual_cast"])
def test_networks_built_from_comfy_ops_compute_what_the_torch_nn_ones_do(comfy_nodes, model_folder, operations):
    import comfy.ops

    ops = getattr(comfy.ops, operations)
    weights = load_infdit(model_folder / RELEASED, operations=ops)
    assert isinstance(weights.net.blocks[1].qkv, ops.Linear) and isinstance(weights.net.patch_embed, ops.Conv2d)
    assert isinstance(weights.net.lr_xattn.post_norm, ops.LayerNorm) and isinstance(weights.clip.ln_post, ops.LayerNorm)
    image, options = torch.rand(1, 3, 8, 12), UpscaleOptions(scale=4, steps=1, seed=3, batch_blocks=1)
    expected = upscale(load_infdit(model_folder / RELEASED), image, options, torch.device("cpu"))
    assert torch.equal(upscale(weights, image, options, torch.device("cpu")), expected)


def test_the_clip_tower_matches_comfyuis_clip_vision_with_exact_gelu_but_not_quick_gelu(comfy_nodes):
    import comfy.clip_vision
    import comfy.ops

    clip = tiny_weights(seed=6).clip
    pixels = torch.randn(2, 3, TINY_CLIP.image_size, TINY_CLIP.image_size)
    outputs = {}
    for act in ("gelu", "quick_gelu"):
        config = {"hidden_act": act, "hidden_size": TINY_CLIP.width, "image_size": TINY_CLIP.image_size,
                  "intermediate_size": TINY_CLIP.mlp_width, "layer_norm_eps": 1e-5, "num_channels": 3,
                  "model_type": "clip_vision_model",
                  "num_attention_heads": TINY_CLIP.heads, "num_hidden_layers": TINY_CLIP.layers,
                  "patch_size": TINY_CLIP.patch, "projection_dim": TINY_CLIP.embed_dim}
        # ComfyUI's CLIP-vision class in fp32 (its loader would pick fp16 on the CPU).
        model = comfy.clip_vision.IMAGE_ENCODERS["clip_vision_model"](config, torch.float32, None, comfy.ops.manual_cast)
        state = comfy.clip_vision.convert_to_transformers({f"visual.{k}": v for k, v in clip.state_dict().items()},
                                                          "visual.")
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and not missing
        with torch.no_grad():
            outputs[act] = model(pixel_values=pixels)[2]
    with torch.no_grad():
        ours = clip(pixels)
    torch.testing.assert_close(ours, outputs["gelu"], rtol=1e-5, atol=1e-5)
    assert (ours - outputs["quick_gelu"]).abs().max() > 1e-3


def test_resizing_and_the_clip_view_match_torchvisions_transforms(comfy_nodes):
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    image = torch.rand(1, 3, 37, 53) * 2 - 1
    torch.testing.assert_close(resize_bicubic(image, (148, 212)),
                               transforms.functional.resize(image, [148, 212], interpolation=InterpolationMode.BICUBIC))
    torch.testing.assert_close(resize_bicubic(image, (18, 26)),
                               transforms.Resize((18, 26), interpolation=InterpolationMode.BICUBIC)(image))
    reference = transforms.Compose([
        transforms.Lambda(lambda x: (x + 1) / 2),
        transforms.Resize(224, interpolation=InterpolationMode.BICUBIC), transforms.CenterCrop(224),
        transforms.Normalize(mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711])])
    for shape in [(1, 3, 37, 53), (1, 3, 300, 250), (1, 3, 224, 224)]:
        image = torch.rand(shape) * 2 - 1
        torch.testing.assert_close(clip_view(image, 224), reference(image), rtol=1e-5, atol=1e-5)


def worker_processes() -> list:
    """This process's children, but for multiprocessing's resource tracker: a spawn context
    starts one that lives as long as the process does (an earlier test may have started it)."""
    import psutil

    return [child for child in psutil.Process().children(recursive=True)
            if "multiprocessing.resource_tracker" not in " ".join(child.cmdline())]


def test_two_ranks_through_the_node_give_the_in_process_result_with_one_progress_bar(comfy_nodes, model_folder,
                                                                                       caplog, previews_on):
    import numpy as np

    image = torch.rand(1, 12, 20, 3)
    reports = []
    with caplog.at_level("INFO"):
        executor, server, out = run_prompt(comfy_nodes, upscale_prompt(RELEASED, image, devices="cpu,cpu"), image,
                                           lambda value, total: reports.append((value, total)))
    assert executor.success, server.messages[-1]
    assert out.shape == (1, 48, 80, 3)
    # The text says where each device is; the preview is the ranks' bands put together.
    texts = [text for node, text in server.texts if node == "3"]
    assert texts[0].split("\n")[0] == "4× upscale → 80×48, shared by 2 devices"
    running = [text.split("\n") for text in texts[1:-1]]
    assert running and all(re.fullmatch(r"\d+/\d+ batches on all devices( · about .+ left)?", lines[-1])
                           for lines in running)
    assert any(re.fullmatch(r"rank [01] \(cpu\): evaluation \d/3 · batch \d+/\d+", line) for lines in running for line in lines)
    last = np.asarray(server.previews()[-1][1]).astype(np.float32)
    assert np.abs(last - out[0].numpy() * 255).max() <= 1
    assert "Inf-DiT: 2 ranks on cpu, cpu" in caplog.text
    total = reports[-1][1]
    assert reports[-1] == (total, total) and all(total == t for _, t in reports)
    assert [value for value, _ in reports] == sorted(value for value, _ in reports)
    assert not worker_processes()
    # Each worker computes with one thread (the cores shared out): the same batches on one
    # thread in this process give the same bits.
    n = int(__import__("re").search(r"Inf-DiT: (\d+) x \1 blocks per batch", caplog.text).group(1))
    weights = load_infdit(model_folder / RELEASED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = upscale(weights, image.movedim(-1, 1), UpscaleOptions(scale=4, steps=2, seed=3, batch_blocks=n),
                           torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, expected.movedim(1, -1))


def test_cancelling_a_two_rank_run_stops_both_workers(comfy_nodes, model_folder):
    import comfy.model_management

    image = torch.rand(1, 12, 20, 3)
    reports = []

    def cancel_after_three(value, total):
        reports.append(value)
        if value >= 3:
            comfy.model_management.interrupt_current_processing(True)

    executor, server, out = run_prompt(comfy_nodes, upscale_prompt(RELEASED, image, seed=4, steps=20, devices="cpu,cpu"),
                                       image, cancel_after_three)
    comfy.model_management.interrupt_current_processing(False)
    assert "execution_interrupted" in events(server)
    assert out is None and 3 <= reports[-1] < 60
    assert not worker_processes()


@pytest.mark.parametrize("devices, message", [("cuda:0,cuda:0", "a GPU is listed twice"),
                                              ("gpu0", "'gpu0' is not a device"),
                                              ("cpu,cuda:1", "must be all CUDA GPUs or all the CPU")])
def test_a_device_list_that_cannot_work_is_refused_naming_the_problem(comfy_nodes, model_folder, devices, message):
    image = torch.rand(1, 12, 20, 3)
    executor, server, _ = run_prompt(comfy_nodes, upscale_prompt(RELEASED, image, devices=devices), image)
    assert not executor.success
    error = server.execution_error()
    assert message in error["exception_message"], error["exception_message"]
