"""DiP-GO's pruner: learn which (denoiser call, element) pairs may reuse their cache.

A small network turns learnable queries (one per call and element, plus the call's timestep
embedding) into two logits (reuse, keep) per pair; straight-through gates drive the gated
SuperNet through a whole sampling trajectory, and the loss is the consistency of its final
images with the full model's from the same noise (1 - SSIM) plus DiP-GO's FLOPs-weighted
sparsity, switched off once the hard schedule keeps no more than the target share of MACs.
Unlike the authors' release, the encoder really mixes its tokens (self-attention over every
call and element). One trained pruner yields a schedule at any budget
(`dgo_compile.schedules.schedule_cost.extract_schedule`).

A pruner folder holds `pruner.json` (configs, sampler, history, progress) and `checkpoint.pt`
(weights, optimizer and learning-rate state); both are replaced atomically at every
checkpoint, so an interrupted run resumes from its last one and reaches the same weights as an
uninterrupted run with the same seed. Under `torchrun`, each process takes its share of every
batch and gradients are averaged (`dgo_compile.core.distributed`): the same pruner at the same
global `--batch`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dgo_compile.backend.sampling import denoiser_timesteps, make_scheduler, trajectory
from dgo_compile.core.configs import GRANULARITIES, OptimizeConfig, PrunerError  # noqa: F401  (re-exported)
from dgo_compile.core.distributed import current_world
from dgo_compile.core.files import write_atomic
from dgo_compile.core.finite import check_finite
from dgo_compile.core.outputs import check_output, staged
from dgo_compile.frontend.tracing import TracedDenoiser
from dgo_compile.schedules.schedule import Schedule
from dgo_compile.schedules.schedule_cost import ScheduleCost
from dgo_compile.schedules.supernet import SuperNetRun, build_supernet, fits_without_checkpointing, graph_on
from dgo_compile.search.calibration import calibration_inputs, condition_rows, consistency
from dgo_compile.search.warm_start import initial_schedule, start_from

FORMAT = "dgo-compile-pruner"
FORMAT_VERSION = 1
STATE_FILE = "pruner.json"
CHECKPOINT_FILE = "checkpoint.pt"
log = logging.getLogger("dgo_compile.search.pruner")


class Pruner(nn.Module):
    """Queries -> encoder -> per-(call, column) 2-logit heads (reuse, keep), initialised to keep.

    `columns` is the number of elements, or 1 for whole-network gates.
    """

    HEADS = 4

    def __init__(self, calls: int, columns: int, timesteps: tuple[float, ...], dim: int = 128, layers: int = 2,
                 timestep_conditioning: bool = True):
        super().__init__()
        self.calls, self.columns, self.dim = calls, columns, dim
        self.queries = nn.Parameter(torch.randn(calls, columns, dim) * 0.02)
        self.register_buffer("timesteps", torch.tensor(timesteps, dtype=torch.float32))
        self.time_proj = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim)) \
            if timestep_conditioning else None
        layer = nn.TransformerEncoderLayer(dim, self.HEADS, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        # DiP-GO's initialisation: weight 0, bias (reuse 0, keep 1), so training starts from the full model.
        self.head_weight = nn.Parameter(torch.zeros(calls, columns, dim, 2))
        self.head_bias = nn.Parameter(torch.tensor([0.0, 1.0]).repeat(calls, columns, 1))

    def logits(self) -> torch.Tensor:
        """[calls, columns, 2]: (reuse, keep)."""
        tokens = self.queries
        if self.time_proj is not None:
            from diffusers.models.embeddings import get_timestep_embedding

            tokens = tokens + self.time_proj(get_timestep_embedding(self.timesteps, self.dim))[:, None, :]
        mixed = self.encoder(tokens.reshape(1, -1, self.dim)).reshape(self.calls, self.columns, self.dim)
        return torch.einsum("tcd,tcdk->tck", mixed, self.head_weight) + self.head_bias

    def gates(self) -> torch.Tensor:
        """Straight-through keep gates [calls, columns]: 0/1 forward, softmax gradient backward.
        Call 0 always computes (no cache exists yet)."""
        logits = self.logits()
        soft = logits.softmax(-1)[..., 1]
        hard = (logits[..., 1] >= logits[..., 0]).to(soft.dtype)
        gates = hard + (soft - soft.detach())  # exactly 0/1 forward
        return torch.cat([torch.ones_like(gates[:1]), gates[1:]])

    @torch.no_grad()
    def reuse_margins(self) -> torch.Tensor:
        """logit(reuse) - logit(keep) per (call, column), -inf at call 0: the ranking for extraction,
        which keeps its order where the softmax has saturated to 0 or 1."""
        logits = self.logits()
        margins = logits[..., 0] - logits[..., 1]
        margins[0] = -math.inf
        return margins


@dataclass
class PrunerState:
    """What `pruner.json` holds."""

    config: OptimizeConfig
    model_source: str | None
    scheduler: dict  # name, steps, calls, timesteps, config
    elements: tuple[str, ...]  # schedule columns (blocks, or units)
    schedule_granularity: str  # block or unit: the schedules this pruner extracts
    cascade_shares: dict[str, float]
    iterations_done: int = 0
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # in the iterations
    peak_memory_mb: float | None = None
    decoded_with_vae: bool = False  # consistency on VAE-decoded images rather than latents
    setup_seconds: float = 0.0  # before them: the start's search and the full model's targets, per (re)start

    @property
    def model_path(self) -> Path | None:
        return Path(self.model_source) if self.model_source else None

    @property
    def complete(self) -> bool:
        return self.iterations_done >= self.config.iters

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "config": asdict(self.config),
                "model_source": self.model_source, "scheduler": self.scheduler, "elements": list(self.elements),
                "schedule_granularity": self.schedule_granularity, "cascade_shares": self.cascade_shares,
                "iterations_done": self.iterations_done, "complete": self.complete, "seconds": self.seconds,
                "peak_memory_mb": self.peak_memory_mb, "decoded_with_vae": self.decoded_with_vae,
                "setup_seconds": self.setup_seconds, "history": self.history}

    @classmethod
    def from_json(cls, data: dict, path: Path) -> "PrunerState":
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise PrunerError(f"{path} is not a dgo-compile pruner of format version {FORMAT_VERSION}; "
                              "re-run `dgo-compile optimize`")
        return cls(OptimizeConfig.from_json(data["config"]), data["model_source"], data["scheduler"],
                   tuple(data["elements"]), data["schedule_granularity"], data["cascade_shares"],
                   data["iterations_done"], data["history"], data.get("seconds", 0.0), data.get("peak_memory_mb"),
                   data.get("decoded_with_vae", False), data.get("setup_seconds", 0.0))


def build_pruner(state: PrunerState) -> Pruner:
    config = state.config
    columns = 1 if config.granularity == "step" else len(state.elements)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        return Pruner(state.scheduler["calls"], columns, tuple(state.scheduler["timesteps"]), config.dim,
                      config.layers, config.timestep_conditioning)


@dataclass
class TrainedPruner:
    state: PrunerState
    pruner: Pruner

    def reuse_margins(self) -> torch.Tensor:
        """Reuse-minus-keep logits [calls, elements]; whole-network gates are spread over every element."""
        margins = self.pruner.reuse_margins()
        return margins.expand(-1, len(self.state.elements)) if margins.shape[1] == 1 else margins

    def reuse_scores(self) -> torch.Tensor:
        """P(reuse) [calls, elements], for people to read."""
        return self.reuse_margins().sigmoid()

    @property
    def whole_calls(self) -> bool:
        return self.state.config.granularity == "step"


def restartable(output: str | Path) -> bool:
    """Whether `output` is a folder an interrupted first checkpoint left (by an older version, which wrote it
    in place): no readable checkpoint, and nothing in it but this tool's own files."""
    output = Path(output)
    if not output.is_dir() or output.is_symlink():
        return False
    names = [p.name for p in output.iterdir()]
    if not names or not all(n in (STATE_FILE, CHECKPOINT_FILE) or n.startswith((f".{STATE_FILE}.",
                                                                                f".{CHECKPOINT_FILE}."))
               for n in names):
        return False
    try:
        load_pruner(output, allow_unfinished=True)
    except PrunerError:
        return True
    return False


