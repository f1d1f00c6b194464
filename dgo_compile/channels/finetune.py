"""Fine-tune a denoiser (typically a channel-pruned one) with the ordinary denoising loss.

Diff-Pruning recovers a pruned model's quality by training it again for a while. The recipe is
the shipped model's own (scripts/train_default_model.py): the MSE towards what the pipeline's
scheduler says the model predicts (noise, velocity or clean sample; `finetune_data`) on the
shipped MNIST digits or, with `data`, the user's images or latents (`data_folder`), AdamW,
gradient clipping at 1, optional linear warmup then cosine decay to 2% of the learning rate, and
an EMA of the weights with warmup (diffusers' EMAModel), and optionally Min-SNR-gamma weights
per timestep (`snr_gamma`) and logit-normal timestep sampling (`timestep_sampling`). An optional
distillation term pulls the prediction towards an unpruned teacher's on the same noisy input.
With `distill_only` there is no data: the teacher's own DDIM trajectories are the inputs and its
predictions the targets (`finetune_data.TeacherTrajectories`), for UNet2DModel and
DiT denoisers of any size; with `student_rollouts`, part of those trajectories are the student's
own, and the checkpoint keeps the pool in use, since it depends on the weights it was run with.
With a teacher, `feature_distill` adds a term pulling every block's output towards the teacher's at the
channels the pruning kept (`feature_distill`).

The output folder is always a complete model that `load` reads (the EMA weights), plus
`finetune.json` (settings, sources, progress, loss history) and `finetune_state.pt` (raw
weights, EMA, optimizer, learning-rate and RNG state). A checkpoint replaces the weights, then
the state, then the record, each atomically; a resumed run continues from the state file and
reaches the same weights, bit for bit, as an uninterrupted run with the same seed. Under
`torchrun`, every process draws the same global batch, trains on its share and averages
gradients (`dgo_compile.core.distributed`); process 0 writes the checkpoints.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from diffusers.training_utils import EMAModel
from torch import nn

from dgo_compile.channels.data import mnist_digits
from dgo_compile.channels.feature_distill import FeatureDistillation
from dgo_compile.channels.finetune_data import (
    TeacherTrajectories,
    data_batch,
    digit_batch,
    noise_schedule,
    weighted_mse,
)
from dgo_compile.channels.finetune_models import check_distill_only, check_student, load_teacher, trajectory_prompts
from dgo_compile.core.configs import FinetuneConfig, FinetuneError  # noqa: F401  (re-exported)
from dgo_compile.core.distributed import current_world
from dgo_compile.core.files import write_atomic
from dgo_compile.core.finite import check_finite
from dgo_compile.core.outputs import check_output, make_staging, publish, write_error
from dgo_compile.frontend.families import family_of
from dgo_compile.frontend.loading import DEFAULT_MODEL, WEIGHT_FILES, LoadedModel, load, save_denoiser

FORMAT = "dgo-compile-finetune"
FORMAT_VERSION = 1
RECORD_FILE = "finetune.json"
STATE_FILE = "finetune_state.pt"
# The shipped model's recipe: cosine decay floor, EMA warmup power, gradient clipping.
MIN_LR_FACTOR = 0.02
EMA_POWER = 0.75
MAX_GRAD_NORM = 1.0
FINAL_LOSS_WINDOW = 50  # the reported final loss averages this many last steps: one batch is noisy


@dataclass
class FinetuneRecord:
    """What `finetune.json` holds."""

    config: FinetuneConfig
    model_source: str
    teacher: str | None = None
    data: dict | None = None  # what --data was: path, kind, rows, digest, class label map (data_folder)
    steps_done: int = 0
    # per step: loss, distill (with a teacher), features (with feature_distill), lr, ema_decay
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def model_path(self) -> Path:
        return Path(self.model_source)

    @property
    def teacher_path(self) -> Path | None:
        return Path(self.teacher) if self.teacher else None

    @property
    def complete(self) -> bool:
        return self.steps_done >= self.config.train_steps

    @property
    def final_loss(self) -> float | None:
        """Mean loss of the last FINAL_LOSS_WINDOW steps."""
        last = [h["loss"] for h in self.history[-FINAL_LOSS_WINDOW:]]
        return sum(last) / len(last) if last else None

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "config": asdict(self.config),
                "model_source": self.model_source, "teacher": self.teacher, "data": self.data,
                "steps_done": self.steps_done,
                "complete": self.complete, "seconds": self.seconds, "final_loss": self.final_loss,
                "history": self.history}

    @classmethod
    def from_json(cls, data: dict, path: Path) -> "FinetuneRecord":
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise FinetuneError(f"{path} is not a dgo-compile fine-tuning run of format version {FORMAT_VERSION}; "
                                "re-run `dgo-compile finetune`")
        return cls(FinetuneConfig.from_json(data["config"]), data["model_source"], data.get("teacher"),
                   data.get("data"), data["steps_done"], data["history"], data.get("seconds", 0.0))


@dataclass
class FinetuneResult:
    output: Path
    record: FinetuneRecord
    model: nn.Module  # what the output folder holds: the EMA weights (the raw ones with ema_decay 0), eval mode


def read_finetune(output: str | Path) -> FinetuneRecord:
    """The record of the fine-tuning run in `output` (finished or not)."""
    output = Path(output)
    if not (output / RECORD_FILE).is_file() or not (output / STATE_FILE).is_file():
        raise FinetuneError(f"{output} is not a fine-tuning output (needs {RECORD_FILE} and {STATE_FILE}); "
                            "make one with `dgo-compile finetune`")
    try:
        data = json.loads((output / RECORD_FILE).read_text())
        return FinetuneRecord.from_json(data, output)
    except FinetuneError:
        raise
    except Exception as exc:
        raise FinetuneError(f"cannot read {output / RECORD_FILE}: {exc}; re-run `dgo-compile finetune`") from exc


def finetune(model_path: str | os.PathLike | None, config: FinetuneConfig, output: str | Path, *,
             teacher: str | os.PathLike | None = None, resume: bool = False,
             on_step: Callable[[dict], None] | None = None) -> FinetuneResult:
    """Fine-tune the model at `model_path` (default: the shipped one) into the folder `output`,
    or continue the run there with `resume` (same model, teacher and config).

    `teacher`, the unpruned model, adds `config.distill` times the MSE between the two
    predictions; with `config.distill_only` that MSE on the teacher's trajectories is the whole
    loss and no data is read; `config.feature_distill` adds the block-output term (`feature_distill`), at
    one more teacher forward per step with `distill_only`. `on_step` gets each step's history record after
    any checkpoint of that step.
    """
    output = Path(output)
    world = current_world()
    rows = world.shard(config.batch, "batch")
    check_output(output, "finetune", resume=resume, protected=[model_path or DEFAULT_MODEL, teacher, config.data],
                 exists_hint="pass `resume` to continue it or choose another `output`", error=FinetuneError)
    stored = read_finetune(output) if resume else None
    if config.distill_only and (teacher is None or config.distill > 0):
        raise FinetuneError("`distill_only` needs `teacher`, the unpruned model whose trajectories are the data"
                            if teacher is None else "`distill_only` trains on the distillation term alone: "
                            "leave out `distill`", field=("distill_only", "teacher", "distill"))
    if config.distill > 0 and teacher is None:
        raise FinetuneError("`distill` needs `teacher`, the unpruned model to distill from",
                            field=("distill", "teacher"))
    if teacher is not None and config.distill == 0 and not config.distill_only:
        raise FinetuneError("`teacher` needs `distill` W > 0, the weight of the distillation term, or `distill_only`",
                            field=("teacher", "distill", "distill_only"))
    loaded = load(model_path)
    teacher_loaded = load(teacher) if config.distill_only else None
    if teacher_loaded is not None:
        conditional = check_distill_only(loaded, teacher_loaded)
    elif config.data is None:
        conditional = check_student(loaded)
    teacher_model = load_teacher(teacher, loaded, None if config.data is not None else conditional) \
        if teacher is not None and teacher_loaded is None else None
    # the feature term's record is checked against both models before `data` makes its cache folder
    features = FeatureDistillation(loaded, teacher_loaded.model if teacher_loaded else teacher_model) \
        if config.feature_distill else None
    record = FinetuneRecord(config, str(loaded.source.resolve()), str(Path(teacher).resolve()) if teacher else None)
    data = _open_data(config.data, loaded, output, world) if config.data is not None else None
    if data is not None:
        record.data = data.record
    if stored is not None:
        differ = [k for k, v in asdict(config).items() if asdict(stored.config)[k] != v]
        differ += ["MODEL"] * (stored.model_source != record.model_source)
        differ += ["teacher"] * (stored.teacher != record.teacher)
        if (stored.data or {}).get("digest") != (record.data or {}).get("digest"):
            raise FinetuneError(f"the files of `data` {config.data} changed since {output} began fine-tuning on them; "
                                "fine-tune into another `output`", field=("data", "output"))
        if differ:
            named = [name if name == "MODEL" else f"`{name}`" for name in differ]
            raise FinetuneError(f"{output} was fine-tuned with other settings ({', '.join(named)}); resume with the "
                                "same settings or choose another `output`", field=(*differ, "output"))
    if teacher_loaded is not None:
        trajectories = TeacherTrajectories(teacher_loaded.model, teacher_loaded.scheduler_config,
                                           config.trajectory_steps, config.batch, config.seed,
                                           *trajectory_prompts(config, teacher_loaded),
                                           student_share=config.student_rollouts)
        schedule = noise_schedule(loaded.scheduler_config, str(loaded.source)) if config.snr_gamma else None
    else:
        trajectories = None
        schedule = noise_schedule(loaded.scheduler_config, str(loaded.source),
                                  (config.timestep_sampling, config.logit_mean, config.logit_std))
        if data is None:
            images, labels = mnist_digits()
        null_label = family_of(loaded.model).null_class_label(loaded.model)
    family = family_of(loaded.model)
    model = copy.deepcopy(loaded.model).train().requires_grad_(True)  # the loaded model stays untouched
    # DiT's label embedding drops labels itself in train mode; our batches drop them (data) or draw the null
    # class (trajectories) instead, so that a teacher predicts for the very labels the student sees
    for module in model.modules():
        if hasattr(module, "dropout_prob") and hasattr(module, "token_drop"):
            module.dropout_prob = 0.0
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)

    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / config.warmup) if config.warmup else 1.0
        return max(warm * 0.5 * (1 + math.cos(math.pi * min(step, config.train_steps) / config.train_steps)),
                   MIN_LR_FACTOR)

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    ema = EMAModel(params, decay=config.ema_decay, use_ema_warmup=True, power=EMA_POWER) if config.ema_decay else None
    generator = torch.Generator().manual_seed(config.seed)

    def saved_model() -> nn.Module:
        weights = copy.deepcopy(model).eval().requires_grad_(False)
        if ema is not None:
            ema.copy_to(weights.parameters())
        return weights

    def training_state() -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_schedule": lr_schedule.state_dict(), "ema": ema.state_dict() if ema else None,
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                "trajectory_pool": trajectories.pool if trajectories and trajectories.student_rows else None,
                "steps_done": record.steps_done, "history": record.history, "seconds": record.seconds}

    with torch.random.fork_rng(devices=[]):  # dropout, if any, draws from the global RNG: seed it, save it
        torch.manual_seed(config.seed)
        if resume:
            state = _read_state(output)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            lr_schedule.load_state_dict(state["lr_schedule"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            record.steps_done, record.history, record.seconds = state["steps_done"], state["history"], state["seconds"]
            if trajectories is not None and trajectories.student_rows:
                trajectories.pool = state.get("trajectory_pool")
        world.barrier()  # every process has checked the output folder before process 0 creates it
        if not resume and world.is_main:
            _write_checkpoint(output, loaded, saved_model(), record, training_state())  # resumable from step 0
        checkpointed = record.steps_done  # the step the folder's checkpoint holds
        started = time.perf_counter()
        for step in range(record.steps_done + 1, config.train_steps + 1):
            if trajectories is not None:
                batch = trajectories.draw(step, model)
            elif data is not None:
                batch = data_batch(data, schedule, config.batch, generator, null_label)
            else:
                batch = digit_batch(images, labels, conditional, schedule, config.batch, generator)
            inputs = tuple(x[rows] for x in batch.inputs)  # this process's share
            with features.capture(model) if features else nullcontext({}) as student_blocks:
                prediction = family.call(model, *inputs)
            target = batch.target[rows]
            weights = schedule.snr_weights(inputs[1], config.snr_gamma) if config.snr_gamma else None
            # a learned-sigma model (DiT) predicts the variance too: the data loss is on the first half only
            loss = weighted_mse(prediction if batch.teacher else prediction[:, :target.shape[1]], target, weights)
            distill = loss if batch.teacher else None
            teacher_blocks: dict = {}
            if teacher_model is not None:
                teacher_capture = features.capture(teacher_model) if features else nullcontext({})
                with torch.no_grad(), teacher_capture as teacher_blocks:
                    target = family.call(teacher_model, *inputs)
                distill = weighted_mse(prediction, target, weights)
                loss = loss + config.distill * distill
            elif features is not None:  # distill_only: the trajectories hold the teacher's predictions, not its blocks
                with torch.no_grad(), features.capture(teacher_loaded.model) as teacher_blocks:
                    family.call(teacher_loaded.model, *inputs)
            feature_term = features.loss(student_blocks, teacher_blocks, weights) if features else None
            if feature_term is not None:
                loss = loss + config.feature_distill * feature_term
            mean_loss = world.mean(loss.item())
            check_finite(torch.tensor(mean_loss), f"the training loss at step {step}",
                         f"training stopped; {output} keeps its last checkpoint (step {checkpointed}): lower "
                         f"`lr` (now {config.lr:g}) and start again", field="lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            world.average_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            lr_schedule.step()
            if ema is not None:
                ema.step(params)
            entry = {"step": step, "loss": mean_loss,
                     **({"distill": world.mean(distill.item())} if distill is not None else {}),
                     **({"features": world.mean(feature_term.item())} if feature_term is not None else {}),
                     "lr": lr, "ema_decay": ema.cur_decay_value if ema else 0.0}
            record.history.append(entry)
            record.steps_done = step
            record.seconds += time.perf_counter() - started
            started = time.perf_counter()
            if world.is_main and (step % config.checkpoint_every == 0 or step == config.train_steps):
                _write_checkpoint(output, loaded, saved_model(), record, training_state())
                checkpointed = step
            if on_step is not None:
                on_step(entry)
    world.barrier()  # process 0's last checkpoint is on disk before any process returns
    return FinetuneResult(output, record, saved_model())


def _read_state(output: Path) -> dict:
    try:
        state = torch.load(output / STATE_FILE, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"model", "optimizer", "lr_schedule", "generator"} <= set(state) or \
                not isinstance(state.get("steps_done"), int) or not isinstance(state.get("history"), list):
            raise ValueError("not a training state")
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FinetuneError(f"cannot read {output / STATE_FILE} ({first_line}); it is damaged: fine-tune again into "
                            "a new `output`", field="output") from exc
    return state


def _open_data(folder: str, loaded: LoadedModel, output: Path, world):
    """The --data rows; process 0 prepares an image folder's cache while the others wait for it."""
    from dgo_compile.channels.data_folder import open_data

    loaded.require_scheduler("the model", FinetuneError, ", which sets the noise schedule")
    work = output.with_name(output.name + ".work")
    made = not work.exists()
    try:
        data = open_data(folder, loaded, work / "data") if world.is_main else None
    except BaseException:
        if made:  # a refused --data leaves nothing behind
            shutil.rmtree(work, ignore_errors=True)
        raise
    world.barrier()
    return data if data is not None else open_data(folder, loaded, work / "data", prepare=False)


def _write_checkpoint(output: Path, loaded: LoadedModel, weights: nn.Module, record: FinetuneRecord,
                      state: dict) -> None:
    """Make `output` hold `weights` as a loadable model, with the record and the training state.

    The first checkpoint renames a complete folder into place; later ones replace the weights
    file, the state and the record one by one, each atomically, so the folder is always a
    loadable model and the state file always one whole checkpoint.
    """
    check_finite(weights, f"the fine-tuned model at step {record.steps_done}",
                 f"training stopped; {output} keeps its last checkpoint: lower `lr` and start again", field="lr")
    staging = make_staging(output)
    try:
        fresh = save_denoiser(loaded, weights, staging / "model", pruning=loaded.pruning)
        if output.exists():
            weights_file = loaded.denoiser_folder.relative_to(loaded.source) / WEIGHT_FILES[0]
            os.replace(fresh / weights_file, output / weights_file)
            target = output
        else:
            target = fresh
        write_atomic(target / STATE_FILE, lambda p: torch.save(state, p))
        write_atomic(target / RECORD_FILE, lambda p: p.write_text(json.dumps(record.to_json(), indent=1)))
        if target is fresh:
            publish(fresh, output, "finetune")
    except OSError as exc:
        raise write_error(output, exc) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
