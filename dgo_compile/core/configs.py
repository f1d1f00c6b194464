"""The settings of each stage (`prune`, `finetune`, `optimize`) and where models come from by default.

Kept free of torch, diffusers and onnx so that the command line and `compile --config` check every
setting before anything heavy is imported; the stage modules re-export these names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from dgo_compile.core.errors import DgoError
from dgo_compile.core.options import check

DEFAULT_MODEL = Path(__file__).parents[1] / "assets" / "mnist_ddpm"
# The same digits UNet with a class embedding and a null class (10) for classifier-free guidance.
CLASS_CONDITIONAL_MODEL = Path(__file__).parents[1] / "assets" / "mnist_ddpm_cond"
DEFAULT_STEPS = 50  # sampler steps, wherever a command or config leaves them out
GRANULARITIES = ("block", "unit", "step")  # step: one gate per call for all blocks (whole-network reuse)


# Fields renamed so that no two tables use one name for opposite things: the old name gets an error
# naming the new one in a config file, and is read as the new one from a stored run (pruner.json, finetune.json).
RENAMED = {"prune": {"ratio": "channel_ratio"}, "optimize": {"ratio": "keep_macs"},
           "finetune": {"steps": "train_steps"}}
MEANING = {"channel_ratio": "the share of channels removed", "keep_macs": "the kept share of the full model's MACs",
           "train_steps": "optimizer steps, not sampler steps"}


def renamed_problem(table: str, keys, where: str = "") -> str | None:
    """The one-line message for an old field name among `keys` of `table` (`where` prefixes the name)."""
    old = next((k for k in keys if k in RENAMED.get(table, {})), None)
    if old is None:
        return None
    new = RENAMED[table][old]
    return f"{where}{old} was renamed {where}{new} ({MEANING[new]})"


def _stored(table: str, data: dict) -> dict:
    """A stored config with its old field names read as the new ones."""
    renames = RENAMED[table]
    return {renames[k] if k in renames and renames[k] not in data else k: v for k, v in data.items()}


IMPORTANCES = ("taylor", "magnitude", "random")
SCOPES = ("uniform", "global")


class PruneError(DgoError):
    """Channel pruning cannot be done as asked."""


@dataclass(frozen=True)
class PruneConfig:
    channel_ratio: float = 0.3  # share of each group's channels removed (uniform), or of all prunable channels (global)
    importance: str = "taylor"
    scope: str = "uniform"
    threshold: float = 0.05  # Diff-Pruning's stop: loss below threshold x running max (0.05 for CIFAR-10)
    batch: int = 32  # the fixed batch the Taylor gradients are taken on
    max_timesteps: int = 1000
    seed: int = 0
    # GroupNorm groups keep at least this many channels (or all they had). One channel per group is an
    # instance norm: it discards every channel's spatial mean, so the model can no longer predict the
    # noise's per-image mean, and DDIM integrates that error into images that drift (measured:
    # benchmarks/results/channel_pruning.md).
    min_group_channels: int = 2
    # "channels": every GroupNorm group loses the same share of its channels (Diff-Pruning, Torch-Pruning);
    # "groups": whole GroupNorm groups go and the kept ones keep every channel and their statistics, so
    # GroupNorms of few channels per group (2 on the shipped model) can be cut below min_group_channels' floor.
    groupnorm_cut: str = "channels"

    def __post_init__(self) -> None:
        check("prune", {f.name: getattr(self, f.name) for f in fields(self)}, error=PruneError, skip_none=False)
        if not 0 <= self.channel_ratio < 1:
            raise PruneError(f"`channel_ratio` must be in [0, 1) (the share of channels removed), got "
                             f"{self.channel_ratio}", field="channel_ratio")
        if self.importance not in IMPORTANCES:
            raise PruneError(f"`importance` must be one of {', '.join(IMPORTANCES)}, got '{self.importance}'",
                             field="importance")
        if self.scope not in SCOPES:
            raise PruneError(f"`scope` must be one of {', '.join(SCOPES)}, got '{self.scope}'", field="scope")
        if not 0 < self.threshold < 1:
            raise PruneError(f"`threshold` must be in (0, 1), got {self.threshold}", field="threshold")
        for name in ("batch", "max_timesteps", "min_group_channels"):
            if getattr(self, name) < 1:
                raise PruneError(f"`{name}` must be at least 1, got {getattr(self, name)}", field=name)


class FinetuneError(DgoError):
    """Bad fine-tuning settings, a model the shipped data cannot train, or a folder that is not a fine-tuning run."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that determines a fine-tuning run besides its models; stored and checked on `--resume`."""

    train_steps: int = 500  # optimizer steps (not sampler steps)
    batch: int = 32
    lr: float = 2e-4  # AdamW
    ema_decay: float = 0.999  # 0: no EMA, the raw weights are saved
    distill: float = 0.0  # weight of the distillation term (needs a teacher)
    warmup: int = 0  # linear learning-rate warmup steps
    seed: int = 0
    checkpoint_every: int = 100
    distill_only: bool = False  # no data: the teacher's DDIM trajectories are the inputs, its predictions the targets
    trajectory_steps: int = 20  # DDIM steps of those trajectories (the timesteps the student is trained at)
    # share of those trajectories the student runs itself, the teacher predicting at its states (on-policy)
    student_rollouts: float = 0.0
    data: str | None = None  # the user's folder of images or latents (data_folder); None: the shipped digits
    prompts: str | None = None  # --distill-only on a text-conditional teacher: one prompt per line
    snr_gamma: float | None = None  # Min-SNR-gamma loss weights (diffusers' --snr_gamma); None: every timestep weighs 1
    timestep_sampling: str = "uniform"  # data batches' timesteps; "logit_normal": SD3's sigmoid(N(mean, std))
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # weight of the block-output term on the pruned model's kept channels (feature_distill), beside `distill`'s
    feature_distill: float = 0.0

    def __post_init__(self) -> None:
        check("finetune", {f.name: getattr(self, f.name) for f in fields(self)}, error=FinetuneError, skip_none=False)
        for name in ("train_steps", "batch", "checkpoint_every", "trajectory_steps"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"`{name}` must be at least 1, got {getattr(self, name)}", field=name)
        if self.warmup < 0:
            raise FinetuneError(f"`warmup` must be 0 or more, got {self.warmup}", field="warmup")
        if not self.lr > 0:
            raise FinetuneError(f"`lr` must be positive, got {self.lr}", field="lr")
        if not 0 <= self.ema_decay < 1:
            raise FinetuneError(f"`ema_decay` must be in [0, 1) (0 saves the raw weights), got {self.ema_decay}",
                                field="ema_decay")
        if not self.distill >= 0:
            raise FinetuneError(f"`distill` must be 0 or more, got {self.distill}", field="distill")
        if self.data is not None and self.distill_only:
            raise FinetuneError("`data` and `distill_only` exclude each other: `distill_only` trains on the "
                                "teacher's trajectories instead of data", field=("data", "distill_only"))
        if self.distill_only and self.timestep_sampling != "uniform":
            raise FinetuneError(f"`timestep_sampling` {self.timestep_sampling} draws the timesteps of data batches; "
                                "`distill_only` trains on every state of the teacher's trajectories: leave it "
                                "\"uniform\"", field=("timestep_sampling", "distill_only"))
        if self.student_rollouts and not self.distill_only:
            raise FinetuneError("`student_rollouts` is the share of `distill_only`'s trajectories that the student "
                                "runs: set `distill_only` or leave `student_rollouts` out",
                                field=("student_rollouts", "distill_only"))
        if self.feature_distill and not (self.distill_only or self.distill):
            raise FinetuneError("`feature_distill` matches each block's output to a teacher's: set `distill` W > 0 "
                                "(with data) or `distill_only`, with `teacher`",
                                field=("feature_distill", "distill", "distill_only", "teacher"))
        if self.prompts is not None and not self.distill_only:
            raise FinetuneError("`prompts` is read by `distill_only` (with `data`, captions come from its "
                                "metadata.jsonl): set `distill_only` or leave `prompts` out",
                                field=("prompts", "data", "distill_only"))

    @classmethod
    def from_json(cls, data: dict) -> "FinetuneConfig":
        known, data = {f.name for f in fields(cls)}, _stored("finetune", data)
        return cls(**{k: v for k, v in data.items() if k in known})


