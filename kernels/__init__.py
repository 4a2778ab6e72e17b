"""Host-free tensor ops: each op is one public function with a PyTorch reference and,
where it pays off, a Triton backend selected by :mod:`.backend`. Never imports ComfyUI.

Public API, by concept:

- CLEAR attention (:mod:`.clear_attention`): :func:`circular_window_attention`, the op (a
  ``torch.library`` custom op underneath: differentiable, traceable by ``torch.compile``), and
  :data:`CLEAR_BACKENDS`, what each of its backends can run.
- Softmax partials (:mod:`.softmax_partials`): :func:`softmax_partials`, attention over a part
  of the keys kept unnormalised, and :class:`SoftmaxPartials`, which combines parts exactly
  (devices that each hold some of the keys: stripe-parallel CLEAR's text queries).
- GSPN line scan (:mod:`.gspn_scan`): :func:`gspn_scan`, the op, :data:`GSPN_BACKENDS`, and
  :data:`DIRECTIONS`, the four scan directions.
- Dispatch (:mod:`.backend`): :class:`BackendSpec` (what one backend runs), :class:`OpBackends`
  (an op's backends in priority order), :func:`resolve_backend` (the backend a call gets),
  ``Backend`` (the ``backend=`` argument's values).
- Compiled kernels: :mod:`.compiled_table` (what Triton's compiler made of every kernel build
  per GPU architecture, as dispatch reads it) and :mod:`.aot` (the ahead-of-time builds that
  table is made from; run outside ``TRITON_INTERPRET``).
"""

from . import compiled_table
from .backend import Backend, BackendSpec, OpBackends, resolve_backend
from .clear_attention import CLEAR_BACKENDS, circular_window_attention
from .gspn_scan import DIRECTIONS, GSPN_BACKENDS, gspn_scan
from .softmax_partials import SoftmaxPartials, softmax_partials

__all__ = [
    # CLEAR attention
    "CLEAR_BACKENDS", "circular_window_attention",
    # softmax partials
    "SoftmaxPartials", "softmax_partials",
    # GSPN line scan
    "DIRECTIONS", "GSPN_BACKENDS", "gspn_scan",
    # dispatch
    "Backend", "BackendSpec", "OpBackends", "resolve_backend",
    # compiled kernels
    "compiled_table",
]
