"""AdamW with its float32 values, gradients and moments in host memory (as DeepSpeed's
optimizer offload), for trainings whose optimiser state does not fit the GPU.

The device keeps the parameters only in the precision the forward pass uses (e.g. bfloat16:
2 bytes each instead of 16). Each gradient is moved to host memory, as float32, as soon as
autograd has accumulated it (a post-accumulate-grad hook) and freed on the device, so gradients
never pile up there either; several backward passes (a batch run one sample at a time) add up
in host memory. :meth:`step` runs AdamW on the host and copies the new values back.

The loop (:func:`.loop.train`) clips and counts :attr:`OffloadedAdamW.masters`, whose
gradients these are; the optimiser state beside a weight file is that of :attr:`inner`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class OffloadedAdamW:
    """AdamW over host float32 copies (:attr:`masters`) of ``parameters`` (named device tensors)."""

    def __init__(self, parameters: Mapping[str, torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        self.device_parameters = dict(parameters)
        self.masters = {name: torch.nn.Parameter(p.detach().to("cpu", torch.float32, copy=True))
                        for name, p in self.device_parameters.items()}
        self.inner = torch.optim.AdamW(list(self.masters.values()), lr=lr, betas=betas, eps=eps,
                                       weight_decay=weight_decay)
        self._hooks = [p.register_post_accumulate_grad_hook(self._offload(self.masters[name]))
                       for name, p in self.device_parameters.items()]

    @staticmethod
    def _offload(master: torch.nn.Parameter):
        def hook(parameter: torch.Tensor) -> None:
            grad = parameter.grad.detach().to("cpu", torch.float32)
            master.grad = grad if master.grad is None else master.grad.add_(grad)
            parameter.grad = None
        return hook

    @property
    def state(self):
        """The inner optimiser's per-master state (``exp_avg``, ``exp_avg_sq``, ``step``)."""
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the host gradients (and any left on the device)."""
        self.inner.zero_grad(set_to_none=set_to_none)
        for parameter in self.device_parameters.values():
            parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on the host, then the new values to the device parameters (in their dtype)."""
        self.inner.step()
        self.push()

    @torch.no_grad()
    def pull(self) -> None:
        """Copy the device parameters' values to the masters (after the device ones were set)."""
        for name, parameter in self.device_parameters.items():
            self.masters[name].copy_(parameter)

    @torch.no_grad()
    def push(self) -> None:
        """Copy the masters' values to the device parameters (after a step or a restore)."""
        for name, parameter in self.device_parameters.items():
            parameter.copy_(self.masters[name])

    def close(self) -> None:
        """Remove the gradient hooks from the device parameters."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
