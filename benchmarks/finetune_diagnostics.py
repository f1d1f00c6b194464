"""Where a fine-tuned student departs from its unpruned teacher (benchmarks/finetune.py's diagnostics).

- `trajectory_error`: per timestep band, the student's eps error along the teacher's own trajectories.
- `band_ssim`: per timestep band, the SSIM of samples that the student denoises in that band alone,
  the teacher everywhere else, against the teacher's own samples from the same noise. It says which
  band's errors cost image quality, which eps errors alone cannot: a step at high t may err and
  still land on the same digit, an error in the middle band moves strokes.
- `paired_ssim`: how sure the final SSIMs are, and whether two recipes differ beyond sampling error.
"""

from __future__ import annotations

import torch

DIAG_N = 16  # evaluation noises of the trajectory-error breakdown
BAND_N = 50  # evaluation noises of the band SSIM
BANDS = ((750, 1001), (500, 750), (250, 500), (0, 250))


def point_name(recipe: str, ratio, source: str, kind: str, step: int) -> str:
    """The name a run's curve point (EMA or raw weights at `step`) is evaluated and its samples cached under."""
    return f"{recipe}_r{ratio}_{source}_{kind}{step}"


def samples_file(ctx: dict, name: str, n: int):
    """Where `name`'s first n evaluation samples are cached."""
    return ctx["samples"] / f"{name}_n{n}.pt"


def _band(t: int) -> str:
    return next(f"{lo}-{hi}" for lo, hi in BANDS if lo <= t < hi)


def _ddim(ctx: dict):
    from dgo_compile.backend.sampling import make_scheduler

    scheduler = make_scheduler(ctx["config"], "ddim")
    scheduler.set_timesteps(ctx["steps"])
    return scheduler


@torch.no_grad()
def trajectory_error(model, ctx: dict) -> dict:
    """Per timestep band, along the unpruned model's own DDIM trajectories from the first DIAG_N evaluation
    noises: the student's eps MSE against the teacher's, and the error of the per-image mean of its eps beside
    the teacher's own mean (what a GroupNorm with few channels per group hardly sees). At high t a small eps
    error is a large error of the image the step aims at, and that is where a sample's content is decided."""
    scheduler = _ddim(ctx)
    x = ctx["noise"][:DIAG_N].clone()
    sums: dict[str, list[float]] = {}
    for t in scheduler.timesteps:
        step = t.float().expand(len(x))
        want, got = ctx["teacher"](x, step).sample, model(x, step).sample
        row = sums.setdefault(_band(int(t)), [0.0, 0.0, 0.0, 0])
        row[0] += float((got - want).pow(2).mean())
        row[1] += float((got - want).mean(dim=(1, 2, 3)).abs().mean())
        row[2] += float(want.mean(dim=(1, 2, 3)).abs().mean())
        row[3] += 1
        x = scheduler.step(want, t, x, eta=0.0).prev_sample
    return {band: {"eps_mse": a / k, "mean_err": b / k, "teacher_mean": c / k} for band, (a, b, c, k) in sums.items()}


@torch.no_grad()
def _hybrid(model, ctx: dict, student_bands: set[str]) -> torch.Tensor:
    scheduler = _ddim(ctx)
    x = ctx["noise"][:BAND_N].clone() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        denoiser = model if _band(int(t)) in student_bands else ctx["teacher"]
        x = scheduler.step(denoiser(x, t.float().expand(len(x))).sample, t, x, eta=0.0).prev_sample
    return x.clamp(-1, 1)


def band_ssim(model, ctx: dict) -> dict:
    """SSIM against the teacher's samples (first BAND_N evaluation noises, same DDIM) when the student denoises
    every step ("all") or only the steps of one band, the teacher the rest."""
    from dgo_compile.core.metrics import ssim

    if "teacher_band_images" not in ctx:
        ctx["teacher_band_images"] = _hybrid(ctx["teacher"], ctx, set())
    reference = ctx["teacher_band_images"]
    bands = [f"{lo}-{hi}" for lo, hi in BANDS]
    return {"n": len(reference), **{name: float(ssim(_hybrid(model, ctx, set(chosen)), reference).mean())
                                    for name, chosen in [("all", bands), *((b, [b]) for b in bands)]}}


