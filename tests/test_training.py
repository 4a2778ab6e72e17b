"""The loop every distillation shares, and AdamW with its state in host memory."""

from __future__ import annotations

import math

import pytest
import torch

from ultrares.models.training import TOTAL, OffloadedAdamW, train


class Record:
    def __init__(self):
        self.steps, self.finished, self.losses = 0, False, []

    def log(self, losses):
        self.losses.append(losses)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = {"a": torch.nn.Parameter(torch.randn(4, 3, generator=g)), "b": torch.nn.Parameter(torch.randn(3, generator=g))}
    inputs = [torch.randn(5, 4, generator=g) for _ in range(6)]
    return weights, inputs


def _step(weights, inputs, counter):
    def step():
        losses = []
        for _ in range(2):  # a batch of two, one backward each
            x = inputs[counter[0] % len(inputs)]
            counter[0] += 1
            loss = (x @ weights["a"] + weights["b"]).sin().square().mean()
            (loss / 2).backward()
            losses.append(loss.detach() / 2)
        return {TOTAL: sum(losses)}
    return step


def test_adamw_with_its_state_in_host_memory_takes_the_same_steps_as_adamw():
    plain, inputs = _problem()
    offloaded, _ = _problem()
    reference = torch.optim.AdamW(plain.values(), lr=1e-2, weight_decay=1e-4)
    optimizer = OffloadedAdamW(offloaded, lr=1e-2, weight_decay=1e-4)
    train(_step(plain, inputs, [0]), plain.values(), reference, Record(), steps=5, max_grad_norm=0.5)
    train(_step(offloaded, inputs, [0]), optimizer.masters.values(), optimizer, Record(), steps=5, max_grad_norm=0.5)
    for name, value in plain.items():
        torch.testing.assert_close(offloaded[name], value, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(optimizer.masters[name], value, rtol=1e-6, atol=1e-7)
        assert offloaded[name].grad is None, "gradients leave the device as soon as they are accumulated"
    assert optimizer.state[optimizer.masters["a"]]["step"] == 5
    optimizer.close()


def test_device_tensors_in_low_precision_keep_float32_values_on_the_host():
    weights, inputs = _problem()
    half = {name: torch.nn.Parameter(p.detach().to(torch.bfloat16)) for name, p in weights.items()}
    optimizer = OffloadedAdamW(half, lr=1e-4)
    start = half["a"].detach().float().clone()
    counter = [0]

    def step():
        x = inputs[counter[0] % len(inputs)].to(torch.bfloat16)
        counter[0] += 1
        loss = (x @ half["a"] + half["b"]).float().square().mean()
        loss.backward()
        return {TOTAL: loss.detach()}

    train(step, optimizer.masters.values(), optimizer, Record(), steps=3)
    moved = (optimizer.masters["a"] - start).abs().max()
    assert 0 < moved < 3.5e-4 and optimizer.masters["a"].dtype == torch.float32  # three steps of about lr
    torch.testing.assert_close(half["a"], optimizer.masters["a"].to(torch.bfloat16), rtol=0, atol=0)
    optimizer.close()
    half["a"].sum().backward()
    assert half["a"].grad is not None, "closed: the hooks are gone"


def test_a_non_finite_loss_stops_the_run_before_the_optimiser_applies_it():
    weights, _ = _problem()
    before = {k: v.detach().clone() for k, v in weights.items()}
    saves = []

    def step():
        (weights["a"].sum() * math.nan).backward()
        return {TOTAL: torch.tensor(math.nan)}

    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train(step, weights.values(), torch.optim.AdamW(weights.values()), Record(), steps=3, save=saves.append)
    assert saves == [], "no step was done, so nothing is saved"
    for name, value in before.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0)
