"""One command from model to artifact: the whole compile pipeline from a TOML config, with a report.

Stages, in order (each feeds the next; stages without a table in the config are skipped), each
reported to a `dgo_compile.core.progress.Stages` with what it does and how far along it is:
  load       the original model, traced (the reference for quality and speed)
  prune      [prune] Diff-Pruning channel pruning         -> <work>/pruned (pruning traces the result)
  finetune   [finetune] fine-tune the pruned model        -> <work>/finetuned
  trace      the fine-tuned model, or a pruned one reused from <work>, traced into its blocks (without
             [prune] the original is compiled)
  schedule   a named one (`full`, `deepcache:N`, `steps:K`, a JSON file), or with "learned":
  optimize   [optimize] DiP-GO's pruner on the (pruned) model, then the schedule at optimize.keep_macs
  compile    fold + export the ONNX artifact (written to a temp folder, then renamed)
  verify     the artifact against the PyTorch graphs it came from and the original model, same noise
  bench      the artifact against the original's `full` artifact, interleaved rounds (dgo_compile.backend.bench);
             that artifact is kept in <work>/original and reused while the model and sampler settings match
  report     report.md / report.json / schedule heatmap / sample grid
Intermediate models live in `<output>.work/`; a rerun reuses one only when its `stage.json` holds the
same resolved settings and inputs (`dgo_compile.driver.stages`), and rebuilds it otherwise, saying why.
Everything is checked (options, the output folder, the schedule's syntax) before torch is imported or
the model loaded. The resolved config is written into the artifact (`dgo_config.json`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import tomllib

from dgo_compile.core.configs import (
    DEFAULT_MODEL,
    DEFAULT_STEPS,
    FinetuneConfig,
    OptimizeConfig,
    PruneConfig,
    renamed_problem,
)
from dgo_compile.core.errors import DgoError
from dgo_compile.core.options import check
from dgo_compile.core.outputs import check_output, exclusive, staged
from dgo_compile.core.progress import Stages, Step
from dgo_compile.schedules.schedule import check_spec

CONFIG_FILE = "dgo_config.json"
# The report's noise: held out from the optimizer's calibration (its seed, 0 by default) and from
# `dgo-compile schedule`'s (30000); benchmarks/pruner.py evaluates on it too.
VERIFY_SEED = 20_000
TOP_LEVEL = ("model", "output", "schedule", "steps", "scheduler", "granularity", "guidance_scale", "overwrite",
             "precision", "verify_samples", "seed", "height", "width")


class ConfigError(DgoError):
    """The compile config file is unreadable or names an unknown key."""


@dataclass(frozen=True)
class CompileConfig:
    model: str | None = None
    output: str = "artifact"
    schedule: str = "full"  # or "learned" (needs [optimize])
    steps: int = DEFAULT_STEPS
    scheduler: str | None = None
    granularity: str = "block"
    guidance_scale: float | None = None
    overwrite: bool = False
    precision: str = "fp32"  # or "fp16": see dgo_compile.backend.precision
    verify_samples: int = 16  # images sampled from the artifact and the reference for the report
    seed: int = VERIFY_SEED  # the report's noise
    height: int | None = None  # pixels for a pipeline with a vae/, else latent; None: the config's sample_size
    width: int | None = None
    prune: PruneConfig | None = None
    finetune: FinetuneConfig | None = None
    optimize: OptimizeConfig | None = None

    def __post_init__(self) -> None:
        check("top level", {f.name: getattr(self, f.name) for f in fields(self) if f.name in TOP_LEVEL}, config=True,
              error=ConfigError, skip_none=False)
        if self.schedule == "learned" and self.optimize is None:
            raise ConfigError("schedule = \"learned\" needs an [optimize] table (keep_macs, iters, ...)")
        if self.schedule == "learned" and self.seed == self.optimize.seed:
            raise ConfigError(f"seed = {self.seed} is [optimize] seed, the noise the learned schedule is trained on, "
                              f"so the report would score it on its own calibration; set seed to another value "
                              f"(default {VERIFY_SEED})")
        if self.verify_samples < 1:
            raise ConfigError(f"verify_samples must be at least 1, got {self.verify_samples}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _table(cls, data: dict, name: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"[{name}] has unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**data)


def _beside(folder: Path, values: dict[str, Any]) -> dict[str, Any]:
    """The file's relative paths (model, output, a schedule JSON) taken from the file's folder, as a
    config file is read wherever it is run from; the command line's stay relative to the working folder."""
    paths = {k: values[k] for k in ("model", "output") if isinstance(values.get(k), str)}
    if isinstance(values.get("schedule"), str) and values["schedule"].endswith(".json"):
        paths["schedule"] = values["schedule"]
    return {k: str(folder / v) for k, v in paths.items() if not Path(v).is_absolute()}


