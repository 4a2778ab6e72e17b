"""What the two distillation command lines share (``cli/_distill_tool.py``), without ComfyUI."""

from __future__ import annotations

import pytest

from ultrares.cli._distill_tool import INTERRUPTED, boot_comfyui, run_reported


class Report:
    """Stands in for the distillation's report: records how the run said it stopped."""

    def __init__(self):
        self.said = []

    def stopped(self, reason: str) -> str:
        self.said.append(reason)
        return reason


def test_ctrl_c_ends_the_run_with_status_130_and_says_how_the_file_was_left(capsys):
    def distil():
        raise KeyboardInterrupt

    report = Report()
    assert run_reported(distil, report) == INTERRUPTED == 130
    assert report.said == ["stopped (Ctrl-C)"] and "continue with --resume" in capsys.readouterr().out


def test_a_finished_run_exits_with_0_and_says_nothing_of_a_stop():
    report, ran = Report(), []
    assert run_reported(lambda: ran.append(1), report) == 0
    assert ran == [1] and report.said == []


def test_a_folder_that_is_not_comfyui_is_refused_with_what_to_pass(tmp_path):
    with pytest.raises(SystemExit, match="is not a ComfyUI folder .*pass --comfyui or set COMFYUI_PATH"):
        boot_comfyui(str(tmp_path), cpu=True)
