"""Inf-DiT (arXiv 2405.04312): a pixel-space DiT upsampler evaluated block batch by block batch.

Host-free: the nodes in ``nodes/infdit.py`` call :func:`.upscale.upscale` with callbacks for
progress and interruption.
"""
