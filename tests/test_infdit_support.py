"""Shared set-up for the Inf-DiT tests (imported by them; it holds no tests itself).

The tiny models run hundreds of small ops per evaluation: one intra-op thread is several times
faster than two threads competing on a busy machine, and gives stable timings.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Run the importing module's tests on one intra-op thread, then restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
