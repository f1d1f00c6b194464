"""Where `finetune`'s training batches come from.

Each source gives, per step, the denoiser's inputs (sample, timestep, then its conditions, in the
family's input order) for the whole global batch, and what the prediction is trained towards.
All randomness comes from the run's seed and the step number, so a resumed run draws the same
batches as an uninterrupted one and every data-parallel process draws the same global batch.

- `digit_batch`: the shipped MNIST digits, noised by the model's own schedule (the target is
  the noise).
- `TeacherTrajectories` (`--distill-only`): no data at all. The teacher samples from random noise
  with deterministic DDIM; every state x_t it visits, with its timestep, conditions and the
  teacher's own prediction there, is a training example. Runs are made in pools of one batch of
  trajectories; a pool's states are shuffled and used once each, so a pool lasts as many steps as
  a trajectory has, and the teacher costs one prediction per trained row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .families import family_of
from .sampling import make_scheduler

POOL_SEED_STRIDE = 1_000_003  # pool k of a run with seed s is drawn from seed s * stride + k


@dataclass
class Batch:
    inputs: tuple[torch.Tensor, ...]  # the denoiser's inputs, in its input order
    target: torch.Tensor  # the noise (data) or the teacher's prediction (trajectories)
    teacher: bool = False  # the target already is the teacher's prediction


def digit_batch(images: torch.Tensor, labels: torch.Tensor, conditional: bool, noise_scheduler, batch: int,
                generator: torch.Generator) -> Batch:
    """A batch of shipped digits at uniform timesteps, noised by `noise_scheduler`; the target is the noise."""
    index = torch.randint(0, len(images), (batch,), generator=generator)
    x0 = images[index]
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
    noisy = noise_scheduler.add_noise(x0, noise, t)
    return Batch((noisy, t, labels[index]) if conditional else (noisy, t), noise)


def label_count(model: nn.Module) -> int | None:
    """How many class labels training draws from: the classes, plus the null class where the model has one
    (DiT), so the unconditional prediction that guidance needs is trained too. None without class labels."""
    family = family_of(model)
    if "class_labels" not in family.input_names(model):
        return None
    null = family.null_class_label(model)
    if null is not None:
        return null + 1
    return model.config.num_class_embeds


class TeacherTrajectories:
    """States along the teacher's deterministic DDIM runs from random noise (see the module docstring)."""

    def __init__(self, teacher: nn.Module, scheduler_config: dict, steps: int, batch: int, seed: int):
        self.teacher = teacher.eval().requires_grad_(False)
        self.family = family_of(teacher)
        self.scheduler_config = scheduler_config
        self.steps, self.batch, self.seed = steps, batch, seed
        self.labels = label_count(teacher)
        self._pool: tuple[int, dict[str, torch.Tensor]] | None = None

    def draw(self, step: int) -> Batch:
        """The batch of training step `step` (1-based): a slice of its pool's shuffled states."""
        pool, within = divmod(step - 1, self.steps)
        states = self._states(pool)
        rows = states["order"][within * self.batch:(within + 1) * self.batch]
        inputs = (states["sample"][rows], states["timestep"][rows])
        if self.labels is not None:
            inputs += (states["class_labels"][rows],)
        return Batch(inputs, states["prediction"][rows], teacher=True)

    def _states(self, pool: int) -> dict[str, torch.Tensor]:
        if self._pool is None or self._pool[0] != pool:
            self._pool = pool, self.run(torch.Generator().manual_seed(self.seed * POOL_SEED_STRIDE + pool),
                                        self.batch)
        return self._pool[1]

    @torch.no_grad()
    def run(self, generator: torch.Generator, n: int) -> dict[str, torch.Tensor]:
        """n teacher trajectories: every (sample, timestep, class label, prediction) they pass, n * steps of
        each, and `order`, a seeded shuffle of them."""
        cfg = self.teacher.config
        size = (cfg.sample_size,) * 2 if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
        x = torch.randn((n, cfg.in_channels, *size), generator=generator)
        labels = torch.randint(0, self.labels, (n,), generator=generator) if self.labels is not None else None
        scheduler = make_scheduler(self.scheduler_config, "ddim")
        scheduler.set_timesteps(self.steps)
        x = x * scheduler.init_noise_sigma
        seen: dict[str, list[torch.Tensor]] = {"sample": [], "timestep": [], "class_labels": [], "prediction": []}
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            timestep = t.float().expand(n)
            extra = (labels,) if labels is not None else ()
            prediction = self.family.call(self.teacher, x_in, timestep, *extra)
            for key, value in (("sample", x_in), ("timestep", timestep), ("prediction", prediction)):
                seen[key].append(value)
            if labels is not None:
                seen["class_labels"].append(labels)
            noise = prediction[:, :cfg.in_channels]  # learned sigma: DDIM steps with the noise half
            x = scheduler.step(noise, t, x, eta=0.0).prev_sample
        states = {k: torch.cat(v) for k, v in seen.items() if v}
        states["order"] = torch.randperm(n * self.steps, generator=generator)
        return states