def paired_ssim(runs: list[dict], main_recipe: str, ctx: dict, n: int, earlier: list[dict] = (),
                compare: tuple[str, list[str]] | None = None) -> list[dict]:
    """Per run, the per-image SSIM of its last EMA point (samples cached by `evaluate`) against the unpruned
    model's: its mean with a standard error, and the paired difference from the main recipe's data + distill
    run at the same cut on the same noises. Two recipes' means can differ by their sampling error alone (an
    image's SSIM spreads ~0.15); the paired difference says whether a recipe is better on the same noises.

    `earlier` rows (a previous report's) whose run has no samples here are kept as they were. `compare`,
    (recipe, other recipes): that recipe's rows also get `versus`, the paired difference from each other
    recipe's run of the same cut and source."""
    from dgo_compile.core.metrics import ssim

    def per_image(run: dict) -> tuple[int, torch.Tensor] | None:
        points = [p for p in run["curve"][1:] if p["ema"] and p["ema"]["n"] == n]
        if not points:
            return None
        step = points[-1]["step"]
        file = samples_file(ctx, point_name(run["recipe"], run["ratio"], run["source"], "ema", step), n)
        return (step, ssim(torch.load(file, weights_only=True), ctx["full"][:n])) if file.is_file() else None

    def is_reference(run: dict) -> bool:
        return run["recipe"] == main_recipe and run["source"] == "both"

    measured = [(run, found) for run in runs if (found := per_image(run)) is not None]
    by_run = {(run["recipe"], run["ratio"], run["source"]): values for run, (_, values) in measured}
    unsampled = {run["ratio"] for run in runs if is_reference(run)} - {r["ratio"] for r, _ in measured
                                                                       if is_reference(r)}
    reference = {run["ratio"]: values for run, (_, values) in measured if is_reference(run)}
    reference_macs = {run["ratio"]: run["kept_macs"] for run, _ in measured if is_reference(run)}
    rows = []
    for run, (step, values) in measured:
        row = {"recipe": run["recipe"], "ratio": run["ratio"], "kept_macs": run["kept_macs"], "source": run["source"],
               "step": step, "n": n, "ssim": float(values.mean()), "se": float(values.std() / n ** 0.5)}
        base = reference.get(run["ratio"])
        if base is None:  # a cut the main recipe did not run: against its run at the nearest MACs (within 1%)
            near = [r for r, macs in reference_macs.items() if abs(macs - run["kept_macs"]) <= 0.01]
            if near:
                row["against"] = min(near, key=lambda r: abs(reference_macs[r] - run["kept_macs"]))
                base = reference[row["against"]]
                row["against_macs"] = reference_macs[row["against"]]
        if is_reference(run):
            row["reference"] = True
        elif base is not None:
            diff = values - base
            row.update(diff=float(diff.mean()), diff_se=float(diff.std() / n ** 0.5))
        elif run["ratio"] in unsampled:
            row["unpaired"] = "not measured: the reference run's samples were not kept"
        if compare is not None and run["recipe"] == compare[0]:
            others = [(other, by_run.get((other, run["ratio"], run["source"]))) for other in compare[1]]
            row["versus"] = [{"recipe": other, "diff": float((values - v).mean()),
                              "diff_se": float((values - v).std() / n ** 0.5)} for other, v in others if v is not None]
        rows.append(row)
    done = {(r["recipe"], r["ratio"], r["source"]) for r in rows}
    return rows + [r for r in earlier if (r["recipe"], r["ratio"], r["source"]) not in done]
