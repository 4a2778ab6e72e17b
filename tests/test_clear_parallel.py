"""Stripe-parallel CLEAR (models/clear/stripes.py, parallel.py, communicator.py; kernels/softmax_partials.py):
the stripes and halos are the rows each device's queries reach, partial softmaxes combine exactly,
and an attention call split over 2 and 3 devices, one thread each or gloo processes, equals the
one-device call (float32 to 1e-5, bfloat16 within one rounding of the one-device error), with
and without down-sampled keys, on odd grids, stripes thinner than the radius and batch 2, moving
exactly the bytes the plan says."""

from __future__ import annotations

import dataclasses
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import clear_stripe_cases as cases
from gloo_ranks import run_ranks
from ultrares.kernels.softmax_partials import softmax_partials
from ultrares.models.clear.communicator import PeerFailed, ThreadGroup
from ultrares.models.clear.parallel import call_payload
from ultrares.models.clear.stripes import StripeError, StripePlan

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# --- Stripes and halos ----------------------------------------------------------------------------

@pytest.mark.parametrize("grid, devices, radius, align", [((9, 7), 2, 3, 1), ((11, 6), 3, 6, 1), ((13, 10), 3, 5, 2),
                                                          ((7, 9), 2, 2, 2), ((40, 3), 8, 16, 4), ((5, 4), 5, 9, 1)])
def test_every_device_receives_exactly_the_rows_its_queries_reach_from_their_owners(grid, devices, radius, align):
    plan = StripePlan.split(grid, devices, radius, align)
    assert plan.bounds[0] == 0 and plan.bounds[-1] == grid[0]
    assert all(b % align == 0 for b in plan.bounds[:-1])
    sizes = [len(plan.rows(p)) for p in range(devices)]
    assert min(sizes) >= 1 and max(sizes[:-1]) - min(sizes[:-1]) <= align
    for rank in range(devices):
        own = plan.rows(rank)
        reached = {y for y in range(grid[0]) for q in own if (y - q) ** 2 < radius ** 2}
        received = [y for t in plan.receives(rank) for y in t.rows]
        assert sorted(received) == received  # halo above first, in row order
        assert set(received) | set(own) == reached and len(received) == len(set(received))
        assert all(set(t.rows) <= set(plan.rows(t.source)) for t in plan.receives(rank))
        assert list(plan.key_rows(rank)) == sorted(reached)
    sent = sorted((t.source, t.target, t.rows) for p in range(devices) for t in plan.sends(p))
    assert sent == sorted((t.source, t.target, t.rows) for p in range(devices) for t in plan.receives(p))


def test_stripes_thinner_than_the_reach_take_their_halo_from_several_devices():
    plan = StripePlan.split((11, 6), 3, radius=6)  # stripes of 3, 4, 4 rows; reach 5
    assert [t.source for t in plan.receives(0)] == [1, 2]
    assert [t.rows for t in plan.receives(0)] == [range(3, 7), range(7, 8)]


@pytest.mark.parametrize("grid, devices, align, message", [((3, 8), 4, 1, "3 token rows, 3 rows, too few for 4"),
                                                          ((9, 8), 4, 4, "9 token rows, 3 4-row bands")])
def test_more_devices_than_rows_or_cell_bands_are_refused_with_the_reason(grid, devices, align, message):
    with pytest.raises(StripeError, match=message):
        StripePlan.split(grid, devices, 4, align)


# --- Partial softmaxes ----------------------------------------------------------------------------

def test_partial_softmaxes_of_the_key_parts_combine_into_attention_over_all_keys(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) * 3 for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.7)
    module = sys.modules[softmax_partials.__module__]  # the package's name is the function's
    monkeypatch.setattr(module, "SCORE_BYTES", 2 * 3 * 5 * 4 * 3)  # 3 keys a chunk
    parts = [softmax_partials(q, k[:, :, a:b], v[:, :, a:b], 0.7) for a, b in ((0, 7), (7, 8), (8, 8), (8, 20))]
    assert torch.isinf(parts[2].max).all() and not parts[2].sum.any()  # a part without keys
    merged = parts[0].merge(parts[1]).merge(parts[2]).merge(parts[3])
    torch.testing.assert_close(merged.output(q.dtype), expected, rtol=1e-5, atol=1e-5)
    # what the devices do: one max, rescale, one sum
    top = torch.stack([p.max for p in parts]).amax(0)
    rescaled = [p.rescaled(top) for p in parts]
    total = sum(p.acc for p in rescaled) / sum(p.sum for p in rescaled)[..., None]
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)


