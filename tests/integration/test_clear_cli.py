"""The CLEAR distillation command line: ComfyUI loads the FLUX model and its text encoders, the
shared loop trains it, and the file it writes is what the node writes."""

from __future__ import annotations

import subprocess
import sys

import pytest

import comfy_harness

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


class _PromptEncoder:
    """Stands in for FLUX's text encoders: one fixed random conditioning per prompt text."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, text):
        return comfy_harness.flux_conditioning(seed=sum(map(ord, text)))


def test_cli_distils_the_model_it_loads_and_resumes(comfy_nodes, pack_nodes, comfyui_path, tmp_path, monkeypatch,
                                                    capsys):
    import comfy.sd
    import torch

    from ultrares.models.clear.distilled import read_distilled
    from ultrares.cli import clear_distill

    loaded = []

    def load_diffusion_model(path, model_options):
        loaded.append((path, model_options))
        return comfy_harness.tiny_flux_patcher(seed=1, std=0.15, depth_single_blocks=3)

    def load_clip(ckpt_paths, clip_type):
        loaded.append((tuple(ckpt_paths), clip_type))
        return _PromptEncoder()

    monkeypatch.setattr(comfy.sd, "load_diffusion_model", load_diffusion_model)
    monkeypatch.setattr(comfy.sd, "load_clip", load_clip)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    out = tmp_path / "clear_cli.safetensors"
    argv = ["--comfyui", str(comfyui_path), "--cpu", "--unet", "flux.safetensors", "--clip", "clip_l.safetensors",
            "--clip", "t5xxl.safetensors", "--weight-dtype", "fp8_e4m3fn", "--prompts", str(prompts), "--out", str(out),
            "--radius", "3", "--down-factor", "2", "--steps", "3", "--resolution", "128", "--samples", "2",
            "--sampling-steps", "2", "--save-every", "0"]
    assert clear_distill.main(argv) == 0
    assert loaded == [("flux.safetensors", {"dtype": torch.float8_e4m3fn}),
                      (("clip_l.safetensors", "t5xxl.safetensors"), comfy.sd.CLIPType.FLUX)]
    printed = capsys.readouterr().out
    assert f"saved step 3 to {out}" in printed and "finished 3 steps (3 in the file): loss " in printed, printed
    _, pattern, base, record = read_distilled(out)
    assert (pattern.radius, pattern.down_factor, base) == (3, 2, "Flux")
    assert record.steps == 3 and record.finished and record.settings["samples"] == 2
    assert clear_distill.main(argv + ["--resume", "--steps", "2"]) == 0
    assert read_distilled(out)[3].steps == 5


def test_cli_started_as_a_script_boots_comfyui_and_imports_the_pack(comfyui_path, tmp_path):
    result = subprocess.run(
        [sys.executable, str(comfy_harness.REPO_ROOT / "cli" / "clear_distill.py"), "--comfyui", str(comfyui_path),
         "--cpu", "--unet", str(tmp_path / "missing.safetensors"), "--clip", str(tmp_path / "clip.safetensors"),
         "--prompt", "a cat", "--out", str(tmp_path / "out.safetensors")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "missing.safetensors" in result.stderr and "ImportError" not in result.stderr, result.stderr[-2000:]
    assert "ModuleNotFoundError" not in result.stderr, result.stderr[-2000:]
