"""How GSPN scans are cut into Triton programs, and the bytes the kernels move: the traffic
model (what the benchmark prints and the GPU report's bandwidth uses) equals every load and
store the interpreted kernels make."""

from __future__ import annotations

import pytest
import torch

from triton_traffic import count_traffic
from ultrares.kernels import _gspn_plan
from ultrares.kernels._gspn_plan import bytes_per_step, plan_scan, traffic

# SDXL's attn1 maps at batch 1: (side, channels) for 1024-px (64, 640 and 32, 1280) and 4K images.
SDXL_MAPS = [(64, 640), (32, 1280), (128, 640), (256, 640), (128, 1280)]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, h, w, c = shape
    x, lam = (torch.randn(n, h, w, c, generator=g).to(dtype) for _ in range(2))
    return x, lam, torch.randn(n, h, w, 3, c, generator=g).to(dtype)


def _compare(counted: dict, model) -> None:
    for (kind, name), value in counted.items():
        if name != "other":
            assert value == model.parts[f"{kind} {name}"], (kind, name, counted, model.parts)
    assert sum(v for (kind, _), v in counted.items() if kind == "load") == model.loads, (counted, model.parts)
    assert sum(v for (kind, _), v in counted.items() if kind == "store") == model.stores, (counted, model.parts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("resident", [True, False], ids=["resident", "streamed"])
@pytest.mark.parametrize("shape, direction, chunk", [((2, 5, 7, 3), 1, 3), ((1, 6, 6, 8), 2, 6)],
                         ids=["ragged chunks", "global"])
def test_traffic_model_equals_what_the_interpreted_kernels_load_and_store(shape, direction, chunk, resident, dtype,
                                                                          triton_device, monkeypatch):
    from ultrares.kernels._gspn_triton import scan_backward, scan_forward
    from ultrares.kernels.backend import triton_interpreting

    if not triton_interpreting():
        pytest.skip("counts loads and stores in Triton's CPU interpreter")
    if not resident:
        monkeypatch.setattr(_gspn_plan, "TILE_ELEMENTS", 8)
    assert plan_scan(shape, direction, chunk).resident == resident
    x, lam, logits = _inputs(shape, dtype)
    for save_state in (False, True):
        with count_traffic(dict(x=x, lam=lam, logits=logits)) as counted:
            out, state = scan_forward(x, lam, logits, direction, chunk, save_state)
        _compare(counted, traffic(shape, direction, chunk, dtype, "forward", save_state))
    state = state if state.numel() else out
    grad = torch.randn_like(x)
    with count_traffic(dict(dy=grad, x=x, lam=lam, logits=logits, state=state)) as counted:
        scan_backward(grad, x, lam, logits, state, direction, chunk)
    _compare(counted, traffic(shape, direction, chunk, dtype, "backward", True))


def test_bytes_per_propagating_step_of_the_resident_kernels():
    # Forward: x, lambda, 3 logits in, h out (+ the fp32 state when training); backward: dy,
    # 3 logits, x, lambda and the fp32 state in, dx, dlambda and 3 logit gradients out.
    assert bytes_per_step(torch.bfloat16, "forward") == 12
    assert bytes_per_step(torch.bfloat16, "forward", save_state=True) == 16
    assert bytes_per_step(torch.bfloat16, "backward") == 26
    assert bytes_per_step(torch.float32, "forward") == bytes_per_step(torch.float32, "forward", save_state=True) == 24
    assert bytes_per_step(torch.float32, "backward") == 48


@pytest.mark.parametrize("sms", [108, 132])  # A100, H100
@pytest.mark.parametrize("side, channels", SDXL_MAPS)
def test_a_global_scan_at_batch_1_gives_every_sm_a_program(side, channels, sms):
    plan = plan_scan((1, side, side, channels), 0, side, sms)
    assert plan.resident
    assert plan.programs >= sms, plan
    assert plan.block_c >= _gspn_plan.MIN_BLOCK_C


def test_chunked_scans_keep_wide_channel_blocks_when_programs_are_plenty():
    plan = plan_scan((1, 64, 64, 640), 0, 4)  # 16 chunks x 20 channel blocks
    assert (plan.block_c, plan.programs) == (32, 320)


def test_columns_up_to_one_tile_stay_resident_taller_ones_stream():
    rows = _gspn_plan.TILE_ELEMENTS // _gspn_plan.MIN_BLOCK_C
    assert plan_scan((1, rows, 8, 640), 0, 8).resident
    tall = plan_scan((1, rows + 1, 8, 640), 0, 8)
    assert not tall.resident and tall.block_r * tall.block_c <= _gspn_plan.TILE_ELEMENTS
