"""Exact, memory-bounded circular-window attention in plain PyTorch (any device).

Image queries are cut into ``T x T`` tiles. Every tile attends to the side keys (text,
reference and down-sampled keys) and to a ``span x span`` square of image keys
(``span = T + 2*(radius - 1)``, clipped to the grid) that holds every key its windows can
reach; a boolean mask keeps exactly the circle. Tiles at the bottom/right edges and key
squares at every edge are shifted inward, so all tiles have one shape and a row of tiles goes
through a single batched ``scaled_dot_product_attention`` call. Global query rows (text,
reference tokens) run as dense attention over the real tokens in row chunks. No ``L x L``
tensor is ever built; the largest temporaries are one chunk of tiles' key copies (bounded by
:data:`KEY_COPY_BYTES`) and its mask. With query rows given, the query tiles cover only those
rows and no global row is computed; the key squares still come from the whole grid.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._clear_tiles import covering_radius

# Query rows per dense call for the global (text/reference) rows; bounds the score memory of
# backends that materialise scores.
GLOBAL_ROW_CHUNK = 1024
# Budget for the gathered keys+values of the tiles batched into one call.
KEY_COPY_BYTES = 256 * 2**20


def query_tile_side(radius: int) -> int:
    """Side of the square query tiles: about the window radius, so the key square (~3x the
    side) wastes < 3x the circle's pairs, kept between 8 and 32 tokens for batch efficiency."""
    return max(8, min(32, radius))


def dense_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, rows: range,
               scale: float) -> None:
    """``out[:, :, rows] = attention(q[:, :, rows], k, v)`` with no mask, in row chunks."""
    for start in range(rows.start, rows.stop, GLOBAL_ROW_CHUNK):
        stop = min(start + GLOBAL_ROW_CHUNK, rows.stop)
        out[:, :, start:stop] = F.scaled_dot_product_attention(q[:, :, start:stop], k, v, scale=scale)


def global_rows(length: int, n_txt: int, n_img: int) -> tuple[range, range]:
    """Rows of the global queries: the text before the image and the reference tokens after it."""
    return range(0, n_txt), range(n_txt + n_img, length)


def _tile_starts(length: int, tile: int) -> torch.Tensor:
    """Starts of the tiles covering ``[0, length)``; the last one is shifted inward to fit."""
    return torch.clamp(torch.arange(0, length, tile), max=length - tile)


def _key_starts(query_starts: torch.Tensor, reach: int, span: int, length: int) -> torch.Tensor:
    """Start of each tile's key range: ``reach`` before the tile, shifted inward to fit."""
    return torch.clamp(query_starts - reach, min=0, max=length - span)


