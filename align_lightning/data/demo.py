"""Embedded demo data: a deterministic, learnable and noisy stand-in for web alt-text pairs.

Every image shows one coloured shape of some size, at some height, on a light or dark background;
its alt-text describes a random subset of those attributes in one of several web-like phrasings.
Like web data, a fraction of the training pairs is noisy: some alt-texts belong to another image
(mismatched), others are junk ("IMG_0412.JPG", "click to enlarge"). The held-out validation and
test sets have clean, complete captions, so retrieval on them shows what the model learned
despite the noise. Nothing is downloaded or stored: images are rendered on the fly from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from align_lightning.data.collate import ImageTextCollator
from align_lightning.data.tokenizer import load_tokenizer, train_wordpiece
from align_lightning.data.transforms import image_transform

__all__ = ["DemoDataModule", "DemoImageTextDataset", "DemoSample", "make_demo_samples", "render_demo_image"]

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

_TEMPLATES = (
    "a {size} {color} {shape}",
    "{color} {shape} on a {background} background",
    "photo of a {size} {color} {shape} at the {position}",
    "{color} {shape} icon",
    "stock image: {size} {color} {shape}, {position} of the frame",
    "{shape} in {color}",
    "cute {color} {shape} clipart on {background} background",
    "{size} {shape}",
    "a {color} {shape} near the {position} of a {background} picture",
    "{Color} {shape} | free download",
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


class DemoImageTextDataset(Dataset):
    """Map-style dataset of ``(pixels, caption)`` demo pairs, rendered on access.

    Args:
        samples: The pairs (see :func:`make_demo_samples`).
        transform: Maps a PIL image to a float tensor.
        render_size: Side of the rendered image before the transform.
        seed: Base seed; item ``i`` is rendered with seed ``(seed, i)``.
    """

    def __init__(self, samples: list[DemoSample], transform: object, render_size: int, seed: int) -> None:
        self.samples = samples
        self.transform = transform
        self.render_size = render_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        sample = self.samples[index]
        image = render_demo_image(sample, self.render_size, seed=self.seed * 1_000_003 + index)
        return self.transform(image), sample.caption


class DemoDataModule(L.LightningDataModule):
    """The quickstart's data: embedded, noisy, learnable image-text pairs (no download).

    Training pairs are noisy like web alt-texts; validation/test pairs are clean and held out
    (different seeds). The tokenizer is a WordPiece vocabulary learned from the training captions,
    as ALIGN learned its own from its alt-texts, unless ``tokenizer`` names another one.

    Args:
        num_train: Number of training pairs.
        num_val: Number of validation pairs (also the size of the test split).
        image_size: Training/eval resolution (ALIGN uses 289; the quickstart uses 64 on CPU).
        batch_size: Pairs per batch per device.
        mismatch_rate: Fraction of training captions that belong to another image.
        junk_rate: Fraction of training captions replaced by junk alt-text.
        tokenizer: A Hugging Face tokenizer name or folder; ``None`` learns WordPiece from the
            training captions.
        vocab_size: Vocabulary size for the learned WordPiece tokenizer.
        max_length: Maximum tokens per caption (ALIGN: 64).
        normalize: Pixel normalisation: ``"align"`` ([-1, 1]), ``"imagenet"`` or ``"clip"``.
        num_workers: DataLoader worker processes.
        seed: Seed of the whole data set.
        name: Dataset name used in metric keys (``val/<name>/i2t_R@1``).
    """

    def __init__(
        self,
        num_train: int = 8192,
        num_val: int = 512,
        image_size: int = 64,
        batch_size: int = 64,
        mismatch_rate: float = 0.2,
        junk_rate: float = 0.1,
        tokenizer: str | None = None,
        vocab_size: int = 1000,
        max_length: int = 64,
        normalize: Literal["align", "imagenet", "clip"] = "align",
        num_workers: int = 0,
        seed: int = 0,
        name: str = "demo",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.name = name
        self.image_size = image_size
        self.normalize = normalize
        self.seed = seed
        self.train_samples = make_demo_samples(num_train, seed, mismatch_rate, junk_rate)
        self.val_samples = make_demo_samples(num_val, seed + 1)
        self.test_samples = make_demo_samples(num_val, seed + 2)
        if tokenizer is None:
            self.tokenizer = train_wordpiece(
                (s.caption for s in self.train_samples), vocab_size=vocab_size, max_length=max_length
            )
        else:
            self.tokenizer = load_tokenizer(tokenizer, max_length=max_length)
        self.collate = ImageTextCollator(self.tokenizer, max_length=max_length)

    def _dataset(self, samples: list[DemoSample], train: bool, seed: int) -> DemoImageTextDataset:
        transform = image_transform(self.image_size, train=train, normalize=self.normalize)
        # Render a little larger than the ALIGN resize so the transform really resizes.
        return DemoImageTextDataset(samples, transform, render_size=round(self.image_size * 1.5), seed=seed)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            # Equal, full batches keep the number of in-batch negatives constant and ranks in step.
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate,
        )

    def train_dataloader(self) -> DataLoader:
        """Noisy training pairs, shuffled, full batches only."""
        return self._loader(self._dataset(self.train_samples, train=True, seed=self.seed), train=True)

    def val_dataloader(self) -> DataLoader:
        """Clean held-out pairs, in order."""
        return self._loader(self._dataset(self.val_samples, train=False, seed=self.seed + 1), train=False)

    def test_dataloader(self) -> DataLoader:
        """A second clean held-out split, in order."""
        return self._loader(self._dataset(self.test_samples, train=False, seed=self.seed + 2), train=False)

    def predict_dataloader(self) -> DataLoader:
        """The validation pairs, for writing embeddings."""
        return self.val_dataloader()
