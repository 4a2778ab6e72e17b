"""The GSPN distillation command line: ComfyUI loads the teacher, the shared loop trains it."""

from __future__ import annotations

import subprocess
import sys

import pytest

import comfy_harness

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


class _PromptEncoder:
    """Stands in for the checkpoint's CLIP: one fixed random conditioning per prompt text."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, text):
        return comfy_harness.sd15_conditioning(seed=sum(map(ord, text)))


def test_cli_distils_the_checkpoint_it_loads_and_resumes(comfy_nodes, pack_nodes, comfyui_path, tmp_path,
                                                        monkeypatch, capsys):
    import comfy.sd
    from ultrares.models.gspn import load_gspn_weights
    from ultrares.cli import gspn_distill as gspn_cli

    loaded = []

    def load_checkpoint(path, output_vae, output_clip):
        loaded.append(path)
        return comfy_harness.tiny_sd15_patcher(seed=4), _PromptEncoder(), None, None

    monkeypatch.setattr(comfy.sd, "load_checkpoint_guess_config", load_checkpoint)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    out = tmp_path / "gspn_cli.safetensors"
    argv = ["--comfyui", str(comfyui_path), "--cpu", "--checkpoint", "sd15.safetensors", "--prompts", str(prompts),
            "--out", str(out), "--steps", "3", "--width", "64", "--height", "48", "--sampling-steps", "3",
            "--cfg", "1", "--proxy-ratio", "4", "--save-every", "0"]
    assert gspn_cli.main(argv) == 0
    assert loaded == ["sd15.safetensors"]
    printed = capsys.readouterr().out
    assert f"saved step 3 to {out}" in printed and "finished 3 steps (3 in the file): loss " in printed
    _, record = load_gspn_weights(out, "SD15")
    assert record.steps == 3 and record.finished and record.settings["steps"] == 3
    assert gspn_cli.main(argv + ["--resume", "--steps", "2"]) == 0
    assert load_gspn_weights(out, "SD15")[1].steps == 5


def test_cli_started_as_a_script_boots_comfyui_and_imports_the_pack(comfyui_path, tmp_path):
    result = subprocess.run(
        [sys.executable, str(comfy_harness.REPO_ROOT / "cli" / "gspn_distill.py"), "--comfyui", str(comfyui_path),
         "--cpu", "--checkpoint", str(tmp_path / "missing.safetensors"), "--prompt", "a cat",
         "--out", str(tmp_path / "out.safetensors")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "missing.safetensors" in result.stderr and "ImportError" not in result.stderr, result.stderr[-2000:]
    assert "ModuleNotFoundError" not in result.stderr, result.stderr[-2000:]
