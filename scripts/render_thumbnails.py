"""Draw the template-browser thumbnail of each example workflow: ``workflows/<name>.jpg``.

    python scripts/render_thumbnails.py

The picture is a diagram drawn from the UI JSON with Pillow: the workflow's stages (its
groups, left to right, in their colours) with the nodes each holds, this pack's nodes
highlighted. ComfyUI's template browser shows ``<name>.jpg`` from the folder of ``<name>.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import workflow_graph as wg  # noqa: E402

SIZE = (512, 384)
MARGIN = 16
GAP = 22
TOP = 64
BACKGROUND = (32, 32, 32)
TEXT = (235, 235, 235)
PACK_TEXT = (255, 214, 120)
PACK_PREFIX = "UltraRes"


def _hex(colour: str) -> tuple[int, int, int]:
    colour = colour.lstrip("#")
    if len(colour) == 3:
        colour = "".join(c * 2 for c in colour)
    return tuple(int(colour[i:i + 2], 16) for i in (0, 2, 4))


def _inside(node: dict, group: dict) -> bool:
    x, y, w, h = group["bounding"]
    return x <= node["pos"][0] <= x + w and y <= node["pos"][1] <= y + h


# Pillow's built-in font has no glyphs for these.
PLAIN = str.maketrans({"×": "x", "→": "->", "²": "^2", "≈": "~", "–": "-", "—": "-"})


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> list[str]:
    lines, line = [], ""
    for word in text.translate(PLAIN).split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def _stages(workflow: dict, definitions: dict) -> list[tuple[dict, list[tuple[str, bool]]]]:
    """Each group (left to right) with the titles of its server-side nodes in execution order (pack
    nodes flagged)."""
    stages = []
    for group in sorted(workflow["groups"], key=lambda g: (g["bounding"][0], g["bounding"][1])):
        members = sorted((n for n in workflow["nodes"] if n["type"] not in wg.FRONTEND_ONLY and _inside(n, group)),
                         key=lambda n: n["order"])
        labels = [(n.get("title") or definitions[n["type"]].display_name, n["type"].startswith(PACK_PREFIX))
                  for n in members]
        stages.append((group, labels))
    return stages


def render(workflow: dict, title: str, definitions: dict) -> Image.Image:
    """The workflow's stages as boxes in execution order, each listing its nodes."""
    image = Image.new("RGB", SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image, "RGBA")
    draw.text((MARGIN, 18), title, fill=TEXT, font=ImageFont.load_default(size=22))
    stages = _stages(workflow, definitions)
    width = (SIZE[0] - 2 * MARGIN - GAP * (len(stages) - 1)) / len(stages)
    heading, body = ImageFont.load_default(size=13), ImageFont.load_default(size=11)
    bottom = SIZE[1] - MARGIN
    for index, (group, labels) in enumerate(stages):
        left = MARGIN + index * (width + GAP)
        colour = _hex(group["color"])
        draw.rounded_rectangle([left, TOP, left + width, bottom], radius=8, fill=(*colour, 110), outline=colour,
                               width=2)
        y = TOP + 8
        for line in _wrap(draw, group["title"], heading, width - 12):
            draw.text((left + 6, y), line, fill=TEXT, font=heading)
            y += 16
        y += 8
        for label, is_pack in labels:
            for line in _wrap(draw, label, body, width - 16):
                if y > bottom - 16:
                    break
                draw.text((left + 8, y), line, fill=PACK_TEXT if is_pack else TEXT, font=body)
                y += 14
            y += 3
        if index + 1 < len(stages):
            mid, tip = (TOP + bottom) / 2, left + width + GAP - 3
            draw.line([(left + width + 3, mid), (tip, mid)], fill=TEXT, width=3)
            draw.polygon([(tip, mid), (tip - 7, mid - 6), (tip - 7, mid + 6)], fill=TEXT)
    return image


def main() -> None:
    definitions = wg.load_definitions()
    for path in wg.workflow_paths():
        target = path.with_suffix(".jpg")
        render(wg.load_workflow(path), path.stem, definitions).save(target, quality=90)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
