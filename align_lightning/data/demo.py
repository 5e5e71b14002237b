"""Embedded demo data: a deterministic, learnable and noisy stand-in for web alt-text pairs.

Every image shows one coloured shape of some size, at some height, on a light or dark background;
its alt-text describes a random subset of those attributes in one of several web-like phrasings.
Like web data, a fraction of the training pairs is noisy: some alt-texts belong to another image
(mismatched), others are junk ("IMG_0412.JPG", "click to enlarge"). The held-out validation and
test sets have clean, complete captions, so retrieval on them shows what the model learned
despite the noise. Nothing is downloaded: images are rendered from a seed.
:mod:`align_lightning.data.demo_corpus` writes them in the formats of real data, and
:class:`~align_lightning.data.DemoDataModule` trains from those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["DemoSample", "make_demo_samples", "render_demo_image"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
SIZES = ("small", "large")
# Only vertical positions: ALIGN's random horizontal flip would make "left"/"right" wrong.
POSITIONS = ("top", "middle", "bottom")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"light": (225, 222, 212), "dark": (45, 45, 55)}

# Each phrasing names at least four of the five attributes: web alt-texts this generic (e.g. "red
# circle") would be shared by more than 10 images and dropped by ALIGN's filter.
_TEMPLATES = (
    "a {size} {color} {shape} at the {position}",
    "{color} {shape} on a {background} background, {size}",
    "photo of a {size} {color} {shape} at the {position}",
    "{size} {color} {shape} icon on {background}",
    "stock image: {size} {color} {shape}, {position} of the frame",
    "{shape} in {color}, {position} of a {background} image",
    "cute {size} {color} {shape} clipart on {background} background",
    "{size} {shape} in {color} at the {position}",
    "a {color} {shape} near the {position} of a {background} picture",
    "{Color} {size} {shape} on {background} | free download",
)
_VAL_TEMPLATE = "a {size} {color} {shape} at the {position} on a {background} background"
_JUNK = (
    "IMG_{n:04d}.JPG",
    "DSC{n:05d}",
    "image",
    "click to enlarge",
    "untitled-{n}",
    "photo",
    "thumbnail",
    "free shipping on orders over ${n}",
    "",
    "page {n} of 12",
    "logo",
    "banner_ad_{n}.png",
)


@dataclass(frozen=True)
class DemoSample:
    """One demo pair: the rendered content and its alt-text.

    Attributes:
        shape, color, size, position, background: What the image shows.
        caption: The alt-text (possibly mismatched or junk in the training split).
        kind: ``"clean"``, ``"mismatched"`` or ``"junk"``.
    """

    shape: str
    color: str
    size: str
    position: str
    background: str
    caption: str
    kind: Literal["clean", "mismatched", "junk"] = "clean"


def _random_content(rng: np.random.Generator) -> dict[str, str]:
    background = str(rng.choice(list(BACKGROUNDS)))
    # Keep the shape visible: no white on light or black on dark.
    hidden = "white" if background == "light" else "black"
    color = str(rng.choice([c for c in COLORS if c != hidden]))
    return {
        "shape": str(rng.choice(SHAPES)),
        "color": color,
        "size": str(rng.choice(SIZES)),
        "position": str(rng.choice(POSITIONS)),
        "background": background,
    }


def _caption(content: dict[str, str], template: str) -> str:
    return template.format(Color=content["color"].capitalize(), **content)


def make_demo_samples(
    num_samples: int, seed: int, mismatch_rate: float = 0.0, junk_rate: float = 0.0
) -> list[DemoSample]:
    """Draw the demo pairs of one split (content and captions only; images are rendered lazily).

    Args:
        num_samples: Number of pairs.
        seed: Seed of the split; the same seed always gives the same pairs.
        mismatch_rate: Fraction of captions replaced by another pair's caption. When 0, captions
            are clean and complete (the evaluation form).
        junk_rate: Fraction of captions replaced by junk alt-text.

    Returns:
        The pairs, in order.
    """
    if mismatch_rate + junk_rate > 1.0:
        raise ValueError(f"mismatch_rate + junk_rate must be <= 1, got {mismatch_rate} + {junk_rate}.")
    rng = np.random.default_rng(seed)
    contents = [_random_content(rng) for _ in range(num_samples)]
    noisy = mismatch_rate > 0 or junk_rate > 0
    captions = [_caption(c, str(rng.choice(_TEMPLATES)) if noisy else _VAL_TEMPLATE) for c in contents]
    samples = []
    for i, content in enumerate(contents):
        u = rng.random()
        if u < mismatch_rate:
            other = (i + 1 + int(rng.integers(max(num_samples - 1, 1)))) % num_samples
            samples.append(DemoSample(**content, caption=captions[other], kind="mismatched"))
        elif u < mismatch_rate + junk_rate:
            junk = str(rng.choice(_JUNK)).format(n=int(rng.integers(10_000)))
            samples.append(DemoSample(**content, caption=junk, kind="junk"))
        else:
            samples.append(DemoSample(**content, caption=captions[i]))
    return samples


def render_demo_image(sample: DemoSample, size: int, seed: int) -> Image.Image:
    """Render a sample's image (deterministic for a given ``seed``).

    Args:
        sample: What to draw.
        size: Side of the square RGB image in pixels.
        seed: Seed for the placement jitter and background noise.
    """
    rng = np.random.default_rng(seed)
    background = np.array(BACKGROUNDS[sample.background], dtype=np.int16)
    noise = rng.integers(-18, 19, size=(size, size, 3), dtype=np.int16)
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    radius = size * (rng.uniform(0.09, 0.13) if sample.size == "small" else rng.uniform(0.2, 0.26))
    cx = size * rng.uniform(0.3, 0.7)
    cy = (
        size
        * {"top": rng.uniform(0.2, 0.3), "middle": rng.uniform(0.45, 0.55), "bottom": rng.uniform(0.7, 0.8)}[
            sample.position
        ]
    )
    fill = COLORS[sample.color]
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if sample.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif sample.shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(radius * 0.35)))
    elif sample.shape == "square":
        draw.rectangle(box, fill=fill)
    elif sample.shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=fill)
    elif sample.shape == "diamond":
        draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=fill)
    else:  # cross
        arm = radius * 0.35
        draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=fill)
    return image