def window_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, int],
                           n_txt: int, radius: int, n_ref: int, down_k: torch.Tensor | None,
                           down_v: torch.Tensor | None, scale: float,
                           check_interrupt: Callable[[], None] | None = None,
                           query_rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The tiled path; arguments as in :func:`ultrares.kernels.clear_attention.circular_window_attention`."""
    b, heads, _, dim = q.shape
    h, w = grid
    n_img = h * w
    img = slice(n_txt, n_txt + n_img)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if query_rows is None:
        row0, row1 = 0, h
        for rows in global_rows(q.shape[2], n_txt, n_img):
            dense_rows(q, k, v, out, rows, scale)
        q_img, out_img = q[:, :, img], out[:, :, img]
    else:  # q holds only the image queries of rows row0..row1
        row0, row1 = query_rows
        q_img, out_img = q, out
    if radius >= covering_radius(grid):  # every window holds the whole grid
        keys = k if down_k is None else torch.cat([k, down_k.to(k.dtype)], dim=2)
        values = v if down_v is None else torch.cat([v, down_v.to(v.dtype)], dim=2)
        dense_rows(q_img, keys, values, out_img, range(q_img.shape[2]), scale)
        return out

    side_k = [k[:, :, :n_txt], k[:, :, n_txt + n_img:]]
    side_v = [v[:, :, :n_txt], v[:, :, n_txt + n_img:]]
    if down_k is not None:
        side_k.append(down_k.to(k.dtype))
        side_v.append(down_v.to(v.dtype))
    side_k, side_v = torch.cat(side_k, dim=2), torch.cat(side_v, dim=2)
    n_side = side_k.shape[2]

    side = query_tile_side(radius)
    reach = radius - 1
    tile_h, tile_w = min(side, row1 - row0), min(side, w)
    span_h, span_w = min(tile_h + 2 * reach, h), min(tile_w + 2 * reach, w)
    q_y0 = row0 + _tile_starts(row1 - row0, tile_h)
    q_x0 = _tile_starts(w, tile_w)
    k_y0 = _key_starts(q_y0, reach, span_h, h)
    k_x0 = _key_starts(q_x0, reach, span_w, w)
    q_cols = q_x0[:, None] + torch.arange(tile_w)  # [tiles_x, tile_w]
    k_cols = k_x0[:, None] + torch.arange(span_w)  # [tiles_x, span_w]
    dx2 = ((q_cols[:, :, None] - k_cols[:, None, :]) ** 2).to(q.device)  # [tiles_x, tile_w, span_w]
    q_img = q_img.unflatten(2, (row1 - row0, w))  # query rows row0..row1 of the grid
    k_img = k[:, :, img].unflatten(2, (h, w))
    v_img = v[:, :, img].unflatten(2, (h, w))
    out_img = out_img.unflatten(2, (row1 - row0, w))  # a view: results are written in place

    n_query, n_keys = tile_h * tile_w, n_side + span_h * span_w
    bytes_per_tile = 2 * b * heads * n_keys * dim * k.element_size()
    chunk = max(1, min(len(q_x0), KEY_COPY_BYTES // bytes_per_tile))
    # Without autograd, buffers are reused by every call: the side keys are copied in once, each
    # tile then copies only its own queries and key square. Autograd saves what each call reads,
    # so with it every chunk gathers into fresh tensors.
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, down_k, down_v))
    if not differentiable:
        query_buf = q.new_empty(chunk, b, heads, n_query, dim)
        key_buf = k.new_empty(chunk, b, heads, n_keys, dim)
        value_buf = v.new_empty(chunk, b, heads, n_keys, dim)
        key_buf[:, :, :, :n_side] = side_k
        value_buf[:, :, :, :n_side] = side_v
        mask_buf = q.new_zeros(chunk, 1, n_query, n_keys)  # additive: 0 = attend, -inf = masked
    for y0, ky0 in zip(q_y0.tolist(), k_y0.tolist()):
        if check_interrupt is not None:
            check_interrupt()
        qy = torch.arange(y0, y0 + tile_h, device=q.device)
        ky = torch.arange(ky0, ky0 + span_h, device=q.device)
        dy2 = (qy[:, None] - ky[None, :]) ** 2  # [tile_h, span_h]
        band_q = q_img[:, :, y0 - row0:y0 - row0 + tile_h]
        band_k, band_v = k_img[:, :, ky0:ky0 + span_h], v_img[:, :, ky0:ky0 + span_h]
        row = []
        for t0 in range(0, len(q_x0), chunk):
            xs = list(zip(q_x0[t0:t0 + chunk].tolist(), k_x0[t0:t0 + chunk].tolist()))
            n = len(xs)
            if differentiable:
                queries = torch.stack([band_q[:, :, :, x0:x0 + tile_w] for x0, _ in xs]).flatten(3, 4)
                keys = torch.cat([side_k.expand(n, *side_k.shape),
                                  torch.stack([band_k[:, :, :, kx0:kx0 + span_w] for _, kx0 in xs]).flatten(3, 4)], 3)
                values = torch.cat([side_v.expand(n, *side_v.shape),
                                    torch.stack([band_v[:, :, :, kx0:kx0 + span_w] for _, kx0 in xs]).flatten(3, 4)], 3)
            else:
                for i, (x0, kx0) in enumerate(xs):
                    query_buf[i].view(b, heads, tile_h, tile_w, dim).copy_(band_q[:, :, :, x0:x0 + tile_w])
                    key_buf[i, :, :, n_side:].view(b, heads, span_h, span_w, dim).copy_(band_k[:, :, :, kx0:kx0 + span_w])
                    value_buf[i, :, :, n_side:].view(b, heads, span_h, span_w, dim).copy_(band_v[:, :, :, kx0:kx0 + span_w])
                queries, keys, values = query_buf[:n], key_buf[:n], value_buf[:n]
            near = dy2[None, :, None, :, None] + dx2[t0:t0 + n, None, :, None, :] < radius * radius
            mask = q.new_zeros(n, 1, n_query, n_keys) if differentiable else mask_buf[:n]
            mask[:, 0, :, n_side:] = torch.where(near, 0.0, float("-inf")).reshape(n, n_query, -1)
            tile_out = F.scaled_dot_product_attention(queries.flatten(0, 1), keys.flatten(0, 1), values.flatten(0, 1),
                                                      attn_mask=mask.repeat_interleave(b, dim=0), scale=scale)
            row.extend(tile_out.unflatten(0, (n, b)).unflatten(3, (tile_h, tile_w)).unbind(0))
        # One write per tile row: its tiles side by side, the last one (shifted inward) only where
        # it does not overlap its neighbour; a shifted last row overwrites equal values.
        row[-1] = row[-1][..., tile_w - (w - (len(row) - 1) * tile_w):, :]
        out_img[:, :, y0 - row0:y0 - row0 + tile_h] = torch.cat(row, dim=3)
    return out
