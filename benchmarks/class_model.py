"""Quality of the shipped class-conditional digits model at several guidance scales.

    python benchmarks/class_model.py            # ~15 min on 2 CPU cores

Samples N images with DDIM-50 (eta 0) from fixed noise, image i asked to be digit i mod 10, with
classifier-free guidance through the model's null class (scale 1: the conditional model alone, one
call a step), and reports the Frechet distance on the shipped digit classifier's features against N
real digits (the floor is in results/shipped_model.md), the share the classifier reads as the digit
asked for, and the share it reads confidently. Writes results/class_model.{json,md} and a grid (a row
per digit) at the scale the pruner benchmark uses.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import RESULTS, digit_conditions

from dgo_compile import CLASS_CONDITIONAL_MODEL, __version__, load, trace
from dgo_compile.backend.sampling import initial_noise, sample, save_grid
from dgo_compile.channels.data import real_digit_sample
from dgo_compile.core.metrics import classifier_features, frechet_distance, load_digit_classifier

DIGITS = 10
GRID_SCALE = 2.0  # benchmarks/pruner.py --model cond


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--seed", type=int, default=10_000, help="noise seed (never used in training)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load(CLASS_CONDITIONAL_MODEL)
    traced = trace(loaded)
    null = traced.family.null_class_label(loaded.model)
    noise = initial_noise(args.n, (1, 32, 32), args.seed)
    labels = torch.arange(args.n) % DIGITS
    classifier = load_digit_classifier()
    real = classifier_features(real_digit_sample(args.n, args.seed), classifier)
    rows = []
    for scale in args.scales:
        images = sample(traced, loaded.scheduler_config, noise, 50, scheduler="ddim",
                        **digit_conditions(args.n, scale, null))
        with torch.no_grad():
            probs = torch.softmax(classifier(images), dim=1)
        rows.append({"guidance_scale": scale,
                     "fd_vs_real": frechet_distance(classifier_features(images, classifier), real),
                     "asked_digit_read": (probs.argmax(1) == labels).float().mean().item(),
                     "confident": (probs.max(1).values > 0.9).float().mean().item()})
        print(json.dumps(rows[-1]), flush=True)
        if scale == GRID_SCALE:
            order = torch.cat([torch.nonzero(labels == d).flatten()[:DIGITS] for d in range(DIGITS)])
            save_grid(images[order], RESULTS / "class_model_samples.png")
    result = {"model": "dgo_compile/assets/mnist_ddpm_cond (UNet2DModel, 10 classes + null class "
                       f"{null})", "dgo_compile": __version__, "torch": torch.__version__, "n": args.n,
              "noise_seed": args.seed, "sampler": "DDIM 50 steps, eta 0", "rows": rows}
    (RESULTS / "class_model.json").write_text(json.dumps(result, indent=2))
    lines = ["# Shipped class-conditional model (the digits UNet with a class embedding and a null class)", "",
             f"Reproduce: `python benchmarks/class_model.py` (torch {torch.__version__}, {args.threads} "
             f"thread{'s' * (args.threads > 1)}). "
             f"{args.n} samples from noise seed {args.seed}, image i asked to be digit i mod 10, DDIM 50; FD "
             "against as many real digits on the shipped classifier's features (real-vs-real floor: "
             "results/shipped_model.md).", "",
             "| guidance scale | FD vs real | read as the digit asked for | read with p > 0.9 |", "|---|---|---|---|"]
    lines += [f"| {r['guidance_scale']:g}{' (no guidance)' if r['guidance_scale'] == 1.0 else ''} | "
              f"{r['fd_vs_real']:.1f} | {r['asked_digit_read']:.1%} | {r['confident']:.1%} |" for r in rows]
    if GRID_SCALE in args.scales:
        lines += ["", f"![samples at guidance {GRID_SCALE:g}, a row per digit](class_model_samples.png)"]
    (RESULTS / "class_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
