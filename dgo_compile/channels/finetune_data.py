"""Where `finetune`'s training batches come from.

Each source gives, per step, the denoiser's inputs (sample, timestep, then its conditions, in the
family's input order) for the whole global batch, and what the prediction is trained towards.
All randomness comes from the run's seed and the step number, so a resumed run draws the same
batches as an uninterrupted one and every data-parallel process draws the same global batch.

- `digit_batch` and `data_batch`: the shipped MNIST digits or the user's `--data`
  (`data_folder`), noised by the pipeline's own schedule; the target is what its scheduler's
  `prediction_type` says the model predicts: the noise (epsilon), the velocity (v_prediction,
  `scheduler.get_velocity`) or the clean sample (sample). Anything else is refused, never trained
  as epsilon.
- `TeacherTrajectories` (`--distill-only`): no data at all. The teacher samples from random noise
  with deterministic DDIM; every state x_t it visits, with its timestep, conditions and the
  teacher's own prediction there, is a training example. Runs are made in pools of one batch of
  trajectories; a pool's states are shuffled and used once each, so a pool lasts as many steps as
  a trajectory has, and the teacher costs one prediction per trained row. With `student_share`, that
  share of each pool's trajectories is run by the student being trained instead (on-policy
  distillation, as DAgger): the teacher still predicts at every state, but the states are the ones
  the student reaches, so the student also learns to correct the errors its own steps make, which
  compound along a sampling run. The student's rollouts cost one more prediction per row of theirs.

With `snr_gamma`, every row's squared error is weighted by Min-SNR-gamma (Hang et al. 2023, as
diffusers' training scripts do it, `compute_snr`): a timestep whose signal-to-noise ratio exceeds
gamma counts gamma / SNR as much, for an epsilon model. The low-noise steps, whose error is mostly the
unpredictable noise, stop crowding out the mid-noise steps that decide what a sample shows.

With `timestep_sampling="logit_normal"`, data batches draw their timesteps as diffusers' SD3 training
scripts do (`compute_density_for_timestep_sampling`): t / T = sigmoid(N(logit_mean, logit_std)), so
more rows land in the middle of the schedule, where a pruned student's errors change what a sample
shows, and fewer at its two ends, where they cost little. The loss per row is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr
from torch import nn

from dgo_compile.backend.sampling import make_scheduler
from dgo_compile.core.configs import FinetuneError
from dgo_compile.frontend.families import family_of

POOL_SEED_STRIDE = 1_000_003  # pool k of a run with seed s is drawn from seed s * stride + k
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Schedulers whose training noise is DDPM's beta schedule (their config's betas fields say which).
BETA_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                   "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                   "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
                   "DEISMultistepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")
CLASS_DROPOUT = 0.1  # DiT's label dropout, which trains the null class that guidance needs


@dataclass
class Batch:
    inputs: tuple[torch.Tensor, ...]  # the denoiser's inputs, in its input order
    target: torch.Tensor  # the noise (data) or the teacher's prediction (trajectories)
    teacher: bool = False  # the target already is the teacher's prediction


@dataclass
class NoiseSchedule:
    """The pipeline's training noise schedule and what its denoiser predicts, which together define the loss."""

    scheduler: DDPMScheduler
    prediction_type: str
    timestep_sampling: str = "uniform"  # or "logit_normal": see the module docstring
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n training timesteps (indices into the schedule): uniform, or logit-normal as SD3's scripts draw them."""
        count = self.scheduler.config.num_train_timesteps
        if self.timestep_sampling == "uniform":
            return torch.randint(0, count, (n,), generator=generator)
        u = compute_density_for_timestep_sampling(self.timestep_sampling, n, self.logit_mean, self.logit_std,
                                                  generator=generator)
        return (u * count).long().clamp(max=count - 1)  # sigmoid may round to 1.0 in float32

    def batch(self, x0: torch.Tensor, conditions: tuple[torch.Tensor, ...], generator: torch.Generator,
              null_label: int | None = None) -> Batch:
        """`x0` noised at `timesteps`; the target is what the model predicts for it (noise, velocity or
        x0). With `null_label`, a CLASS_DROPOUT share of the class labels (the last condition) become it."""
        noise = torch.randn(x0.shape, generator=generator)
        t = self.timesteps(len(x0), generator)
        if null_label is not None:
            dropped = torch.rand(len(x0), generator=generator) < CLASS_DROPOUT
            conditions = (*conditions[:-1], torch.where(dropped, null_label, conditions[-1]))
        noisy = self.scheduler.add_noise(x0, noise, t)
        return Batch((noisy, t, *conditions), self.target(x0, noise, t))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        return x0

    def snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma weight of each row at timestep `t`, for what the model predicts: min(SNR, gamma)
        divided by SNR (epsilon) or by SNR + 1 (v_prediction), or not divided (sample). A timestep of zero
        SNR (a zero-terminal-SNR schedule) weighs 1, the limit, instead of dividing by zero."""
        snr = compute_snr(self.scheduler, t.long())
        weights = snr.clamp(max=gamma)
        if self.prediction_type == "epsilon":
            weights = torch.where(snr > 0, weights / snr.clamp(min=torch.finfo(snr.dtype).tiny), 1.0)
        elif self.prediction_type == "v_prediction":
            weights = weights / (snr + 1)
        return weights


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The mean squared error, each row's scaled by its weight (None: plain MSE)."""
    if weights is None:
        return nn.functional.mse_loss(prediction, target)
    rows = (prediction - target).pow(2).flatten(1).mean(dim=1)
    return (rows * weights).mean()


