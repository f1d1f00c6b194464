"""results/pruner[_cond].{json,md} from benchmarks/pruner.py's rows (`pruners`: its PRUNERS). A helper module,
not a script."""

from __future__ import annotations

from common import RESULTS, log, write_json

from dgo_compile.search.selection import SELECTION_SEED


def write(meta: dict, optimization: dict, rows: list[dict], missing: list, search: dict, pruners: tuple) -> None:
    """results/pruner.json, and the markdown table from it (`--render` rewrites only the markdown)."""
    prefix = "pruner_cond" if meta.get("model") == "cond" else "pruner"
    write_json(RESULTS / f"{prefix}.json", {**meta, "optimization": optimization, "rows": rows,
                                         "not_measured": [{"budget": b, "schedule": s} for b, s in missing],
                                         "search": search})
    m = meta
    budgets = sorted({r["budget"] for r in rows} - {1.0}, reverse=True)
    asked = sorted(set(m.get("budgets") or budgets) | set(budgets), reverse=True)
    cond = m.get("model") == "cond"
    subject = f"the class-conditional model, guidance {m['guidance_scale']:g}" if cond else "the shipped model"
    selected = m.get("select") or list(range(len(pruners)))
    recipe = m.get("per_budget_recipe") or {}
    unselected = [label for i, (label, _, _) in enumerate(pruners) if i not in selected]
    lines = [f"# Learned block schedules vs baselines on {subject} (DDIM {m['steps']})", "",
             f"Reproduce: `python benchmarks/pruner.py{' --stored' if m.get('stored') else ''} --threads {m['threads']}"
             + (f" --model cond --guidance-scale {m['guidance_scale']:g}" if cond else "")
             + (f" --select {' '.join(map(str, selected))}" if len(selected) < len(pruners) else "")
             + (f" --learned {' '.join(m['learned'])}" if m.get("learned") else "")
             + f" --budgets {' '.join(f'{b:g}' for b in asked)}`"
             + (", then the same with `--returned`" if any(r.get("returned") for r in rows) else "")
             + f" (torch {m['torch']}, {m['threads']} thread{'s' * (m['threads'] > 1)}). "
             + ("Learned schedules: the ones stored in results/pruner_*_<budget>.json from the pruners below "
                f"({m['iters']} iterations at batch {m['batch']}, trained towards {m['train_ratio']:.0%} kept MACs); "
                if m.get("stored") else f"Pruners: {m['iters']} iterations at batch {m['batch']}, trained towards "
                                    f"{m['train_ratio']:.0%} kept MACs from DiP-GO's start (every gate keeps); "
                if set(selected) - {len(pruners) - 1} else "")
             + (f"\"{pruners[-1][0]}\": `dgo-compile optimize` as shipped, a pruner per budget trained towards it, "
                f"{recipe.get('iters')} iterations from `init = \"{recipe.get('init')}\"` (the searched K-step "
                "schedule at the budget, searched on the optimizer's own calibration noise); "
                if len(pruners) - 1 in selected and pruners[-1][1] in (m.get("learned") or [pruners[-1][1]])
                else "")
             + f"evaluation: {m['n']} samples from noise seed {m['eval_seed']}, never seen in optimization or search. "
             f"`steps-searched:K`: coordinate descent from `steps:K` on calibration noise seed {SELECTION_SEED} "
             "(samples and evaluations in the search table); `sampler at K steps`: a `full` schedule compiled with "
             "`--steps K`, compared with the same 50-step images.", "",
             "| budget | schedule | kept MACs | calls fully reused | PSNR vs full | SSIM vs full | FD |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["budget"] == 1.0:
            lines.append(_row(r))
    for budget in budgets:
        here = [r for r in rows if r["budget"] == budget]
        lines += [_row(r) for r in here]
        absent = [s for b, s in missing if b == budget and s not in unselected]
        if len(absent) == len(pruners):
            absent = ["learned (all pruners)"]
        lines += [f"| {budget:.0%} | {s} | not measured | | | | |" for s in absent]
    lines += [f"| {budget:.0%} | every schedule | not measured (the run was stopped at the deadline) | | | | |"
              for budget in asked if budget not in budgets]
    if unselected:
        lines += ["", f"Not run here (`--select`): {'; '.join(unselected)}."]
    lines += ["", "Best per budget (PSNR vs full; the learned row is the best learned variant; \"returned\": what "
              "`dgo-compile schedule` gives the user from the default pruner, `--returned`):", "",
              "| budget | best schedule | PSNR | best learned | PSNR | best baseline | PSNR | returned | PSNR |",
              "|---|---|---|---|---|---|---|---|---|"]
    for budget in budgets:
        here = [r for r in rows if r["budget"] == budget and not r.get("returned")]
        returned = next((r for r in rows if r["budget"] == budget and r.get("returned")), None)
        best = max(here, key=lambda r: r["psnr_vs_full"])
        learned = [r for r in here if r.get("learned")]
        baseline = max((r for r in here if not r.get("learned")), key=lambda r: r["psnr_vs_full"], default=None)
        top = max(learned, key=lambda r: r["psnr_vs_full"]) if learned else None
        lines.append(f"| {budget:.0%} | {best['schedule']} | {best['psnr_vs_full']:.1f} | "
                     + (f"{top['schedule']} | {top['psnr_vs_full']:.1f}" if top else "not measured | ")
                     + (f" | {baseline['schedule']} | {baseline['psnr_vs_full']:.1f} |" if baseline
                        else " | not measured yet | |")
                     + (f" {returned['schedule'].split(': ', 1)[1]} | {returned['psnr_vs_full']:.1f} |" if returned
                        else " not measured | |"))
    if search:
        lines += ["", "| budget | K | searched calls | calibration samples | calibration MSE (uniform -> searched) "
                  "| evaluations (cap) | time |", "|---|---|---|---|---|---|---|"]
        for budget, s in sorted(search.items(), key=lambda item: -float(item[0])):
            lines.append(f"| {float(budget):.0%} | {s['k']} | {' '.join(map(str, s['chosen']))} | "
                         f"{s.get('samples', 8)} | {s['uniform_calibration_mse']:.2e} -> {s['calibration_mse']:.2e} | "
                         f"{s['evaluations']} ({s.get('max_evaluations', 48)}) | {s['seconds']:.0f} s |")
    if optimization:
        lines += ["", "| pruner | iterations | time in the iterations (without the start's search) | peak RSS "
                  "| final kept MACs |", "|---|---|---|---|---|"]
        for label, o in optimization.items():
            lines.append(f"| {label} | {o['iterations']} | {o['seconds'] / 60:.1f} min | "
                         f"{o['peak_memory_mb']:.0f} MB | {o['final_kept']:.1%} |")
    lines += ["", f"FD: {m['n']} samples against {m['n']} real digits on the shipped classifier's features "
              "(noisy at this n; the floor is in results/shipped_model.md). PSNR capped at 100 dB. \"not measured\": "
              "no schedule of that pruner at that budget was committed (the learned step-granularity pruner's "
              "schedules never were; `--stored` does not retrain), or it was left out with `--learned`."]
    if cond:
        lines += ["", f"Image i of every noise set is digit i mod 10, sampled with classifier-free guidance at "
                  f"{m['guidance_scale']:g} through the model's null class; the pruners calibrate on the ten digits."]
    (RESULTS / f"{prefix}.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {RESULTS / f'{prefix}.md'}")


def _row(r: dict) -> str:
    return (f"| {r['budget']:.0%} | {r['schedule']} | {r['kept_macs']:.1%} | {r['calls_fully_reused']} | "
            f"{r['psnr_vs_full']:.1f} | {r['ssim_vs_full']:.3f} | {r['fd_vs_real']:.1f} |")
