"""Command-line tools: the same work as the nodes, for long runs outside the ComfyUI frontend."""
