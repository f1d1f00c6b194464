"""Image-quality metrics for judging a compiled denoiser against the model it came from.

Paired metrics (PSNR, SSIM) compare images that the original and the compiled model made from
the same noise, so they measure how far compilation moved each sample. The Frechet distance of
a small MNIST classifier's features compares whole sample sets, so it measures whether the
compiled model still draws digits like the real ones; the classifier ships in
``assets/mnist_ddpm/classifier`` and is made by ``scripts/train_digit_classifier.py``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import nn
from torch.nn import functional as F

from dgo_compile.core.errors import DgoError

DEFAULT_CLASSIFIER_DIR = Path(__file__).parents[1] / "assets" / "mnist_ddpm" / "classifier"
CLASSIFIER_FILE = "classifier.safetensors"
TRAIN_SCRIPT = "scripts/train_digit_classifier.py"


class MetricError(DgoError, ValueError):
    """Images or features a metric cannot compare (shapes, dtypes, sizes); a ValueError as well, since
    these are argument errors of a numeric function."""


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise MetricError(f"images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() != 4:
        raise MetricError(f"images must be 4-D [N, C, H, W], got {a.dim()}-D shape {tuple(a.shape)}")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise MetricError(f"images must be floating point, got {a.dtype} and {b.dtype}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB of two paired batches [N, C, H, W]; callers average the result.

    ``data_range`` is max - min of the pixel scale (2 for images in [-1, 1]). Identical images
    have zero error and give ``+inf``, so a mean over a batch that holds one is ``+inf`` too.
    """
    _check_pair(a, b)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_1d(window_size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(window_size, dtype=dtype, device=device) - (window_size - 1) / 2.0
    weights = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return weights / weights.sum()


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 2.0,
    window_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of two paired batches [N, C, H, W], as a tensor [N].

    Local statistics use a normalised Gaussian window over 'valid' positions only (no padding,
    so borders are not biased by invented pixels) and population (not sample) variances, with
    K1 = 0.01 and K2 = 0.03. Channels are filtered separately and the map is averaged over
    channels and positions. Differentiable, so ``1 - ssim`` can serve as a training loss.
    """
    _check_pair(a, b)
    if window_size < 1 or window_size % 2 == 0:
        raise MetricError(f"window_size must be a positive odd integer, got {window_size}")
    height, width = a.shape[-2:]
    if height < window_size or width < window_size:
        raise MetricError(f"images are {height}x{width}, smaller than the {window_size}x{window_size} SSIM window")

    channels = a.shape[1]
    g = _gaussian_1d(window_size, sigma, a.dtype, a.device)
    # Filter the five moment images in one depthwise pass: separable rows then columns.
    stacked = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    groups = 5 * channels
    filtered = F.conv2d(stacked, g.view(1, 1, 1, -1).expand(groups, 1, 1, window_size), groups=groups)
    filtered = F.conv2d(filtered, g.view(1, 1, -1, 1).expand(groups, 1, window_size, 1), groups=groups)
    mu_a, mu_b, e_aa, e_bb, e_ab = filtered.split(channels, dim=1)

    var_a = e_aa - mu_a * mu_a
    var_b = e_bb - mu_b * mu_b
    cov_ab = e_ab - mu_a * mu_b
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)) / (
        (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    )
    return ssim_map.flatten(1).mean(dim=1)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (the FID formula).

    Follows pytorch-fid: when the covariance product is singular enough that its square root
    is not finite, ``eps * I`` is added to both covariances. Imaginary parts that round-off
    leaves in the square root are discarded; large ones mean a broken input and raise.
    """
    feats_a = np.asarray(feats_a, dtype=np.float64)
    feats_b = np.asarray(feats_b, dtype=np.float64)
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise MetricError(f"features must be [N, D] with the same D, got {feats_a.shape} and {feats_b.shape}")
    if len(feats_a) < 2 or len(feats_b) < 2:
        raise MetricError(f"each feature set needs at least 2 rows, got {len(feats_a)} and {len(feats_b)}")

    mu_a, mu_b = feats_a.mean(axis=0), feats_b.mean(axis=0)
    sigma_a = np.cov(feats_a, rowvar=False)
    sigma_b = np.cov(feats_b, rowvar=False)

    with warnings.catch_warnings():
        # Singular products are expected (dead ReLU features); non-finite results are handled below.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma_a @ sigma_b)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma_a.shape[0]) * eps
            covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        tolerance = 1e-3 * max(1.0, float(np.abs(covmean.real).max()))
        largest = float(np.abs(np.diagonal(covmean).imag).max())
        if largest > tolerance:
            raise MetricError(f"covariance square root has an imaginary component of {largest:.3g}")
        covmean = covmean.real

    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))


class DigitClassifier(nn.Module):
    """Small CNN for 1x32x32 digits in [-1, 1]; its 128-d penultimate layer is the FD feature space."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def classifier_split(
    labels: torch.Tensor, seed: int = 0, held_out_per_class: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified (train, held-out) index split of ``labels``, shared by the training script and
    the tests so the shipped classifier's held-out accuracy can be re-checked."""
    generator = torch.Generator().manual_seed(seed)
    train, held_out = [], []
    for digit in range(10):
        members = torch.nonzero(labels == digit).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        held_out.append(members[:held_out_per_class])
        train.append(members[held_out_per_class:])
    return torch.cat(train).sort().values, torch.cat(held_out).sort().values


def load_digit_classifier(folder: Path | None = None) -> DigitClassifier:
    """Load the shipped (or a given folder's) ``classifier.safetensors``, in eval mode, on CPU."""
    from safetensors.torch import load_file

    path = Path(folder if folder is not None else DEFAULT_CLASSIFIER_DIR) / CLASSIFIER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no digit classifier at {path}; make it with `python {TRAIN_SCRIPT}`")
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def classifier_features(images: torch.Tensor, classifier: DigitClassifier, batch_size: int = 256) -> np.ndarray:
    """Feature rows [N, 128] (float64) of images [N, 1, 32, 32] in [-1, 1], in batches."""
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    try:
        chunks = [classifier.features(batch.to(device, torch.float32)).cpu() for batch in images.split(batch_size)]
    finally:
        classifier.train(was_training)
    return torch.cat(chunks).double().numpy()


def digit_frechet_distance(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    classifier: DigitClassifier | None = None,
    batch_size: int = 256,
) -> float:
    """Frechet distance of the digit classifier's features of two image sets in [-1, 1].

    FD is biased upwards at small sample counts: compare it only against the real-vs-real
    floor at the same counts, recorded in the classifier's ``classifier.json``.
    """
    classifier = classifier if classifier is not None else load_digit_classifier()
    return frechet_distance(
        classifier_features(images_a, classifier, batch_size),
        classifier_features(images_b, classifier, batch_size),
    )