def noise_schedule(scheduler_config: dict, where: str, sampling: tuple[str, float, float] = ("uniform", 0.0, 1.0)
                   ) -> NoiseSchedule:
    """The training schedule of `scheduler_config` (from the pipeline folder `where`), drawing timesteps by
    `sampling` (scheme, logit mean, logit std); schedulers and prediction types the loss cannot be built
    for are refused, naming the field."""
    name = scheduler_config.get("_class_name")
    if name not in BETA_SCHEDULERS:
        raise FinetuneError(f"{where}/scheduler/scheduler_config.json: _class_name {name} is not a DDPM-style "
                            f"(beta schedule) scheduler; finetune trains with those only "
                            f"({', '.join(BETA_SCHEDULERS)})")
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise FinetuneError(f"{where}/scheduler/scheduler_config.json: prediction_type {prediction!r} is not one "
                            f"finetune trains ({', '.join(PREDICTION_TYPES)})")
    return NoiseSchedule(DDPMScheduler.from_config(scheduler_config), prediction, *sampling)


def digit_batch(images: torch.Tensor, labels: torch.Tensor, conditional: bool, schedule: NoiseSchedule,
                batch: int, generator: torch.Generator) -> Batch:
    """A batch of shipped digits at the schedule's timesteps, noised by the model's schedule."""
    index = torch.randint(0, len(images), (batch,), generator=generator)
    return schedule.batch(images[index], (labels[index],) if conditional else (), generator)


