"""Tests for align_lightning/data/demo.py."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from align_lightning.data.demo import COLORS, make_demo_samples, render_demo_image


def test_samples_are_deterministic_and_noisy_like_web_data() -> None:
    samples = make_demo_samples(2000, seed=3, mismatch_rate=0.2, junk_rate=0.1)
    assert samples == make_demo_samples(2000, seed=3, mismatch_rate=0.2, junk_rate=0.1)
    kinds = Counter(s.kind for s in samples)
    assert kinds["mismatched"] / 2000 == pytest.approx(0.2, abs=0.03)
    assert kinds["junk"] / 2000 == pytest.approx(0.1, abs=0.03)
    clean = [s for s in samples if s.kind == "clean"]
    # A clean caption names the shape it describes; a mismatched one usually does not.
    assert all(s.shape in s.caption for s in clean)
    mismatched = [s for s in samples if s.kind == "mismatched"]
    assert sum(s.shape in s.caption for s in mismatched) / len(mismatched) < 0.4


def test_eval_split_is_clean_and_complete() -> None:
    for s in make_demo_samples(200, seed=1):
        assert s.kind == "clean"
        assert all(attr in s.caption for attr in (s.shape, s.color, s.size, s.position, s.background))


def test_render_draws_the_described_colour() -> None:
    sample = next(s for s in make_demo_samples(100, seed=5) if s.size == "large" and s.shape != "ring")
    pixels = np.asarray(render_demo_image(sample, 96, seed=0)).reshape(-1, 3).astype(int)
    distance = np.abs(pixels - np.array(COLORS[sample.color])).sum(axis=1)
    assert (distance < 10).mean() > 0.05  # a large shape covers well over 5% of the image
    assert np.array_equal(np.asarray(render_demo_image(sample, 96, seed=0)), pixels.reshape(96, 96, 3))
