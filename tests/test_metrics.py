"""Tests for dgo_compile.core.metrics: PSNR, SSIM, Frechet distance and the shipped digit classifier."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dgo_compile.core.metrics import (
    CLASSIFIER_FILE,
    DEFAULT_CLASSIFIER_DIR,
    MetricError,
    classifier_features,
    classifier_split,
    digit_frechet_distance,
    frechet_distance,
    load_digit_classifier,
    psnr,
    ssim,
)


def _images(n=4, c=1, size=32, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    # Smooth-ish structure (a blurred random field) so SSIM is far from its noise-only regime.
    base = torch.rand(n, c, size // 4, size // 4, generator=generator, dtype=dtype)
    up = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    return up * 1.6 - 0.8


# ---------------------------------------------------------------- PSNR


def test_psnr_identical_is_inf():
    a = _images()
    assert torch.isinf(psnr(a, a.clone())).all()
    assert (psnr(a, a.clone()) > 0).all()


def test_psnr_constant_offset_matches_analytic_value():
    a = _images(n=3)
    offset = 0.1
    values = psnr(a, a + offset)
    assert values.shape == (3,)
    expected = 10 * math.log10(2.0**2 / offset**2)  # MSE is offset^2 everywhere
    torch.testing.assert_close(values, torch.full((3,), expected, dtype=values.dtype))


def test_psnr_rejects_mismatched_shapes():
    with pytest.raises(MetricError, match="same shape"):
        psnr(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 9))


# ---------------------------------------------------------------- SSIM


def _numpy_ssim(x: np.ndarray, y: np.ndarray, data_range=2.0, window_size=11, sigma=1.5) -> float:
    """Reference SSIM for one 2-D image pair, written out with explicit loops over windows
    (skimage's gaussian_weights=True, use_sample_covariance=False semantics, valid region)."""
    radius = window_size // 2
    offsets = np.arange(window_size) - radius
    weights = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    weights /= weights.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(x.shape[0] - window_size + 1):
        for j in range(x.shape[1] - window_size + 1):
            px = x[i:i + window_size, j:j + window_size]
            py = y[i:i + window_size, j:j + window_size]
            mx, my = (weights * px).sum(), (weights * py).sum()
            vx = (weights * (px - mx) ** 2).sum()
            vy = (weights * (py - my) ** 2).sum()
            cxy = (weights * (px - mx) * (py - my)).sum()
            values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_identical_is_one():
    a = _images(n=3, c=2)
    torch.testing.assert_close(ssim(a, a.clone()), torch.ones(3, dtype=a.dtype), atol=1e-6, rtol=0)


def test_ssim_matches_loop_reference():
    a = _images(n=2, size=20, seed=1)
    generator = torch.Generator().manual_seed(2)
    b = (a + 0.3 * torch.randn(a.shape, generator=generator, dtype=a.dtype)).clamp(-1, 1)
    got = ssim(a, b)
    expected = [_numpy_ssim(a[k, 0].numpy(), b[k, 0].numpy()) for k in range(2)]
    assert 0.05 < min(expected) < 0.95  # a pair the check can discriminate
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_ssim_multichannel_is_mean_of_channels():
    a = _images(n=2, c=3, seed=3)
    b = _images(n=2, c=3, seed=4)
    per_channel = torch.stack([ssim(a[:, k:k + 1], b[:, k:k + 1]) for k in range(3)]).mean(dim=0)
    torch.testing.assert_close(ssim(a, b), per_channel)


def test_ssim_decreases_with_noise():
    a = _images(n=2)
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(a.shape, generator=generator, dtype=a.dtype)
    scores = torch.stack([ssim(a, a + std * noise) for std in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)])
    assert (scores[1:] < scores[:-1]).all(), scores


def test_ssim_is_symmetric():
    a, b = _images(seed=6), _images(seed=7)
    torch.testing.assert_close(ssim(a, b), ssim(b, a))


def test_ssim_float32():
    a = _images(dtype=torch.float32)
    result = ssim(a, a * 0.9)
    assert result.dtype == torch.float32
    assert (result < 1).all() and (result > 0.5).all()


def test_ssim_gradient_flows():
    target = _images(n=2)
    x = (target + 0.2).detach().requires_grad_(True)
    (1 - ssim(x, target)).mean().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 32, 31), "same shape"),
        (torch.zeros(1, 32, 32), torch.zeros(1, 32, 32), "4-D"),
        (torch.zeros(2, 1, 10, 32), torch.zeros(2, 1, 10, 32), "smaller than the 11x11 SSIM window"),
        (torch.zeros(2, 1, 32, 32, dtype=torch.long), torch.zeros(2, 1, 32, 32, dtype=torch.long), "floating point"),
    ],
)
def test_ssim_rejects_bad_inputs(a, b, message):
    with pytest.raises(MetricError, match=message):
        ssim(a, b)