def read_config(path: str | Path | None, overrides: dict[str, Any]) -> CompileConfig:
    """The config file's values, with `overrides` (the options given on the command line) winning."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read the config {path}: {exc}") from exc
    tables = {"prune": PruneConfig, "finetune": FinetuneConfig, "optimize": OptimizeConfig}
    unknown = sorted(k for k in data if k not in TOP_LEVEL and k not in tables)
    if unknown:
        raise ConfigError(f"{path} has unknown key(s) {', '.join(unknown)}; known: "
                          f"{', '.join(TOP_LEVEL + tuple(tables))}")
    values = {k: v for k, v in data.items() if k in TOP_LEVEL}
    check("top level", values, config=True, error=ConfigError)
    values.update(_beside(Path(path).parent, values) if path is not None else {})
    given = {k: v for k, v in overrides.items() if v is not None}
    check("top level", given, error=ConfigError)  # the command line's, named as options
    values.update(given)
    for name, cls in tables.items():
        if name in data:
            if not isinstance(data[name], dict):
                raise ConfigError(f"{name} must be a table ([{name}] with its keys), got {data[name]!r}")
            table = dict(data[name])
            problem = renamed_problem(name, table, f"[{name}] ")
            if problem:
                raise ConfigError(problem)
            check(name, table, config=True, error=ConfigError)
            if name == "optimize":  # the sampler is the compile's: one place says it
                table.setdefault("steps", values.get("steps", DEFAULT_STEPS))
                table.setdefault("scheduler", values.get("scheduler"))
                table.setdefault("guidance_scale", values.get("guidance_scale"))
                if "class_labels" in table:
                    table["class_labels"] = tuple(table["class_labels"])
            values[name] = _table(cls, table, name)
    return _table(CompileConfig, values, "top level")


@dataclass
class CompileOutcome:
    artifact: Path
    report: dict[str, Any]


def run_pipeline(config: CompileConfig, stages: Stages | None = None) -> CompileOutcome:
    """Run every stage of `config` (see the module docstring); `stages` is told what each stage does and
    how far along it is (dgo_compile.core.progress; the default shows nothing)."""
    from dgo_compile.backend.artifact_files import ArtifactError

    output = check_output(config.output, "artifact", overwrite=config.overwrite,
                          protected=[config.model or DEFAULT_MODEL], error=ArtifactError)
    check_spec(config.schedule, learned=True)  # a bad schedule fails before the model loads
    work = output.with_name(output.name + ".work")
    with exclusive(work):  # concurrent runs on one -o share the work folder: the second stops here
        return _run(config, output, work, stages or Stages())


def _run(config: CompileConfig, output: Path, work: Path, stages: Stages) -> CompileOutcome:
    from dgo_compile import load, trace
    from dgo_compile.backend.artifact import compile_artifact
    from dgo_compile.driver.report import measure, write_report
    from dgo_compile.driver.stages import finetuned, original_full, pruned
    from dgo_compile.frontend.resolution import resolve

    report: dict[str, Any] = {"config": config.to_json()}
    if config.finetune is not None and config.prune is None:
        raise ConfigError("[finetune] without [prune] would fine-tune the unpruned model: add [prune] or drop it")
    with stages.stage("load", f"loading and tracing {config.model or 'the shipped model'}"):
        original = load(config.model)
        original.require_scheduler()
        resolution = resolve(original.model, original.source, config.height, config.width)
        # checked against eager only where it is also the model compiled (no [prune])
        original_traced = trace(original, verify=config.prune is None, size=resolution.latent)
    config = replace(config, height=resolution.height, width=resolution.width)  # the resolved config records it
    report.update(config=config.to_json(), resolution=resolution.to_json())
    model_path, loaded, traced = config.model, original, original_traced
    if config.prune is not None:
        with stages.stage("prune",
                          f"channel pruning, channel_ratio {config.prune.channel_ratio} ({config.prune.importance})"):
            model_path = work / "pruned"
            fresh = pruned(original, config.prune, model_path, original_traced)
            if fresh is not None and config.finetune is None:  # pruning traced what it saved: no trace stage
                loaded, traced = replace(load(model_path), model=fresh.model), fresh.traced
    if config.finetune is not None:
        teacher = original.source if config.finetune.distill or config.finetune.distill_only else None
        with stages.stage("finetune", f"fine-tuning the pruned model, batch {config.finetune.batch}",
                          total=config.finetune.train_steps) as step:
            model_path = finetuned(model_path, config.finetune, work / "finetuned", teacher,
                                   on_step=lambda entry: step.update(entry["step"], note=f"loss {entry['loss']:.4f}"))
    if model_path != config.model and traced is original_traced:
        with stages.stage("trace", f"loading and tracing the {'fine-tuned' if config.finetune else 'pruned'} model"):
            loaded = load(model_path)
            traced = trace(loaded, size=resolution.latent)
    report["built"] = _built(model_path, config)
    if config.schedule == "learned":
        what, total = f"DiP-GO pruner, {config.optimize.iters} iterations towards {config.optimize.keep_macs:g}", \
            config.optimize.iters
    else:
        what, total = f"building {config.schedule} over {config.steps} steps", None
    with stages.stage("optimize" if config.schedule == "learned" else "schedule", what, total) as step:
        schedule, heatmap_source = _schedule(config, traced, loaded, work, model_path or loaded.source,
                                             resolution.latent, step)
    # unique per run: concurrent or killed runs never share it; published when the report is written
    with staged(output, "artifact", overwrite=config.overwrite, fresh_path=True) as tmp:
        with stages.stage("compile", f"folding {schedule.name} and exporting its graphs to ONNX") as step:
            compile_artifact(traced, schedule, loaded.scheduler_config, tmp, model_source=str(loaded.source.resolve()),
                             scheduler=config.scheduler, sampler_steps=config.steps,
                             guidance_scale=config.guidance_scale, precision=config.precision,
                             on_variant=lambda done, total: step.update(done, total=total))
        with stages.stage("verify", f"sampling {config.verify_samples} images each from the artifact, its PyTorch "
                                    "graphs and the original model", total=3 * config.verify_samples * schedule.calls) \
                as step:
            report.update(_verify(config, tmp, traced, loaded, original, original_traced, schedule, step.advance))
        from dgo_compile.driver.report import ROUNDS

        with stages.stage("bench", f"timing the artifact against the original's full artifact, {ROUNDS} "
                                   "interleaved rounds", total=2 * (ROUNDS + 1)) as step:
            full = original_full(original_traced, original.scheduler_config,
                                 {"scheduler": config.scheduler, "steps": config.steps, "precision": config.precision,
                                  "calls": schedule.calls, "latent_size": list(resolution.latent)},
                                 original.source, work / "original")
            report["measured"] = measure(tmp, full, on_run=step.advance)
        report["timings_s"] = dict(stages.seconds)
        with stages.stage("report", "writing report.md, report.json, samples.png and schedule.png"):
            write_report(tmp, report, schedule, heatmap_source, loaded)
            (tmp / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=1, default=str))
    return CompileOutcome(output, report)


def _built(model_path, config: CompileConfig) -> dict[str, Any]:
    """What the compiled model is, from the stamps of the stage folders it was actually built in."""
    from dgo_compile.driver.stages import describe

    if model_path == config.model:
        return {"model": str(config.model or DEFAULT_MODEL)}
    folder = Path(model_path)
    built = {"model": str(folder)}
    if config.finetune is not None:
        built["finetune"] = describe(folder)
        folder = folder.parent / "pruned"
    built["prune"] = describe(folder)
    return built


def _schedule(config: CompileConfig, traced, loaded, work: Path, model_path, latent: tuple[int, int], step: Step):
    from dgo_compile.driver.stages import prepare_pruner, pruner_stamp, read_stamp, write_stamp
    from dgo_compile.schedules.schedule_cost import ScheduleCost, extract_schedule
    from dgo_compile.search.calibration import vae_decoder
    from dgo_compile.search.pruner import load_pruner, optimize

    if config.schedule == "learned":
        folder = work / "pruner"
        expected = pruner_stamp(config.optimize, model_path, latent)
        reusable = prepare_pruner(folder, expected)  # a pruner trained for other settings is discarded

        def stamp(record=None) -> None:
            if folder.is_dir() and read_stamp(folder) != expected:
                write_stamp(folder, expected)
            if record is not None:
                step.update(record["iteration"], note=f"kept MACs {record['kept']:.1%}")

        done = reusable and load_pruner(folder, allow_unfinished=True).state.complete
        trained = load_pruner(folder) if done else optimize(
            traced, loaded.scheduler_config, config.optimize, folder, model_source=str(loaded.source.resolve()),
            null_class_label=traced.family.null_class_label(loaded.model), resume=folder.exists(),
            decode=vae_decoder(loaded.source) if loaded.source.is_dir() else None, on_iteration=stamp)
        stamp()
        cost = ScheduleCost(traced, trained.state.schedule_granularity)
        plan, _ = extract_schedule(trained.reuse_margins(), cost, config.optimize.keep_macs,
                                   f"dipgo:{config.optimize.keep_macs:g}", trained.whole_calls)
        return plan, trained
    return resolve_schedule(config, traced, loaded), None


def _verify(config: CompileConfig, artifact: Path, traced, loaded, original, original_traced, schedule,
            progress: Callable[[int], None]) -> dict[str, Any]:
    """Artifact vs its own PyTorch graphs (parity), and vs the unpruned full model (quality)."""
    from dgo_compile.backend.artifact import read_manifest
    from dgo_compile.backend.folding import fold
    from dgo_compile.backend.ort_runner import OrtArtifact
    from dgo_compile.backend.sampling import conditions_for, denoiser_timesteps, initial_noise, sample
    from dgo_compile.core.finite import check_finite
    from dgo_compile.core.metrics import psnr, ssim
    from dgo_compile.schedules.cost import cost_report

    manifest = read_manifest(artifact)
    shape = tuple(traced.example_inputs(1)["sample"].shape[1:])
    noise = initial_noise(config.verify_samples, shape, config.seed)
    labels = list(range(10)) if "class_labels" in traced.input_names else None  # cycled over the samples
    conditions, guidance = conditions_for(traced.input_names, config.verify_samples, labels, None,
                                          config.guidance_scale, traced.family.null_class_label(loaded.model))
    run = dict(scheduler=config.scheduler, conditions=conditions, guidance=guidance, seed=config.seed,
               progress=progress)
    timesteps = denoiser_timesteps(loaded.scheduler_config, config.steps, config.scheduler)
    ours = sample(OrtArtifact.open(artifact), loaded.scheduler_config, noise, config.steps, **run)
    torch_graphs = sample(fold(traced, schedule, timesteps), loaded.scheduler_config, noise, config.steps, **run)
    reference = sample(original_traced, original.scheduler_config, noise, config.steps, **run)
    for images, what in ((ours, "the artifact"), (torch_graphs, "its PyTorch graphs"),
                         (reference, "the original model")):
        check_finite(images, f"the verification image batch sampled from {what}", "nothing was written to `output`",
                     field="output")
    original_macs = cost_report(original_traced).total
    pruned_cost = cost_report(traced).total
    parity = float((ours - torch_graphs).norm() / torch_graphs.norm().clamp_min(1e-12))
    macs = manifest.macs
    full_run = original_macs.macs * len(timesteps)
    return {
        "params": {"original": original_macs.params, "compiled": pruned_cost.params},
        "macs": {"original_per_call": original_macs.macs, "compiled_per_call_full": pruned_cost.macs,
                 "per_call": list(macs.per_call), "per_run": macs.total, "original_per_run": full_run,
                 "kept": macs.total / full_run},
        "predicted_speedup": full_run / macs.total,
        "parity_rel_l2": parity,
        "quality": {"samples": config.verify_samples,
                    "psnr_vs_original": float(psnr(ours, reference).clamp(max=100).mean()),
                    "ssim_vs_original": float(ssim(ours, reference).mean())},
        "images": ours,
        "reference_images": reference,
    }


@dataclass
class ScheduleOutcome:
    artifact: Path
    manifest: Any  # dgo_compile.backend.manifest.Manifest
    resolution: Any  # dgo_compile.frontend.resolution.Resolution
    steps: int
    precision: str


def compile_schedule(config: CompileConfig, dump_dir: str | Path | None = None,
                     on_compile: Callable[[str], Any] | None = None) -> ScheduleOutcome:
    """`compile` without a config file: fold one schedule into an artifact. The config, the outputs and
    the schedule are checked before torch is imported; `on_compile(what)` may return a context manager
    (a status line) held while the graphs are exported."""
    import contextlib

    if config.schedule == "learned":
        raise ConfigError('schedule = "learned" needs a config file with an [optimize] table')
    output = check_output(config.output, "artifact", overwrite=config.overwrite,
                          protected=[config.model or DEFAULT_MODEL])
    if dump_dir is not None:
        check_output(dump_dir, "into", field="dump_dir", protected=[config.model or DEFAULT_MODEL, output])
    check_spec(config.schedule)  # an unknown name or an unreadable file fails before the model loads

    from dgo_compile import load, trace
    from dgo_compile.backend.artifact import compile_artifact, read_manifest
    from dgo_compile.frontend.resolution import resolve

    loaded = load(config.model)
    loaded.require_scheduler()
    resolution = resolve(loaded.model, loaded.source, config.height, config.width)
    traced = trace(loaded, size=resolution.latent)
    plan = resolve_schedule(config, traced, loaded)
    status = on_compile(f"compiling {plan.name} ({plan.calls} denoiser calls)") if on_compile else None
    with status or contextlib.nullcontext():
        path = compile_artifact(traced, plan, loaded.scheduler_config, output, overwrite=config.overwrite,
                                model_source=str(loaded.source.resolve()), scheduler=config.scheduler,
                                sampler_steps=config.steps, guidance_scale=config.guidance_scale, dump_dir=dump_dir,
                                precision=config.precision)
    return ScheduleOutcome(path, read_manifest(path), resolution, config.steps, config.precision)


def resolve_schedule(config: CompileConfig, traced, loaded):
    """The named schedule of `config` (not "learned"): a JSON file, or a built-in spec built for the
    sampler's denoiser calls over the model's blocks (then its units, at unit granularity)."""
    from dgo_compile.backend.sampling import denoiser_calls
    from dgo_compile.schedules.schedule import Schedule, builtin
    from dgo_compile.schedules.supernet import block_units, gateable_elements

    if config.schedule.endswith(".json"):
        return Schedule.load(config.schedule)
    calls = denoiser_calls(loaded.require_scheduler(), config.steps, config.scheduler)
    plan = builtin(config.schedule, calls, gateable_elements(traced, "block"), block_units(traced))
    if config.granularity == "unit":
        plan = plan.for_units(block_units(traced))
    return plan
