"""GSPN in ComfyUI: the patch and distillation nodes, the attn1 patches and the distillation host."""