class PrunerError(DgoError):
    """Bad optimization settings, or a pruner folder that is missing, unfinished or of another format."""




@dataclass(frozen=True)
class OptimizeConfig:
    """Everything that determines a trained pruner; stored in it and checked on `--resume`."""

    keep_macs: float = 0.25  # kept-MACs target: the sparsity term is off at or below it
    steps: int = DEFAULT_STEPS
    scheduler: str | None = None
    iters: int = 50  # from the searched K-step start (`init`); DiP-GO's start needs 150 (results/warm_start.md)
    batch: int = 2
    calibration: int = 32  # noise seeds (and conditions) cycled through by the iterations
    # DiP-GO uses 0.1 over 1000 iterations; over 150 of ours that saturates every gate (benchmarks/results/pruner.md).
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 1e-4
    alpha: float = 1.0  # weight of the sparsity term
    # The gates at iteration 0: "full" (DiP-GO: every gate keeps), "steps" (`steps:K`, the largest K within
    # `keep_macs`) or "steps-searched" (the searched K-step schedule at that K): dgo_compile.search.warm_start.
    init: str = "steps-searched"
    granularity: str = "block"
    dim: int = 128
    layers: int = 2
    timestep_conditioning: bool = True
    seed: int = 0
    checkpoint_every: int = 10
    class_labels: tuple[int, ...] | None = None
    prompt_embeds: str | None = None
    prompts: str | None = None  # text file, encoded by the pipeline's own text encoder
    guidance_scale: float | None = None
    # Autocast precision of the SuperNet's forward (and recomputed backward) passes; the pruner, the
    # loss and the scheduler's arithmetic stay float32. bf16 needs a GPU (`device`).
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check("optimize", {f.name: getattr(self, f.name) for f in fields(self)}, error=PrunerError, skip_none=False)
        if not 0 < self.keep_macs <= 1:
            raise PrunerError(f"`keep_macs` must be in (0, 1] (the kept share of the full model's MACs), got "
                              f"{self.keep_macs}", field="keep_macs")
        if self.granularity not in GRANULARITIES:
            raise PrunerError(f"`granularity` must be one of {', '.join(GRANULARITIES)}, got '{self.granularity}'",
                              field="granularity")
        for name in ("steps", "iters", "batch", "calibration", "dim", "layers", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise PrunerError(f"`{name}` must be at least 1, got {getattr(self, name)}", field=name)
        if self.lr <= 0:
            raise PrunerError(f"`lr` must be positive, got {self.lr}", field="lr")

    @classmethod
    def from_json(cls, data: dict) -> "OptimizeConfig":
        known, data = {f.name for f in fields(cls)}, _stored("optimize", data)
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("init", "full")  # pruners stored before `init` existed started as DiP-GO's
        if values.get("class_labels") is not None:
            values["class_labels"] = tuple(values["class_labels"])
        return cls(**values)


def with_overrides(cls, given: dict, stored=None):
    """The settings of a run: `stored` (a resumed run's config) or `cls`'s defaults, with the values in
    `given` that are not None winning. Every value is checked by `cls`."""
    given = {k: v for k, v in given.items() if v is not None}
    return replace(stored, **given) if stored is not None else cls(**given)
