"""`finetune --distill-only --student-rollouts` on full-size published configs (random weights): one
pool of trajectories, run by the teacher alone and with half of them run by the student.

    python benchmarks/full_size_rollouts.py                 # DiT-XL/2 and SD-1.5, ~10 min on 1 thread
    python benchmarks/full_size_rollouts.py --models dit_xl_2 --batch 2 --steps 2

Each model runs in a fresh process: build it from its config.json, copy it as the student, and run
`TeacherTrajectories` for one pool of --batch trajectories of --steps DDIM steps, first with
`student_share` 0 and then 0.5. SD-1.5's prompts are random 77 x 768 embeddings (a bare config has
no text encoder; the UNet's cost does not depend on what the embeddings say). SDXL is not run:
`distill_only` refuses its added conditions (text_embeds, time_ids). Measured: each pool's wall
time, the pool's size in memory (what a checkpoint then keeps) and the process's peak RSS.
Results go to results/full_size_rollouts.json and .md; thread counts are pinned (--threads).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from common import RESULTS, full_size_arguments, full_size_rows, model_configs, read_json, write_json

CONFIGS = model_configs()
MODELS = {"dit_xl_2": CONFIGS.DIT_XL_2, "sd15": CONFIGS.SD15_UNET}


def child(config_file: Path, threads: int, batch: int, steps: int) -> None:
    import copy

    import torch

    torch.set_num_threads(threads)
    from dgo_compile import load
    from dgo_compile.channels.finetune_data import TeacherTrajectories

    teacher = load(config_file)
    student = copy.deepcopy(teacher.model).train()
    cross = getattr(teacher.model.config, "cross_attention_dim", None)
    generator = torch.Generator().manual_seed(0)

    def encode(prompts: list[str]) -> torch.Tensor:  # a stand-in text encoder: the UNet's cost is the same
        return torch.randn(len(prompts), 77, cross, generator=generator)

    texts = "encoder_hidden_states" in teacher.family.input_names(teacher.model)
    row = {"params_m": sum(p.numel() for p in student.parameters()) / 1e6}
    for share in (0.0, 0.5):
        source = TeacherTrajectories(teacher.model, teacher.scheduler_config, steps, batch, 0,
                                     ["a photo"] if texts else None, encode if texts else None, student_share=share)
        started = time.perf_counter()
        source.draw(1, student)
        row[f"share_{share:g}_seconds"] = time.perf_counter() - started
        row["pool_mb"] = sum(t.numel() * t.element_size() for t in source.pool[1].values()) / 2**20
        row["student_rows"] = source.student_rows
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(row))


def write_markdown(report: dict, path: Path) -> None:
    lines = ["# Student rollouts (`--distill-only --student-rollouts`) on full-size configs (random weights)", "",
             f"Reproduce: `python benchmarks/full_size_rollouts.py` (dgo-compile {report['dgo_compile']}, torch "
             f"{report['torch']}, {report['threads']} thread(s), each model in a fresh process). One pool: "
             f"{report['batch']} trajectories of {report['steps']} DDIM steps, run by the teacher alone, then with "
             "half of them run by the student (a copy of the teacher). SD-1.5's prompt embeddings are random; "
             "SDXL is not run (`distill_only` refuses its added conditions)."
             + (f" Machine load: {report['beside']}." if report.get("beside") else ""), "",
             "| model | params | pool, teacher only | pool, half student | student rows | pool in memory "
             "(kept by a checkpoint) | peak RSS |", "|---|---|---|---|---|---|---|"]
    for name, row in report["models"].items():
        lines.append(f"| {name} | {row['params_m']:.0f} M | {row['share_0_seconds']:.1f} s | "
                     f"{row['share_0.5_seconds']:.1f} s | {row['student_rows']} of {report['batch']} | "
                     f"{row['pool_mb']:.1f} MB | {row['peak_rss_mb'] / 1024:.1f} GB |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = full_size_arguments(__doc__.split("\n")[0], MODELS)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child, args.threads, args.batch, args.steps)
    import torch

    from dgo_compile import __version__

    report = {"dgo_compile": __version__, "torch": torch.__version__, "threads": args.threads, "batch": args.batch,
              "steps": args.steps, "beside": args.beside,
              "models": (read_json(RESULTS / "full_size_rollouts.json") or {}).get("models", {})}
    report["models"].update(full_size_rows(__file__, MODELS, args.models, ["--threads", str(args.threads),
                                                                           "--batch", str(args.batch),
                                                                           "--steps", str(args.steps)]))
    write_json(RESULTS / "full_size_rollouts.json", report)
    write_markdown(report, RESULTS / "full_size_rollouts.md")


if __name__ == "__main__":
    main()