# --- Attention split over devices -----------------------------------------------------------------

@pytest.mark.parametrize("devices", [2, 3])
@pytest.mark.parametrize("case", cases.CASES, ids=lambda c: f"{c.grid[0]}x{c.grid[1]}-r{c.radius}-d{c.down}")
def test_threads_on_cpu_devices_equal_one_device(case, devices):
    expected = cases.one_device(case)
    outputs, _ = cases.on_threads(case, devices)
    plan = case.plan(devices)
    for rank, out in enumerate(outputs):
        assert cases.relative_error(out, case.local(expected, plan, rank)) <= 1e-5


@pytest.mark.parametrize("case", cases.CASES[:2], ids=["plain", "down-sampled"])
def test_bfloat16_stays_within_the_one_device_bfloat16_error(case):
    reference = cases.one_device(case)
    case = dataclasses.replace(case, dtype=torch.bfloat16)
    one_device = cases.relative_error(cases.one_device(case), reference)
    outputs, _ = cases.on_threads(case, 3)
    plan = case.plan(3)
    for rank, out in enumerate(outputs):
        assert out.dtype == torch.bfloat16
        assert cases.relative_error(out, case.local(reference, plan, rank)) <= one_device + 2 ** -8


def test_gloo_process_groups_of_2_and_3_ranks_equal_one_device():
    by_rank = run_ranks("clear_stripe_cases:gloo_rank_errors", 3, timeout=180)
    for size in (2, 3):
        errors = [e[size] for e in by_rank if size in e]
        assert len(errors) == size and all(len(e) == len(cases.CASES) for e in errors)
        assert max(max(e) for e in errors) <= 1e-5, errors


def test_each_device_moves_exactly_the_bytes_the_plan_counts():
    case = cases.CASES[1]  # down-sampled keys, reference tokens, batch 2
    _, comms = cases.on_threads(case, 3, metered=True)
    plan = case.plan(3)
    for rank, comm in enumerate(comms):
        expected = call_payload(plan, rank, case.batch, case.heads, case.dim, case.n_txt + case.n_ref, True, 4)
        assert dict(comm.bytes) == expected
        assert comm.calls == {"exchange": 1, "all_reduce_max": 1, "all_reduce_sum": 1, "all_gather": 1}
    # the halo is a small part of the image's keys: 2 x 4 rows cross each of the 2 boundaries
    assert sum(comm.bytes["exchange"] for comm in comms) == 2 * 2 * 4 * 10 * (2 * 2 * 2 * 16 * 4)


def test_a_device_that_fails_releases_the_others_instead_of_leaving_them_waiting():
    group = ThreadGroup(3, timeout=30)
    seen: list[BaseException] = []

    def work(rank: int) -> None:
        try:
            if rank == 1:
                raise RuntimeError("device 1 ran out of memory")
            group.communicator(rank, "cpu").all_reduce(torch.ones(2), "sum")
        except PeerFailed as error:
            seen.append(error)
        except RuntimeError:
            group.abort()

    threads = [threading.Thread(target=work, args=(rank,)) for rank in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not any(thread.is_alive() for thread in threads) and len(seen) == 2


def test_threads_reduce_to_the_same_bits_on_every_device():
    group = ThreadGroup(3, timeout=30)
    parts = [torch.randn(1000, generator=torch.Generator().manual_seed(r)) * 10 ** r for r in range(3)]
    results = [None] * 3

    def work(rank: int) -> None:
        results[rank] = group.communicator(rank, "cpu").all_reduce(parts[rank], "sum")

    threads = [threading.Thread(target=work, args=(rank,)) for rank in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.equal(results[0], results[1]) and torch.equal(results[1], results[2])
    assert torch.equal(results[0], parts[0] + parts[1] + parts[2])