# ---------------------------------------------------------------- Frechet distance


def _whitened(n=400, d=6, seed=0) -> np.ndarray:
    """Samples whose sample mean is exactly 0 and sample covariance exactly the identity."""
    x = np.random.default_rng(seed).standard_normal((n, d))
    x -= x.mean(axis=0)
    root = np.linalg.cholesky(np.cov(x, rowvar=False))
    return x @ np.linalg.inv(root).T


def test_frechet_distance_of_set_with_itself_is_zero():
    feats = np.random.default_rng(0).standard_normal((300, 8))
    assert abs(frechet_distance(feats, feats)) < 1e-8


def test_frechet_distance_identity_covariances_is_squared_mean_shift():
    x = _whitened()
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 0.25])
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-9)


def test_frechet_distance_scaled_covariance_closed_form():
    # cov(2x) = 4S, sqrt(S @ 4S) = 2S, so FD = |mu|^2 + tr(S) + 4 tr(S) - 4 tr(S) = |mu|^2 + tr(S).
    x = np.random.default_rng(1).standard_normal((500, 5)) @ np.diag([1.0, 2.0, 0.5, 1.5, 3.0]) + 1.0
    expected = float(x.mean(axis=0) @ x.mean(axis=0) + np.trace(np.cov(x, rowvar=False)))
    assert frechet_distance(x, 2 * x) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_survives_dead_features():
    x = _whitened()
    x[:, 2] = 0.0  # a ReLU unit that never fires gives a singular covariance
    shift = np.array([1.0, 0.0, 0.0, 2.0, 0.0, 0.0])
    assert frechet_distance(x, x + shift) == pytest.approx(5.0, abs=1e-4)


def test_frechet_distance_fewer_samples_than_dims_is_real_and_close():
    # Rank-deficient covariances make sqrtm return complex values with round-off imaginary parts.
    x = np.random.default_rng(2).standard_normal((5, 20))
    shift = np.linspace(-1.0, 1.0, 20)
    result = frechet_distance(x, x + shift)
    assert isinstance(result, float)
    assert result == pytest.approx(float(shift @ shift), abs=1e-3)


def test_frechet_distance_retries_with_eps_when_sqrtm_is_not_finite(monkeypatch):
    from dgo_compile.core import metrics

    calls = []
    real_sqrtm = metrics.linalg.sqrtm

    def flaky_sqrtm(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.inf) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(metrics.linalg, "sqrtm", flaky_sqrtm)
    x = _whitened()
    shift = np.ones(6)
    assert frechet_distance(x, x + shift, eps=1e-6) == pytest.approx(6.0, abs=1e-4)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], np.eye(6) * (1 + 1e-6) ** 2, atol=1e-12)


def test_frechet_distance_rejects_mismatched_dims():
    with pytest.raises(MetricError, match="same D"):
        frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))


# ---------------------------------------------------------------- shipped classifier


def test_load_digit_classifier_missing_file_names_path_and_script(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_digit_classifier.py") as info:
        load_digit_classifier(tmp_path)
    assert str(tmp_path / CLASSIFIER_FILE) in str(info.value)


shipped = pytest.mark.skipif(
    not (DEFAULT_CLASSIFIER_DIR / CLASSIFIER_FILE).is_file(),
    reason="no shipped classifier; run scripts/train_digit_classifier.py",
)


@pytest.fixture(scope="module")
def digits():
    from dgo_compile.channels.data import mnist_digits

    return mnist_digits()


@pytest.fixture(scope="module")
def classifier():
    return load_digit_classifier()


@shipped
def test_shipped_classifier_held_out_accuracy(digits, classifier):
    images, labels = digits
    report = json.loads((DEFAULT_CLASSIFIER_DIR / "classifier.json").read_text())
    _, held_out = classifier_split(labels, seed=report["split_seed"])
    assert len(held_out) == report["held_out_size"] == 1000
    with torch.no_grad():
        accuracy = (classifier(images[held_out]).argmax(dim=1) == labels[held_out]).float().mean().item()
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(report["held_out_accuracy"], abs=1e-3)


@shipped
def test_shipped_classifier_fd_separates_real_from_noise(digits, classifier):
    images, _ = digits
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    real_a, real_b = images[order[:500]], images[order[500:1000]]
    noise = torch.rand(500, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    floor = digit_frechet_distance(real_a, real_b, classifier)
    to_noise = digit_frechet_distance(real_a, noise, classifier)
    assert 0 < floor < 0.05 * to_noise, (floor, to_noise)


@shipped
def test_classifier_features_shape_and_mode(digits, classifier):
    images, _ = digits
    classifier.train()
    feats = classifier_features(images[:10], classifier, batch_size=4)
    assert classifier.training  # the caller's mode is restored
    classifier.eval()
    assert feats.shape == (10, 128) and feats.dtype == np.float64