def data_batch(data, schedule: NoiseSchedule, batch: int, generator: torch.Generator,
               null_label: int | None = None) -> Batch:
    """A batch of rows of `data` (a `data_folder.DataSource`) at the schedule's timesteps."""
    index = torch.randint(0, len(data), (batch,), generator=generator)
    rows = data.rows(index)
    return schedule.batch(rows[data.names[0]], tuple(rows[n] for n in data.names[1:]), generator, null_label)


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
    """States along the teacher's deterministic DDIM runs from random noise (see the module docstring).

    A text-conditional teacher (UNet2DConditionModel, PixArt) runs each trajectory on one of
    `prompts`, encoded per pool by `encode` (its pipeline's text encoder), or, a CLASS_DROPOUT share
    of the time, on the empty prompt, so the unconditional prediction guidance needs is trained too.
    `student_share` of each pool's trajectories is run by the student `draw` is given."""

    def __init__(self, teacher: nn.Module, scheduler_config: dict, steps: int, batch: int, seed: int,
                 prompts: list[str] | None = None, encode: Callable[[list[str]], torch.Tensor] | None = None,
                 student_share: float = 0.0):
        self.teacher = teacher.eval().requires_grad_(False)
        self.family = family_of(teacher)
        self.scheduler_config = scheduler_config
        self.steps, self.batch, self.seed = steps, batch, seed
        self.labels = label_count(teacher)
        self.conditions = self.family.input_names(teacher)[2:]
        self.prompts, self.encode = prompts, encode
        self.student_rows = round(student_share * batch)  # of each pool's `batch` trajectories
        # (index, states) of the pool in use; a checkpoint keeps it when it holds student rollouts, which
        # depend on the weights the pool was run with
        self.pool: tuple[int, dict[str, torch.Tensor]] | None = None

    def draw(self, step: int, student: nn.Module | None = None) -> Batch:
        """The batch of training step `step` (1-based): a slice of its pool's shuffled states; a new pool's
        student rollouts are run by `student` as it is now."""
        pool, within = divmod(step - 1, self.steps)
        states = self._states(pool, student)
        rows = states["order"][within * self.batch:(within + 1) * self.batch]
        inputs = tuple(states[name][rows] for name in ("sample", "timestep", *self.conditions))
        return Batch(inputs, states["prediction"][rows], teacher=True)

    def _states(self, pool: int, student: nn.Module | None) -> dict[str, torch.Tensor]:
        if self.pool is None or self.pool[0] != pool:
            if self.student_rows and student is None:
                raise ValueError("a pool with student rollouts needs the student")
            self.pool = pool, self.run(torch.Generator().manual_seed(self.seed * POOL_SEED_STRIDE + pool),
                                        self.batch, student)
        return self.pool[1]

    def _condition_rows(self, generator: torch.Generator, n: int, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Each trajectory's conditions: a class label, or a prompt's embedding (PixArt: and its size)."""
        rows: dict[str, torch.Tensor] = {}
        if self.labels is not None:
            rows["class_labels"] = torch.randint(0, self.labels, (n,), generator=generator)
        if "encoder_hidden_states" in self.conditions:
            choice = torch.randint(0, len(self.prompts), (n,), generator=generator)
            empty = torch.rand(n, generator=generator) < CLASS_DROPOUT
            rows["encoder_hidden_states"] = self.encode(["" if e else self.prompts[c] for c, e in
                                                         zip(choice.tolist(), empty.tolist())])
        if "resolution" in self.conditions:  # PixArt-Alpha: the pixel size, 8 pixels per latent as its VAE
            rows["resolution"] = torch.tensor([[size[0] * 8.0, size[1] * 8.0]]).expand(n, 2)
            rows["aspect_ratio"] = torch.tensor([[size[0] / size[1]]]).expand(n, 1)
        return rows

    @torch.no_grad()
    def run(self, generator: torch.Generator, n: int, student: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """n trajectories: every (sample, timestep, conditions, teacher's prediction) they pass, n * steps of
        each, and `order`, a seeded shuffle of them. With `student`, the first `student_rows` of them step
        with its predictions instead of the teacher's."""
        cfg = self.teacher.config
        size = (cfg.sample_size,) * 2 if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
        x = torch.randn((n, cfg.in_channels, *size), generator=generator)
        conditions = self._condition_rows(generator, n, size)
        extra = tuple(conditions[name] for name in self.conditions)
        scheduler = make_scheduler(self.scheduler_config, "ddim")
        scheduler.set_timesteps(self.steps)
        x = x * scheduler.init_noise_sigma
        k = min(self.student_rows, n) if student is not None else 0
        training = k and student.training
        if k:
            student.eval()
        seen: dict[str, list[torch.Tensor]] = {"sample": [], "timestep": [], "prediction": []}
        try:
            for t in scheduler.timesteps:
                x_in = scheduler.scale_model_input(x, t)
                timestep = t.float().expand(n)
                prediction = self.family.call(self.teacher, x_in, timestep, *extra)
                for key, value in (("sample", x_in), ("timestep", timestep), ("prediction", prediction)):
                    seen[key].append(value)
                steered = prediction
                if k:
                    own = self.family.call(student, x_in[:k], timestep[:k], *(e[:k] for e in extra))
                    steered = torch.cat([own, prediction[k:]])
                noise = steered[:, :cfg.in_channels]  # learned sigma: DDIM steps with the noise half
                x = scheduler.step(noise, t, x, eta=0.0).prev_sample
        finally:
            if k:
                student.train(training)
        states = {k: torch.cat(v) for k, v in seen.items()}
        states.update({name: value.repeat(self.steps, *([1] * (value.ndim - 1))) for name, value in conditions.items()})
        states["order"] = torch.randperm(n * self.steps, generator=generator)
        return states
