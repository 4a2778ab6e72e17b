"""Host-free tensor ops: each op is one public function with a PyTorch reference and,
where it pays off, a Triton backend selected by :mod:`.backend`. Never imports ComfyUI."""
