"""Learned (DiP-GO) block schedules against every honest baseline on the shipped models.

    python benchmarks/pruner.py --threads 1 --select 6 --budgets 0.5 0.35 0.3 0.25 0.2 0.15 0.1
    python benchmarks/pruner.py --threads 1 --returned --budgets 0.5 0.35 0.3 0.25 0.2 0.15 0.1
        # the committed table (see its header for what ran)
    python benchmarks/pruner.py --train-only 1 --pruners runs/pruners   # DiP-GO's own start (results/warm_start.md)
    python benchmarks/pruner.py                        # retrains the six pruners first (~2.5 h more)
    python benchmarks/pruner.py --model cond --select 6 --budgets 0.5 0.25 0.2 --threads 2  # the class-
        # conditional model under guidance, against one pruner per budget as `dgo-compile optimize` trains it

`--model cond` measures the shipped class-conditional digits model (dgo_compile/assets/mnist_ddpm_cond)
with classifier-free guidance (--guidance-scale, default 2): image i of every noise set is digit i mod 10,
the pruners calibrate on the ten digits, and results go to results/pruner_cond*.

Learned schedules: six pruners trained through whole DDIM-50 trajectories (calibration noise from seed
0; a gate per (call, block), per unit, or per whole call, and the knobs the method leaves open), or with
`--stored` the schedules they gave, as committed in results/pruner_<pruner>_<budget>.json (no
retraining; budgets without a stored schedule are marked "not measured"). At each kept-MACs budget they
meet: uniform `steps:K`, the searched K-step schedule `steps-searched:K` (dgo_compile.search.step_search, scored
on calibration noise seed 30000), the sampler itself at K steps (a `full` schedule compiled with
`--steps K`, which is not `steps:K` for a scheduler with leading spacing or clipping), DeepCache at the
nearest MACs it reaches (`deepcache:N:B`, the package's rule), and a random schedule (random scores, the
same extraction). Quality: PSNR / SSIM against the full 50-step model from the same noise and the
Frechet distance against real digits, on N samples from noise seed 20000 (never used in optimization or
search), run through the folded PyTorch graphs. The JSON and markdown are rewritten after every budget,
so an interrupted run keeps what it measured. Writes results/pruner.{json,md} and the heatmaps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, digit_conditions, log, read_json
from pruner_report import write

from dgo_compile import CLASS_CONDITIONAL_MODEL, __version__, load, trace
from dgo_compile.backend.folding import fold
from dgo_compile.backend.sampling import denoiser_timesteps, initial_noise, sample
from dgo_compile.channels.data import real_digit_sample
from dgo_compile.core.metrics import classifier_features, frechet_distance, load_digit_classifier, psnr, ssim
from dgo_compile.driver.report import save_heatmap
from dgo_compile.schedules.schedule import Schedule, builtin, builtin_for
from dgo_compile.schedules.schedule_cost import ScheduleCost, extract_schedule
from dgo_compile.search.pruner import OptimizeConfig, PrunerState, TrainedPruner, optimize
from dgo_compile.search.selection import SELECTION_SEED, select_schedule
from dgo_compile.search.step_search import searched_steps

PER_BUDGET = "per budget"  # a PRUNERS entry trained anew towards each budget it is scored at
BUDGETS = (0.5, 0.25, 0.2, 0.35, 0.15, 0.1)  # the first three have stored learned schedules
# (label, folder, OptimizeConfig settings beyond the shared ones). DiP-GO's lr, a gentler one (the
# paper's lr saturates the gates within ~60 of our 150 iterations), the same optimizer restricted to
# whole-network reuse, and the knobs the method leaves open: the training budget, unit granularity
# and the timestep input. `keep_macs=None` trains towards --keep-macs.
PRUNERS = (
    ("learned blocks (lr 0.1)", "pruner_block_lr0.1", dict(granularity="block", lr=0.1)),
    ("learned blocks (lr 0.03)", "pruner_block_lr0.03", dict(granularity="block", lr=0.03)),
    ("learned steps (lr 0.1)", "pruner_step_lr0.1", dict(granularity="step", lr=0.1)),
    ("learned blocks (lr 0.03, trained to 50%)", "pruner_block_lr0.03_r0.5", dict(granularity="block", lr=0.03,
                                                                                  keep_macs=0.5)),
    ("learned units (lr 0.03)", "pruner_unit_lr0.03", dict(granularity="unit", lr=0.03)),
    ("learned blocks (lr 0.03, no timestep input)", "pruner_block_lr0.03_notime",
     dict(granularity="block", lr=0.03, timestep_conditioning=False)),
    # What `dgo-compile optimize` does by default: one pruner per budget, trained towards it from the
    # searched K-step schedule there (OptimizeConfig's init and iters).
    ("learned (optimize's defaults, one per budget)", "pruner_default",
     dict(init=OptimizeConfig.init, iters=OptimizeConfig.iters, keep_macs=PER_BUDGET)),
)


DIGITS = 10


class Subject:
    """The model a run measures and how it is sampled: the shipped unconditional model, or (`--model
    cond`) the class-conditional one, image i as digit i mod 10 under classifier-free guidance."""

    def __init__(self, args):
        self.cond = args.model == "cond"
        self.loaded = load(CLASS_CONDITIONAL_MODEL if self.cond else None)
        self.traced = trace(self.loaded)
        self.config = self.loaded.scheduler_config
        self.guidance_scale = args.guidance_scale if self.cond else None
        self.null = self.traced.family.null_class_label(self.loaded.model) if self.cond else None
        self.prefix = "pruner_cond" if self.cond else "pruner"
        self.title = (f"the class-conditional model (guidance {self.guidance_scale:g})" if self.cond
                      else "the shipped model")

    def stem(self, stem: str) -> str:
        """A stored-result file stem of this model (pruner_block_lr0.03 -> pruner_cond_block_lr0.03)."""
        return self.prefix + stem.removeprefix("pruner")

    def optimize_settings(self) -> dict:
        return {"class_labels": tuple(range(DIGITS)), "guidance_scale": self.guidance_scale} if self.cond else {}

    def draw(self, denoiser, noise, steps: int, batch_size: int = 64):
        """DDIM (eta 0) images from `noise`, digit i mod 10 under guidance for the class-conditional model."""
        conditions = digit_conditions(len(noise), self.guidance_scale, self.null) if self.cond else {}
        return sample(denoiser, self.config, noise, steps, scheduler="ddim", batch_size=batch_size, **conditions)


def train(args, subject: Subject) -> dict:
    """The pruners of PRUNERS (those --select keeps), trained (or found finished in --pruners)."""
    trained = {}
    for index, (label, stem, overrides) in enumerate(PRUNERS):
        if args.train_only is not None and index != args.train_only or index not in args.select:
            continue
        if overrides.get("keep_macs") != PER_BUDGET:
            trained[label] = train_one(args, subject, label, stem, overrides)
    return trained


def train_one(args, subject: Subject, label: str, stem: str, overrides: dict, budget: float | None = None):
    """One pruner of PRUNERS (towards `budget` for a per-budget one), kept in --pruners (else a temp dir;
    a finished one found there is reused)."""
    settings = {"keep_macs": args.ratio, "steps": args.steps, "iters": args.iters, "batch": args.batch,
                "init": "full", **subject.optimize_settings(), **overrides}
    if budget is not None:
        settings["keep_macs"], stem = budget, f"{stem}_{int(round(budget * 100))}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = (args.pruners or Path(tmp)) / subject.stem(stem)
        started = time.perf_counter()
        pruner = optimize(subject.traced, subject.config, OptimizeConfig(**settings), folder, model_source=None,
                          null_class_label=subject.null, resume=folder.exists(),
                          on_iteration=lambda r: print(stem, json.dumps(r), flush=True))
    log(f"{label}{'' if budget is None else f' ({budget:.0%})'}: {time.perf_counter() - started:.0f} s")
    return pruner


def learned_schedules(args, subject: Subject, trained: dict, budget: float, costs) -> dict[str, Schedule | None]:
    """Each pruner's schedule at `budget`: extracted from a trained pruner, or read from its stored JSON
    with --stored (None where none was stored or --select left the pruner out; a per-budget pruner with
    none stored is trained, so stored and new schedules share one table)."""
    found = {}
    for index, (label, stem, overrides) in enumerate(PRUNERS):
        path = RESULTS / f"{subject.stem(stem)}_{int(round(budget * 100))}.json"
        if args.stored:  # a stored schedule, else (per-budget pruners only) one trained now
            skipped = args.learned is not None and stem not in args.learned
            if skipped or path.is_file() or overrides.get("keep_macs") != PER_BUDGET:
                found[label] = Schedule.load(path) if path.is_file() and not skipped else None
                continue
        pruner = trained.get(label)
        if overrides.get("keep_macs") == PER_BUDGET and index in args.select:
            pruner = trained[f"{label} at {budget:.0%}"] = train_one(args, subject, label, stem, overrides, budget)
        if pruner is None:
            found[label] = None
            continue
        plan, _ = extract_schedule(pruner.reuse_margins(), costs(pruner.state.schedule_granularity), budget,
                                   f"{label} {budget}", pruner.whole_calls)
        found[label] = plan
        if not pruner.whole_calls:
            save_heatmap(pruner.reuse_scores(), plan, RESULTS / f"{path.stem}.png",
                         f"{label} at {budget:.0%} kept MACs (DDIM {args.steps})")
            plan.save(path)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--keep-macs", dest="ratio", type=float, default=0.2,
                        help="kept-MACs target the pruners train towards")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("-n", type=int, default=200, help="evaluation samples per schedule")
    parser.add_argument("--seed", type=int, default=20_000, help="evaluation noise seed")
    parser.add_argument("--search-samples", type=int, default=8,
                        help="calibration samples (seed 30000) the K-step search scores on")
    parser.add_argument("--search-evaluations", type=int, default=48,
                        help="trajectories the K-step search may score (step_search.MAX_EVALUATIONS)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of results/pruner.json at budgets not measured in this run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stored", action="store_true",
                        help="evaluate the learned schedules stored in results/ instead of training pruners "
                             "(a per-budget pruner with no stored schedule at a budget is trained there)")
    parser.add_argument("--learned", nargs="+", default=None, metavar="PRUNER",
                        help="with --stored, evaluate only these pruners' schedules (folder stems, e.g. "
                             "pruner_block_lr0.03); the others are marked not measured")
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the full model's evaluation samples here and reuse them (a rerun skips them)")
    parser.add_argument("--pruners", type=Path, default=None,
                        help="keep the trained pruners here (default: temp); finished ones found there are reused")
    parser.add_argument("--train-only", type=int, default=None, help="train only PRUNERS[i] (run them side by side)")
    parser.add_argument("--select", type=int, nargs="+", default=list(range(len(PRUNERS))),
                        help="train and evaluate only these PRUNERS (indices); the others are marked not measured")
    parser.add_argument("--model", choices=("shipped", "cond"), default="shipped",
                        help="cond: the class-conditional digits model under guidance (results/pruner_cond*)")
    parser.add_argument("--guidance-scale", type=float, default=2.0, help="with --model cond")
    parser.add_argument("--render", action="store_true", help="only rewrite results/pruner.md from pruner.json")
    parser.add_argument("--returned", action="store_true",
                        help="only add, per --budgets, what `dgo-compile schedule` returns for the default per-budget "
                             "pruner: its stored schedule or the closed-form one that beats it on the selection's "
                             "calibration samples (the other rows are kept as measured)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prefix = "pruner_cond" if args.model == "cond" else "pruner"
    if args.render:
        data = read_json(RESULTS / f"{prefix}.json")
        write({k: v for k, v in data.items() if k not in ("optimization", "rows", "not_measured", "search")},
              data.get("optimization", {}), data["rows"],
              [(m["budget"], m["schedule"]) for m in data.get("not_measured", [])], data.get("search", {}), PRUNERS)
        return

    subject = Subject(args)
    traced, config = subject.traced, subject.config
    names = tuple(b.name for b in traced.blocks)
    cost_models: dict[str, ScheduleCost] = {}

    def costs(granularity: str) -> ScheduleCost:
        return cost_models.setdefault(granularity, ScheduleCost(traced, granularity))

    RESULTS.mkdir(exist_ok=True)
    trained = {} if args.stored else train(args, subject)
    if args.train_only is not None:
        return
    previous = read_json(RESULTS / f"{prefix}.json") or {}
    # what trained the schedules in the table: kept from before only when its rows are (--stored, --merge,
    # --returned); a pruner trained now replaces its entry
    kept = args.stored or args.merge or args.returned
    optimization = {**(previous.get("optimization", {}) if kept else {}),
                    **{label: summary(p) for label, p in trained.items()}}

    classifier = load_digit_classifier()
    real_features = classifier_features(real_digit_sample(args.n, args.seed), classifier)
    noise = initial_noise(args.n, (1, 32, 32), args.seed)
    timesteps = denoiser_timesteps(config, args.steps)
    cached = args.cache / f"full_{args.steps}_{args.n}_{args.seed}.pt" if args.cache else None
    if cached is not None and cached.is_file():
        full = torch.load(cached)
    else:
        full = subject.draw(fold(traced, builtin("full", args.steps, names), timesteps), noise, args.steps, 50)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save(full, cached)
    log("full")
    calibration = initial_noise(args.search_samples, (1, 32, 32), SELECTION_SEED)
    calibration_full = subject.draw(traced, calibration, args.steps)

    def calibration_mse(denoiser) -> float:
        return (subject.draw(denoiser, calibration, args.steps) - calibration_full).pow(2).mean().item()

    def measured(label: str, budget: float, images, kept: float, reused: int, **extra) -> dict:
        return {"budget": budget, "schedule": label, "kept_macs": kept, "calls_fully_reused": reused,
                "psnr_vs_full": float(psnr(images, full).clamp(max=100).mean()),
                "ssim_vs_full": float(ssim(images, full).mean()),
                "fd_vs_real": frechet_distance(classifier_features(images, classifier), real_features), **extra}

    def scheduled(label: str, budget: float, plan: Schedule, **extra) -> dict:
        images = subject.draw(fold(traced, plan, timesteps), noise, args.steps, 50)
        log(f"{budget:.0%} {label}")
        return measured(label, budget, images, costs(plan.granularity).kept_ratio(plan),
                        sum(not any(r) for r in plan.compute), **extra)

    if args.returned:
        rows = [r for r in previous["rows"] if not (r.get("returned") and r["budget"] in args.budgets)]
        for budget in args.budgets:
            rows.append(returned_row(subject, budget, args.steps, costs, rows, scheduled))
            write({k: v for k, v in previous.items() if k not in ("optimization", "rows", "not_measured", "search")},
                  optimization, rows, [(m["budget"], m["schedule"]) for m in previous.get("not_measured", [])],
                  previous.get("search", {}), PRUNERS)
        return
    rows = [measured("full", 1.0, full, 1.0, 0)]
    missing, search = [], {}
    if args.merge:  # the rows of budgets measured before and not now
        rows += [r for r in previous.get("rows", []) if r["budget"] not in args.budgets and r["budget"] != 1.0]
        missing += [(m["budget"], m["schedule"]) for m in previous.get("not_measured", [])
                    if m["budget"] not in args.budgets]
        search.update({b: s for b, s in previous.get("search", {}).items() if float(b) not in args.budgets})
    deepcache_kept: dict[str, float] = {}
    meta = {"dgo_compile": __version__, "torch": torch.__version__, "steps": args.steps, "n": args.n,
            "eval_seed": args.seed, "search_seed": SELECTION_SEED, "train_ratio": args.ratio, "iters": args.iters,
            "batch": args.batch, "threads": args.threads, "stored": args.stored, "learned": args.learned,
            "budgets": sorted(set(args.budgets) | {r["budget"] for r in rows} - {1.0}, reverse=True),
            "model": args.model, "guidance_scale": subject.guidance_scale, "select": args.select,
            "per_budget_recipe": {"init": OptimizeConfig.init, "iters": OptimizeConfig.iters}}

    def add(row: dict) -> None:  # written after every row: an interrupted run keeps what it measured
        rows.append(row)
        write(meta, optimization, rows, missing, search, PRUNERS)

    for budget in args.budgets:
        learned = learned_schedules(args, subject, trained, budget, costs)  # trains the per-budget pruners
        optimization.update({name: summary(p) for name, p in trained.items()})
        for label, plan in learned.items():
            if plan is None:
                missing.append((budget, label))
            else:
                add(scheduled(label, budget, plan, learned=True))
        k = min(range(1, args.steps + 1),
                key=lambda k: abs(costs("block").kept_ratio(builtin(f"steps:{k}", args.steps, names)) - budget))
        add(scheduled(f"steps:{k}", budget, builtin(f"steps:{k}", args.steps, names)))
        sampler_k = min(range(1, args.steps + 1), key=lambda k: (abs(k / args.steps - budget), k))
        images = subject.draw(fold(traced, builtin("full", sampler_k, names), denoiser_timesteps(config, sampler_k)),
                              noise, sampler_k, 50)
        add(measured(f"sampler at {sampler_k} steps", budget, images, sampler_k / args.steps, 0))
        started = time.perf_counter()
        found = searched_steps(traced, args.steps, k, calibration_mse, args.search_evaluations)
        search[f"{budget:g}"] = {"k": k, "chosen": list(found.chosen), "calibration_mse": found.score,
                                 "uniform_calibration_mse": found.uniform_score, "evaluations": found.evaluations,
                                 "samples": args.search_samples, "max_evaluations": args.search_evaluations,
                                 "seconds": time.perf_counter() - started}
        found.schedule.save(RESULTS / f"steps_searched{'_cond' * subject.cond}_{k}.json")
        add(scheduled(found.schedule.name, budget, found.schedule))
        best = nearest_deepcache(traced, args.steps, budget, costs("unit"), deepcache_kept)
        add(scheduled(best, budget, builtin_for(best, args.steps, traced)))
        random_scores = torch.rand(args.steps, len(names), generator=torch.Generator().manual_seed(7))
        add(scheduled("random", budget, extract_schedule(random_scores, costs("block"), budget, f"random {budget}")[0]))


def returned_row(subject: Subject, budget: float, steps: int, costs, rows: list[dict], scheduled) -> dict:
    """What `dgo-compile schedule <default pruner> --keep-macs budget` returns (dgo_compile.search.selection on
    its own calibration noise), measured: the learned row's numbers when the learned schedule won."""
    label, stem, _ = PRUNERS[-1]
    learned = Schedule.load(RESULTS / f"{subject.stem(stem)}_{int(round(budget * 100))}.json")
    cost = costs("block")
    timesteps = denoiser_timesteps(subject.config, steps)
    config = OptimizeConfig(keep_macs=budget, steps=steps, **subject.optimize_settings())
    state = PrunerState(config, None, {"calls": len(timesteps), "config": dict(subject.config)}, cost.elements,
                        "block", cost.cascade_shares())
    selection = select_schedule(subject.traced, TrainedPruner(state, None), learned, budget,
                                null_class_label=subject.null)
    log(f"{budget:.0%}: {selection.summary()}")
    winner = selection.best.schedule
    extra = {"returned": True, "selection": selection.summary()}
    name = f"returned by `dgo-compile schedule`: {'the learned schedule' if selection.learned_won else winner.name}"
    if selection.learned_won:
        row = next(r for r in rows if r["budget"] == budget and r["schedule"] == label)
        return {**row, "schedule": name, "learned": False, **extra}
    return scheduled(name, budget, winner, **extra)


