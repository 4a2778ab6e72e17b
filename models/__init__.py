"""Host-free networks, weight files and key mappings. Never imports ComfyUI."""
