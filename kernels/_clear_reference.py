"""Dense masked reference of circular-window attention: the definition the fast paths are
tested against. It builds the full ``L x (L + n_down)`` mask, so it is for small sizes only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_mask(grid: tuple[int, int], radius: int, n_txt: int, n_ref: int = 0, n_down: int = 0,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``[L, L + n_down]`` mask over ``[txt | image | ref]`` queries and
    ``[txt | image | ref | down]`` keys (True = attend).

    Global queries (text, reference) see every real token but no down-sampled token; image
    queries see every global token, every down-sampled token, and the image tokens with
    ``dy**2 + dx**2 < radius**2`` on the grid.
    """
    h, w = grid
    n_img = h * w
    n_real = n_txt + n_img + n_ref
    pos = torch.arange(n_real + n_down, device=device)
    is_img = (pos >= n_txt) & (pos < n_txt + n_img)
    local = torch.where(is_img, pos - n_txt, 0)
    y, x = local // w, local % w
    q_img = is_img[:n_real, None]
    k_img = is_img[None, :]
    near = (y[:n_real, None] - y[None, :]) ** 2 + (x[:n_real, None] - x[None, :]) ** 2 < radius * radius
    k_real = pos[None, :] < n_real
    return torch.where(q_img, ~k_img | near, k_real)


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, int], n_txt: int,
                    radius: int, n_ref: int = 0, down_k: torch.Tensor | None = None,
                    down_v: torch.Tensor | None = None, scale: float | None = None,
                    query_rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Attention with the full :func:`window_mask`, computed in float32. With ``query_rows``
    (start, stop), ``q`` holds only the image queries of those grid rows and gets their rows of
    the mask."""
    n_down = 0 if down_k is None else down_k.shape[2]
    keys = k if down_k is None else torch.cat([k, down_k], dim=2)
    values = v if down_v is None else torch.cat([v, down_v], dim=2)
    mask = window_mask(grid, radius, n_txt, n_ref, n_down, device=q.device)
    if query_rows is not None:
        mask = mask[n_txt + query_rows[0] * grid[1]:n_txt + query_rows[1] * grid[1]]
    out = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask, scale=scale)
    return out.to(q.dtype)
