"""Every option's type and range, in one table used by the command line and by `compile --config`.

A value is checked before anything uses it: TOML values by type (`overwrite = "false"` is an
error, not true; a bool is not a number), numbers for finiteness (NaN and inf never pass), and
every number against its range, upper bounds included, so an absurd size is refused in one line
instead of allocating. The message names the setting as the user wrote it: `[prune] channel_ratio`
(or `steps` at the top level) in a config file, else the field (`channel_ratio`), which the command
line renders as its option (`--channel-ratio`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dgo_compile.core.errors import DgoError

SEED_MAX = 2**63 - 1
ARTIFACT_PRECISIONS = ("fp32", "fp16")  # see dgo_compile.backend.precision
OPTIMIZE_PRECISIONS = ("fp32", "bf16")  # the SuperNet's autocast
OPTIMIZE_INITS = ("full", "steps", "steps-searched")  # where the gates start (dgo_compile.search.warm_start)
SCHEDULER_NAMES = ("ddim", "ddpm", "pndm", "heun", "euler", "dpm")


class OptionError(DgoError):
    """An option (on the command line or in a config file) of the wrong type or out of range."""


@dataclass(frozen=True)
class Spec:
    kind: str  # "int", "float", "bool", "str", "ints" (a list of integers)
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # (low, ... rather than [low, ...
    high_open: bool = False
    optional: bool = False  # None is allowed (an option left out)
    choices: tuple[str, ...] | None = None
    what: str = ""  # what the value means, for the message

    def problem(self, value: Any) -> str | None:
        """None when `value` is valid, else what is wrong with it (the part after 'must be')."""
        if value is None:
            return None if self.optional else "given"
        if self.kind == "bool":
            return None if isinstance(value, bool) else "true or false"
        if self.kind == "str":
            if not isinstance(value, str):
                return "a string"
            if self.choices and value not in self.choices:
                return f"one of {', '.join(self.choices)}"
            return None
        if self.kind == "ints":
            if not isinstance(value, (list, tuple)) or not value:
                return "a non-empty list of integers"
            return next((p for p in map(Spec("int", self.low, self.high).problem, value) if p), None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (self.kind == "int" and not isinstance(value, int)):
            return "an integer" if self.kind == "int" else "a number"
        if not math.isfinite(value):
            return "a finite number"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if not (below or above):
            return None
        what = f" ({self.what})" if self.what else ""
        if self.high is not None and self.low is not None and self.high <= 100:  # a natural range: say it whole
            return (f"in {'(' if self.low_open else '['}{_num(self.low)}, "
                    f"{_num(self.high)}{')' if self.high_open else ']'}"
                    f"{what}")
        if above:  # the upper bound only stops absurd values
            return f"at most {_num(self.high)}{what}"
        return ("positive" if self.low_open and self.low == 0 else "0 or more" if self.low == 0
                else f"at least {_num(self.low)}") + what


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() and abs(x) >= 1e4 else f"{x:g}"


def _int(low, high, what=""):
    return Spec("int", low, high, what=what)


def _float(low, high, *, low_open=False, high_open=False, optional=False, what=""):
    return Spec("float", low, high, low_open, high_open, optional, what=what)


def _choice(*choices, optional=False):
    return Spec("str", optional=optional, choices=choices)


SEED = _int(0, SEED_MAX)
GUIDANCE = _float(0, 100, optional=True)
SAMPLER_STEPS = _int(1, 1000)
KEPT = _float(0, 1, low_open=True, what="the kept share of the full model's MACs")
SCHEDULER = _choice(*SCHEDULER_NAMES, optional=True)
SIZE = Spec("int", 1, 16384, optional=True, what="pixels with a vae/, else latent")  # architecture rules: resolution.py

SPECS: dict[str, dict[str, Spec]] = {
    "top level": {
        "model": Spec("str", optional=True), "output": Spec("str"), "schedule": Spec("str"),
        "steps": SAMPLER_STEPS, "scheduler": SCHEDULER, "granularity": _choice("block", "unit"),
        "guidance_scale": GUIDANCE, "overwrite": Spec("bool"), "verify_samples": _int(1, 4096), "seed": SEED,
        "precision": _choice(*ARTIFACT_PRECISIONS, optional=True), "height": SIZE, "width": SIZE,
    },
    "prune": {
        "channel_ratio": _float(0, 1, high_open=True, what="the share of channels removed"),
        "importance": _choice("taylor", "magnitude", "random"), "scope": _choice("uniform", "global"),
        "threshold": _float(0, 1, low_open=True, high_open=True), "batch": _int(1, 4096),
        "max_timesteps": _int(1, 100_000), "seed": SEED, "min_group_channels": _int(1, 4096),
        "groupnorm_cut": _choice("channels", "groups"),
    },
    "finetune": {
        "train_steps": _int(1, 10**7), "batch": _int(1, 65536), "lr": _float(0, 1e6, low_open=True),
        "ema_decay": _float(0, 1, high_open=True, what="0 saves the raw weights"),
        "distill": _float(0, 1e6), "warmup": _int(0, 10**7), "seed": SEED, "checkpoint_every": _int(1, 10**7),
        "distill_only": Spec("bool"), "trajectory_steps": _int(1, 1000),
        "student_rollouts": _float(0, 1, what="the share of trajectories the student runs"),
        "data": Spec("str", optional=True),
        "prompts": Spec("str", optional=True),
        "snr_gamma": _float(0, 1e6, low_open=True, optional=True, what="the SNR cap of Min-SNR weighting"),
        "timestep_sampling": _choice("uniform", "logit_normal"), "logit_mean": _float(-20, 20),
        "logit_std": _float(0, 20, low_open=True), "feature_distill": _float(0, 1e6),
    },
    "optimize": {
        "keep_macs": KEPT, "steps": SAMPLER_STEPS, "scheduler": SCHEDULER, "iters": _int(1, 10**7),
        "batch": _int(1, 4096), "calibration": _int(1, 65536), "lr": _float(0, 1e6, low_open=True),
        "momentum": _float(0, 1, high_open=True), "weight_decay": _float(0, 1e6), "alpha": _float(0, 1e6),
        "init": _choice(*OPTIMIZE_INITS), "granularity": _choice("block", "unit", "step"),
        "dim": _int(1, 8192), "layers": _int(1, 256),
        "timestep_conditioning": Spec("bool"), "seed": SEED, "checkpoint_every": _int(1, 10**7),
        "class_labels": Spec("ints", 0, 10**6, optional=True), "prompt_embeds": Spec("str", optional=True),
        "prompts": Spec("str", optional=True), "guidance_scale": GUIDANCE, "precision": _choice(*OPTIMIZE_PRECISIONS),
    },
    # Command-line options that no config table holds.
    "sample": {"n": _int(1, 4096), "seed": SEED, "steps": Spec("int", 1, 1000, optional=True),
               "guidance_scale": GUIDANCE, "class_label": Spec("ints", 0, 10**6, optional=True),
               "height": SIZE, "width": SIZE},
    "inspect": {"batch": _int(1, 4096), "height": SIZE, "width": SIZE},
    "bench": {"batch": _int(1, 4096), "repeats": _int(1, 1000)},
    "schedule": {"keep_macs": KEPT},
}


def check(table: str, values: dict[str, Any], *, config: bool = False, error: type[DgoError] = OptionError,
          skip_none: bool = True) -> None:
    """Raise `error` naming the first value of `values` that its spec in `table` refuses. Keys without a
    spec are left to the caller (unknown keys are reported with the list of known ones there)."""
    specs = SPECS[table]
    for key, value in values.items():
        spec = specs.get(key)
        if spec is None or (value is None and skip_none):
            continue
        problem = spec.problem(value)
        if problem is not None:
            raise error(f"{name(table, key, config)} must be {problem}, got {_show(value, config)}",
                        field=None if config else key)


def name(table: str, key: str, config: bool) -> str:
    """A setting as a config file names it (`config`), else as a field (the CLI renders it as its option)."""
    if not config:
        return f"`{key}`"
    return key if table == "top level" else f"[{table}] {key}"


def _show(value: Any, config: bool) -> str:
    if isinstance(value, str):
        return f'"{value}"' if config else repr(value)
    if isinstance(value, bool) and config:
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v, config) for v in value) + "]"
    return repr(value) if not isinstance(value, float) else str(value)