def summary(pruner) -> dict:
    """What results/pruner.json keeps of a trained pruner."""
    state = pruner.state
    return {"granularity": state.config.granularity, "iterations": state.iterations_done, "seconds": state.seconds,
            "peak_memory_mb": state.peak_memory_mb, "lr": state.config.lr, "init": state.config.init,
            "keep_macs": state.config.keep_macs, "final_kept": state.history[-1]["kept"], "history": state.history}


def nearest_deepcache(traced, steps: int, budget: float, cost: ScheduleCost, memo: dict[str, float]) -> str:
    """`deepcache:N:B` with kept MACs nearest `budget`: per branch, a bisection over the interval N (kept
    MACs fall as N grows) and the two intervals around the budget (pricing all 49 x 12 costs minutes)."""
    def kept(spec: str) -> float:
        if spec not in memo:
            memo[spec] = cost.kept_ratio(builtin_for(spec, steps, traced))
        return memo[spec]

    names = [b.name for b in traced.blocks]
    near = []
    for branch in range(3 * sum(name.startswith("down_blocks.") for name in names)):
        low, high = 2, steps  # the smallest N with kept <= budget lies in [low, high] (or is high)
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if kept(f"deepcache:{middle}:{branch}") <= budget else (middle + 1, high)
        near += [f"deepcache:{n}:{branch}" for n in {max(2, low - 1), low}]
    return min(sorted(near), key=lambda spec: abs(kept(spec) - budget))


if __name__ == "__main__":
    main()