def load_pruner(path: str | Path, allow_unfinished: bool = False) -> TrainedPruner:
    path = Path(path)
    state_file, checkpoint_file = path / STATE_FILE, path / CHECKPOINT_FILE
    if not state_file.is_file() or not checkpoint_file.is_file():
        raise PrunerError(f"{path} is not a pruner folder (needs {STATE_FILE} and {CHECKPOINT_FILE}); "
                          "make one with `dgo-compile optimize`")
    try:
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
        state = PrunerState.from_json(json.loads(checkpoint.get("state") or state_file.read_text()), path)
        pruner = build_pruner(state)
        pruner.load_state_dict(checkpoint["pruner"])
    except PrunerError:
        raise
    except Exception as exc:
        raise PrunerError(f"cannot read pruner {path}: {exc}; re-run `dgo-compile optimize`") from exc
    if not state.complete and not allow_unfinished:
        raise PrunerError(f"{path} stopped at iteration {state.iterations_done} of {state.config.iters}; finish it "
                          "with `dgo-compile optimize ... --resume`")
    return TrainedPruner(state, pruner)


def gated_step_fn(supernet, elements: tuple[str, ...], gates: torch.Tensor, checkpointed: bool = True):
    """A denoiser for `trajectory` that runs the gated SuperNet with row i of `gates` at call i
    (call 0 computes everything); gradients reach `gates` through every later call."""
    run = SuperNetRun(supernet, checkpointed=checkpointed)
    call = iter(range(gates.shape[0]))

    def step_fn(x, t, *extra):
        i = next(call)
        return run(x, t, *extra, gates=None if i == 0 else dict(zip(elements, gates[i])))

    return step_fn


