"""What the distributed Inf-DiT tests run inside each rank (``run_ranks`` targets).

The ranks import this module by name (the tests put ``tests/`` on their ``PYTHONPATH``); each
function gets the rank's :class:`RankGroup` first, like the pack's own upscale job.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from ultrares.models.infdit.evaluate import ImageContext, LRContext, evaluate
from ultrares.models.infdit.exchange import BlockExchange, RankGroup
from ultrares.models.infdit.schedule import Placement, plan_ranks
from ultrares.models.infdit.shard import ImageShard
from ultrares.models.infdit.tiny import tiny_weights
from ultrares.models.infdit.worker import upscale_job

SIGMA = 2.5
WEIGHTS_SEED = 3


def evaluation_inputs(grid: tuple[int, int]):
    """A tiny network and one evaluation's inputs on a ``grid`` of blocks (the same in every process)."""
    net = tiny_weights(seed=WEIGHTS_SEED).net
    cfg = net.cfg
    g = torch.Generator().manual_seed(0)
    height, width = grid[0] * cfg.block_px, grid[1] * cfg.block_px
    lr_image = torch.rand(1, 3, height // cfg.lr_scale, width // cfg.lr_scale, generator=g) * 2 - 1
    concat_lr = torch.nn.functional.interpolate(lr_image, size=(height, width), mode="bicubic").clamp(-1, 1)
    x = concat_lr + SIGMA * torch.randn(concat_lr.shape, generator=g)
    vector = torch.randn(1, cfg.vector_dim, generator=g)
    return net, x, concat_lr, lr_image, vector


def one_evaluation(group: RankGroup | None, grid: tuple[int, int], n: int, scan: str, offload: bool) -> torch.Tensor | None:
    """D(x; sigma) of :func:`evaluation_inputs` with this rank's schedule, put together on rank 0
    (``group=None``: the single-device evaluation)."""
    net, x, concat_lr, lr_image, vector = evaluation_inputs(tuple(grid))
    ranks, rank = (group.ranks, group.rank) if group is not None else (1, 0)
    schedules = plan_ranks(*grid, n, scan, offload, ranks)
    shards = [ImageShard.of(schedule, net.cfg.block_px) for schedule in schedules]
    placement = Placement(torch.device("cpu"), offload)
    with torch.inference_mode():
        context = ImageContext(placement.to_store(shards[rank].take(concat_lr)), LRContext(net, lr_image, placement),
                               vector)
        out = placement.empty_store(shards[rank].shape(tuple(x.shape)), torch.float32)
        exchange = BlockExchange(group, schedules[rank], net.cfg, net.dtype) if group is not None else None
        evaluate(net, shards[rank].take(x).contiguous(), SIGMA, context, schedules[rank], placement, out,
                 shard=shards[rank], exchange=exchange)
        if exchange is None:
            return out
        exchange.finish()
        return group.assemble(out, shards, tuple(x.shape), everywhere=False)


def checks(group: RankGroup, *, evaluations: list[dict], samples: list[dict]) -> dict | None:
    """Every evaluation case, then every whole sample (the pack's upscale job), and the bytes each
    rank sent; returned by rank 0."""
    outputs = [one_evaluation(group, **case) for case in evaluations]
    sent = [group.bytes_sent]
    results = [upscale_job(group, **sample) for sample in samples]
    sent.append(group.bytes_sent - sent[0])
    everyone: list = [None] * group.ranks
    dist.all_gather_object(everyone, sent)
    return {"evaluations": outputs, "samples": results, "bytes_sent": everyone} if group.rank == 0 else None


def upscale_noting_pids(group: RankGroup, *, pid_folder: str, fail_rank: int | None = None, fail_after: int = 0,
                        **job) -> torch.Tensor | None:
    """The upscale job, after writing this process's id to ``pid_folder``; ``fail_rank`` raises
    before its batch number ``fail_after + 1``."""
    Path(pid_folder, f"{group.rank}.pid").write_text(str(os.getpid()))
    if group.rank == fail_rank:
        checks_done = [0]
        check_interrupt = group.check_interrupt

        def failing_check() -> None:
            checks_done[0] += 1
            if checks_done[0] > fail_after:
                raise RuntimeError(f"injected failure after {fail_after} batches")
            check_interrupt()

        group.check_interrupt = failing_check
    return upscale_job(group, **job)
