"""Generate the Home Assistant brand images (custom_components/ctrlable/brand/).

Run from the repository root with the .venv interpreter (Pillow comes with Home Assistant).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

OUT = Path(__file__).resolve().parent.parent / "custom_components" / "ctrlable" / "brand"
BLUE = (27, 58, 92, 255)
ORANGE = (245, 166, 35, 255)
WHITE = (255, 255, 255, 255)


def glyph(size: int, background: tuple[int, int, int, int]) -> Image.Image:
    scale = 4
    s = size * scale
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((0, 0, s - 1, s - 1), radius=s // 5, fill=background)
    m = s // 5
    w = s // 9
    d.arc((m, m, s - m, s - m), start=45, end=315, fill=WHITE, width=w)
    r = s // 11
    cx, cy = s - m - r // 2, s // 2
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=ORANGE)
    return img.resize((size, size), Image.LANCZOS)


def logo(height: int, dark: bool) -> Image.Image:
    text_color = WHITE if dark else BLUE
    icon = glyph(height, BLUE)
    font = ImageFont.load_default(size=int(height * 0.62))
    probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
    box = probe.textbbox((0, 0), "Ctrlable", font=font)
    width = height + height // 4 + (box[2] - box[0]) + height // 8
    img = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    img.paste(icon, (0, 0), icon)
    d = ImageDraw.Draw(img)
    y = (height - (box[3] - box[1])) // 2 - box[1]
    d.text((height + height // 4, y), "Ctrlable", font=font, fill=text_color)
    return img


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for dark in (False, True):
        prefix = "dark_" if dark else ""
        bg = (38, 78, 120, 255) if dark else BLUE
        glyph(256, bg).save(OUT / f"{prefix}icon.png", optimize=True)
        glyph(512, bg).save(OUT / f"{prefix}icon@2x.png", optimize=True)
        logo(128, dark).save(OUT / f"{prefix}logo.png", optimize=True)
        logo(256, dark).save(OUT / f"{prefix}logo@2x.png", optimize=True)


if __name__ == "__main__":
    main()