def optimize(traced: TracedDenoiser, scheduler_config: dict, config: OptimizeConfig, output: str | Path, *,
             model_source: str | None = None, null_class_label: int | None = None, resume: bool = False,
             decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
             on_iteration: Callable[[dict], None] | None = None, device: str = "cpu") -> TrainedPruner:
    """Train a pruner (or continue one with `resume`) and keep it in the folder `output`.

    `device` runs the SuperNet, the pruner and the trajectories there (a copy of the graph: the
    traced model stays where it is); `config.precision` "bf16" autocasts the SuperNet on a GPU.

    With `decode` (e.g. `vae_decoder(pipeline)`), final latents are decoded before the
    consistency loss, and gradients flow back through the decoder.
    """
    output = Path(output)
    setup_started = time.perf_counter()
    device = _device(device, config.precision)
    world = current_world()
    if world.size > 1 and device.type != "cpu":
        raise PrunerError("data-parallel optimize runs on CPUs (gloo); NCCL across GPUs is not built: run one "
                          "process with `device` cuda, or torchrun with `device` cpu", field="device")
    rows = world.shard(config.batch, "batch")
    granularity = "block" if config.granularity == "step" else config.granularity
    cost = ScheduleCost(traced, granularity)
    restart = restartable(output)  # an interrupted first checkpoint: nothing to resume, nothing of the user's
    if restart:
        resume = False
        if world.is_main:
            log.warning(f"{output} holds no complete checkpoint (an interrupted first one); starting it again")
            shutil.rmtree(output)
    if resume:
        trained = load_pruner(output, allow_unfinished=True)
        if trained.state.config != config:
            stored = asdict(trained.state.config)
            differ = [k for k, v in asdict(config).items() if stored[k] != v]
            raise PrunerError(f"{output} was optimized with other settings ({', '.join(differ)}); resume with the "
                              "same options or choose another `output`", field="output")
        state, pruner = trained.state, trained.pruner
    else:
        if not restart:
            check_output(output, "pruner", protected=[model_source], error=PrunerError,
                         exists_hint="pass `resume` to continue it or choose another `output`")
        timesteps = denoiser_timesteps(scheduler_config, config.steps, config.scheduler)
        scheduler = {"name": config.scheduler,
                     "class": type(make_scheduler(scheduler_config, config.scheduler)).__name__,
                     "steps": config.steps, "calls": len(timesteps), "timesteps": timesteps,
                     "config": dict(scheduler_config)}
        state = PrunerState(config, model_source, scheduler, cost.elements, granularity, cost.cascade_shares(),
                            decoded_with_vae=decode is not None)
        pruner = build_pruner(state)
        start_from(pruner, initial_schedule(traced, scheduler_config, config, len(timesteps), cost,
                                            model_source=model_source, null_class_label=null_class_label,
                                            decode=decode))
    elements = state.elements
    noise, conditions, guidance = calibration_inputs(traced, config, null_class_label, model_source)
    def on_device(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in tensors.items()}

    noise, conditions = noise.to(device), on_device(conditions)
    if guidance is not None:
        guidance = replace(guidance, cond=on_device(guidance.cond), uncond=on_device(guidance.uncond))
    supernet = build_supernet(traced, granularity)
    if device.type != "cpu":
        supernet = graph_on(supernet, device)  # a copy: the passes share parameters with the user's graph
    pruner = pruner.to(device)
    # SGD as DiP-GO: the gradient's scale carries each gate's FLOPs share, which Adam would normalise away.
    optimizer = torch.optim.SGD(pruner.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: 0.5 * (1 + math.cos(math.pi * min(it, config.iters) / config.iters)))
    if resume:
        checkpoint = torch.load(output / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_schedule.load_state_dict(checkpoint["lr_schedule"])

    def sampler(step_fn, batch_noise, extra):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            final = trajectory(step_fn, scheduler_config, batch_noise, config.steps, scheduler=config.scheduler,
                               extra=extra, guidance_scale=config.guidance_scale, clamp=decode is None)
            final = final if decode is None else decode(final)
        return final.float()

    with torch.no_grad():  # the full model's final images (all gates 1): the consistency targets, once for the pool
        chunks = [list(range(i, min(i + 16, len(noise)))) for i in range(0, len(noise), 16)]
        everything = torch.ones(state.scheduler["calls"], len(elements), device=device)
        targets = torch.cat([sampler(gated_step_fn(supernet, elements, everything, checkpointed=False), noise[c],
                                     condition_rows(conditions, guidance, c)) for c in chunks])
    checkpointed = not fits_without_checkpointing(supernet, (rows.stop - rows.start) * (1 if guidance is None else 2),
                                                  state.scheduler["calls"], device, world.size)
    log.info(f"activations {'recomputed in the backward pass' if checkpointed else 'kept for the backward pass'}")
    shares = torch.tensor([cost.reuse_all_share()] if config.granularity == "step"
                          else [state.cascade_shares[e] for e in elements], device=device)

    def save(first: bool = False) -> None:
        if not world.is_main:
            return
        # The first checkpoint is written in a staging folder and renamed in whole: a kill never leaves a
        # folder without one. The checkpoint carries its own copy of the state: a kill between the two
        # writes leaves the weights and the iteration count they belong to together (pruner.json is the
        # readable copy).
        with staged(output, "pruner") if first else contextlib.nullcontext(output) as folder:
            write_atomic(folder / CHECKPOINT_FILE, lambda p: torch.save(
                {"pruner": pruner.state_dict(), "optimizer": optimizer.state_dict(),
                 "lr_schedule": lr_schedule.state_dict(), "state": json.dumps(state.to_json())}, p))
            write_atomic(folder / STATE_FILE, lambda p: p.write_text(json.dumps(state.to_json(), indent=1)))

    state.setup_seconds += time.perf_counter() - setup_started
    world.barrier()  # every process has checked the output folder before process 0 creates it
    if not resume:
        save(first=True)  # a resumable folder exists from iteration 0
    params = [p for p in pruner.parameters()]
    started = time.perf_counter()
    for iteration in range(state.iterations_done, config.iters):
        index = [(iteration * config.batch + j) % config.calibration for j in range(config.batch)][rows]
        gates = pruner.gates()
        gates_full = gates.expand(-1, len(elements))  # whole-network gates: one column for all
        images = sampler(gated_step_fn(supernet, elements, gates_full, checkpointed), noise[index],
                         condition_rows(conditions, guidance, index))
        loss_consistency = consistency(images, targets[index])
        hard = tuple(tuple(bool(v) for v in row) for row in (gates_full.detach() > 0.5).tolist())
        kept = cost.kept_ratio(Schedule("hard", elements, hard, granularity))
        sparsity = (gates[1:] * shares).sum(1).mean()
        loss = loss_consistency + (config.alpha * sparsity if kept > config.keep_macs else 0.0)
        check_finite(torch.tensor(world.mean(loss.item())), f"the pruner's loss at iteration {iteration + 1}",
                     f"optimization stopped; {output} keeps its last checkpoint: lower `lr` and start again",
                     field="lr")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        world.average_gradients(params)
        optimizer.step()
        lr_schedule.step()
        state.iterations_done = iteration + 1
        record = {"iteration": iteration + 1, "consistency": world.mean(loss_consistency.item()),
                  "sparsity": sparsity.item(),
                  "kept": kept, "lr": optimizer.param_groups[0]["lr"]}
        state.history.append(record)
        state.seconds += time.perf_counter() - started
        started = time.perf_counter()
        if torch.cuda.is_available() and noise.is_cuda:
            state.peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            state.peak_memory_mb = _peak_rss_mb()
        if state.iterations_done % config.checkpoint_every == 0 or state.complete:
            save()
        if on_iteration is not None:
            on_iteration(record)
    world.barrier()  # process 0's last checkpoint is on disk before any process returns
    return TrainedPruner(state, pruner.cpu())


def _device(name: str, precision: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise PrunerError(f"`device` {name} is not a torch device ({exc}); use cpu or cuda", field="device") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PrunerError(f"`device` {name}: this machine has no CUDA GPU torch can use; use `device` cpu",
                          field="device")
    if precision == "bf16" and device.type != "cuda":
        raise PrunerError("`precision` bf16 runs on a GPU; pass `device` cuda, or `precision` fp32 on the CPU",
                          field=("precision", "device"))
    return device


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
