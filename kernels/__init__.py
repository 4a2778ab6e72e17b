"""Host-free tensor ops: each op is one public function with a PyTorch reference and,
where it pays off, a Triton backend selected by :mod:`.backend`. Never imports ComfyUI.

Public API, by concept:

- CLEAR attention (:mod:`.clear_attention`): :func:`circular_window_attention`, the op (a
  ``torch.library`` custom op underneath: differentiable, traceable by ``torch.compile``),
  :data:`CLEAR_BACKENDS`, what each of its backends can run, and :func:`covering_radius`.
- Softmax partials (:mod:`.softmax_partials`): :func:`softmax_partials`, attention over a part
  of the keys kept unnormalised, and :class:`SoftmaxPartials`, which combines parts exactly
  (devices that each hold some of the keys: stripe-parallel CLEAR's text queries).
- GSPN line scan (:mod:`.gspn_scan`): :func:`gspn_scan`, the op, :data:`GSPN_BACKENDS`, and
  :data:`DIRECTIONS`, the four scan directions.
- Dispatch (:mod:`.backend`): :class:`BackendSpec` (what one backend runs), :class:`OpBackends`
  (an op's backends in priority order), :func:`resolve_backend` (the backend a call gets),
  ``Backend`` and :data:`BACKENDS` (the ``backend=`` argument's values).
- Compiled kernels: :mod:`.compiled_table` (what Triton's compiler made of every kernel build
  per GPU architecture, as dispatch reads it) and :mod:`.aot` (the ahead-of-time builds that
  table is made from; run outside ``TRITON_INTERPRET``).
"""

from . import compiled_table
from .backend import BACKENDS, Backend, BackendSpec, OpBackends, resolve_backend
from .clear_attention import CLEAR_BACKENDS, circular_window_attention, covering_radius
from .gspn_scan import DIRECTIONS, GSPN_BACKENDS, gspn_scan
from .softmax_partials import SoftmaxPartials, softmax_partials

__all__ = [
    # CLEAR attention
    "circular_window_attention",  # the op: text, image-window, reference and down-sampled keys
    "CLEAR_BACKENDS",             # what each of its backends runs, in priority order
    "covering_radius",            # the smallest radius whose window holds a whole grid
    # Softmax partials
    "softmax_partials",           # attention over some of the keys, kept unnormalised
    "SoftmaxPartials",            # partials of several key sets, combined exactly
    # GSPN line scan
    "gspn_scan",                  # the op: one direction of the row-stochastic line scan
    "GSPN_BACKENDS",              # what each of its backends runs, in priority order
    "DIRECTIONS",                 # the four scan directions, by index
    # Dispatch
    "Backend",                    # the backend= argument's values
    "BACKENDS",                   # those values, for a choice list
    "BackendSpec",                # what one backend runs: devices, dtypes, capability, shared memory
    "OpBackends",                 # an op's backends in priority order
    "resolve_backend",            # the backend a call gets
    # Compiled kernels
    "compiled_table",             # what Triton's compiler made of every build, per GPU architecture
]
