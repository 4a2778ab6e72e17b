"""Layer 0's LR cross-attention keys: the reference's unfold windows, built per block batch."""

from __future__ import annotations

import pytest
import torch

from ultrares.models.infdit._full_reference import reference_lr_windows
from ultrares.models.infdit.evaluate import LRContext
from ultrares.models.infdit.schedule import Placement
from ultrares.models.infdit.tiny import TINY, tiny_weights

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CPU = torch.device("cpu")


def test_windows_are_the_unfolded_lr_tokens_after_the_projection():
    net = tiny_weights(seed=1).net
    lr_image = torch.rand(2, 3, 12, 20, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        expected = reference_lr_windows(net, lr_image)  # the released process_lr: proj_lr, then nn.Unfold
        context = LRContext(net, lr_image, Placement(CPU))
        torch.testing.assert_close(context.windows(range(0, 3), range(0, 5)), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(context.windows(range(1, 3), range(2, 4)), expected[:, 1:3, 2:4], rtol=0, atol=1e-6)


def test_tokens_outside_the_image_are_zero_vectors_whose_keys_are_the_normalised_bias():
    net = tiny_weights(seed=1).net
    lr_image = torch.rand(1, 3, 4, 4) * 2 - 1
    with torch.inference_mode():
        window = LRContext(net, lr_image, Placement(CPU)).windows(range(1), range(1))
        corner_key, corner_value = window[0, 0, 0, 0].unbind(0)
        bias_k, bias_v = net.lr_xattn.key_value.bias.view(2, TINY.heads, -1).unbind(0)
        torch.testing.assert_close(corner_key, net.lr_xattn.k_norm(bias_k))
        torch.testing.assert_close(corner_value, bias_v)


def test_any_batch_gets_bit_identical_keys_whatever_its_size_and_the_images_placement():
    net = tiny_weights(seed=1).net
    # 6x9 LR blocks: tiles of 4 blocks are ragged at the bottom and right.
    lr_image = torch.rand(1, 3, 24, 36, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.inference_mode():
        context = LRContext(net, lr_image, Placement(CPU))
        whole = context.windows(range(6), range(9))
        for rows, cols in [(range(0, 1), range(0, 1)), (range(2, 5), range(3, 9)), (range(5, 6), range(7, 9)),
                           (range(1, 4), range(0, 4))]:
            assert torch.equal(context.windows(rows, cols), whole[:, rows.start:rows.stop, cols.start:cols.stop])
        on_host = LRContext(net, lr_image, Placement(CPU, offload=True)).windows(range(6), range(9))
    assert torch.equal(on_host, whole)
