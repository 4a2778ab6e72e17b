"""The Inf-DiT command line: one process, and two ranks under ``torchrun`` started by path
(as on a cluster), which write the same image; installed, it runs as ``python -m``."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ultrares.cli import infdit_upscale as cli
from ultrares.models.infdit.budget import UpscaleOptions
from ultrares.models.infdit.tiny import tiny_weights
from ultrares.models.infdit.upscale import upscale

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

ARGS = ["--tiny", "6", "--steps", "2", "--batch-blocks", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "in.png"
    Image.fromarray((np.random.RandomState(0).rand(20, 28, 3) * 255).astype(np.uint8)).save(path)
    return path


def test_one_process_writes_the_upscaled_image(picture, tmp_path, capsys):
    assert cli.main([str(picture), str(tmp_path / "out.png"), *ARGS]) == 0
    expected = upscale(tiny_weights(6), cli.read_image(picture), UpscaleOptions(scale=4, steps=2, seed=3,
                                                                                 batch_blocks=1), torch.device("cpu"))
    written = np.asarray(Image.open(tmp_path / "out.png"))
    assert written.shape == (80, 112, 3)
    assert np.array_equal(written, (expected[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    assert "1 x 1 blocks per batch" in capsys.readouterr().out


def test_two_torchrun_ranks_started_by_path_write_the_same_image(picture, tmp_path):
    assert cli.main([str(picture), str(tmp_path / "one.png"), *ARGS]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             cli.__file__, str(picture), str(tmp_path / "two.png"), *ARGS],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "per rank (2 ranks)" in result.stdout and "105/105 block batches" in result.stdout
    assert np.array_equal(np.asarray(Image.open(tmp_path / "two.png")), np.asarray(Image.open(tmp_path / "one.png")))


def test_installed_it_runs_as_a_module(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["infdit_upscale", "--help"])
    monkeypatch.delitem(sys.modules, "ultrares.cli.infdit_upscale")  # run afresh, as `python -m` does
    with pytest.raises(SystemExit) as stop:
        runpy.run_module("ultrares.cli.infdit_upscale", run_name="__main__")
    assert stop.value.code == 0 and "torchrun" in capsys.readouterr().out


def test_a_missing_input_is_an_error_message_not_a_traceback(tmp_path, capsys):
    assert cli.main([str(tmp_path / "nothing.png"), str(tmp_path / "out.png"), *ARGS]) == 1
    assert "error:" in capsys.readouterr().err
