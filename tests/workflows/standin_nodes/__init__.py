"""Test-only ComfyUI nodes for running the example workflows on stand-in models.

``StandInTextEncode`` takes the place of text encoding (a CLIP/T5 loader plus CLIPTextEncode):
FLUX's T5-XXL (4.7 B parameters) and SDXL's CLIP-G (0.7 B) have fixed sizes in ComfyUI, so no
small file of their architecture loads. The node turns the prompt text into CONDITIONING of
the shapes the real encoders give (FLUX: T5-XXL tokens of width 4096 and a pooled CLIP-L
vector of 768; SDXL: CLIP-L + CLIP-G tokens of width 2048 and a pooled CLIP-G vector of
1280), deterministic in the text, so every downstream node receives what it would in real use.
Loaded only by the integration tests, never by the pack.
"""

from __future__ import annotations

import hashlib

import torch
from comfy_api.latest import ComfyExtension, io

# family -> (tokens, token width, pooled width); the token counts are the encoders' usual lengths
# for a short prompt (T5 is not padded in ComfyUI's FLUX encoder; CLIP is padded to 77).
SHAPES = {"flux": (32, 4096, 768), "sdxl": (77, 2048, 1280)}


def text_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


class StandInTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StandInTextEncode",
            category="testing",
            description="Prompt text -> CONDITIONING of a real text encoder's shapes (test stand-in).",
            inputs=[io.String.Input("text", multiline=True, tooltip="Prompt; the same text gives the same tensors."),
                    io.Combo.Input("family", options=list(SHAPES), tooltip="Which model's text encoders to mimic.")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text: str, family: str) -> io.NodeOutput:
        tokens, width, pooled = SHAPES[family]
        generator = torch.Generator().manual_seed(text_seed(text))
        cond = torch.randn(1, tokens, width, generator=generator)
        return io.NodeOutput([[cond, {"pooled_output": torch.randn(1, pooled, generator=generator)}]])


class StandInExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [StandInTextEncode]


async def comfy_entrypoint() -> ComfyExtension:
    return StandInExtension()
