"""CLEAR for FLUX, host-free: the pattern settings of a released file, the down-sampled key
branch, the released files' key layout and its mapping onto a Flux, and the per-call attention
that ties them to :func:`ultrares.kernels.clear_attention.circular_window_attention`; for
several devices, the image's stripes and halos (``stripes``), the steps devices take together
(``communicator``: torch.distributed or threads of one process) and the exact stripe-parallel
attention call (``parallel``)."""
