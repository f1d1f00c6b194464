"""Sampling through the traced graph reproduces diffusers' DDIM loop on the eager model."""

import torch
from diffusers import DDIMScheduler

from dgo_compile import load, trace
from dgo_compile.sampling import initial_noise, sample_ddim


def test_traced_ddim_matches_the_diffusers_pipeline():
    loaded = load()
    traced = trace(loaded)
    noise = initial_noise(3, (1, 32, 32), seed=7)
    ours = sample_ddim(traced, loaded.scheduler_config, noise, steps=5)

    # diffusers' DDIMPipeline loop, written out so it starts from our noise.
    scheduler = DDIMScheduler.from_config(loaded.scheduler_config)
    scheduler.set_timesteps(5)
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(loaded.model(x, t).sample, t, x, eta=0.0).prev_sample
    assert torch.allclose(ours, x.clamp(-1, 1), atol=1e-5)


def test_same_seed_same_images_different_seed_different_images():
    loaded = load()
    traced = trace(loaded)
    a = sample_ddim(traced, loaded.scheduler_config, initial_noise(2, (1, 32, 32), 1), steps=3)
    b = sample_ddim(traced, loaded.scheduler_config, initial_noise(2, (1, 32, 32), 1), steps=3)
    c = sample_ddim(traced, loaded.scheduler_config, initial_noise(2, (1, 32, 32), 2), steps=3)
    assert torch.equal(a, b) and not torch.allclose(a, c)
