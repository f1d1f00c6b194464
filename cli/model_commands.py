"""`inspect` and `encode-prompts`: what a model is, and the condition inputs it is sampled with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dgo_compile.core.options import check

from .common import Height, ModelArg, Width, macs_text, out


def inspect(
    model: ModelArg = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    units: Annotated[bool, typer.Option(help="Also list the units inside each block.")] = False,
    batch: Annotated[int, typer.Option(help="Batch size the MACs are counted at.")] = 1,
    height: Height = None,
    width: Width = None,
) -> None:
    """Blocks of a denoiser with their shapes, parameters and MACs per call."""
    check("inspect", {"batch": batch, "height": height, "width": width})
    from dgo_compile import load, trace
    from dgo_compile.frontend.resolution import resolve
    from dgo_compile.schedules.cost import cost_report

    loaded = load(model)
    report = cost_report(trace(loaded, size=resolve(loaded.model, loaded.source, height, width).latent), batch=batch)
    if as_json:
        print(json.dumps({"source": str(loaded.source), "random_weights": loaded.random_weights, **report.to_json()},
                         indent=2))
        return
    total = report.total
    table = Table(title=f"{report.model} from {loaded.source}" + (" (random weights)" if loaded.random_weights else ""),
                  caption="inputs: " + ", ".join(f"{k} {list(v)}" for k, v in report.input_shapes.items()))
    for col, justify in [("block", "left"), ("kind", "left"), ("in", "left"), ("out", "left"), ("params", "right"),
                         ("weight MACs", "right"), ("attn MACs", "right"), ("share", "right")]:
        table.add_column(col, justify=justify)
    for row in report.rows:
        if row.cost.params == 0 and row.cost.macs == 0:
            continue
        style = None if row.gateable else "dim"
        table.add_row(row.name, row.kind, "x".join(map(str, row.input_shapes[0])) if row.input_shapes else "",
                      "x".join(map(str, row.output_shapes[-1])) if row.output_shapes else "",
                      f"{row.cost.params:,}", macs_text(row.cost.weight_macs), macs_text(row.cost.attention_macs),
                      f"{report.share(row):.1%}", style=style)
        if units:
            for name, cost in row.units.items():
                table.add_row("  " + name, "", "", "", f"{cost.params:,}", macs_text(cost.weight_macs),
                              macs_text(cost.attention_macs), f"{cost.macs / max(total.macs, 1):.1%}", style="italic")
    table.add_section()
    table.add_row("total", "", "", "", f"{total.params:,}", macs_text(total.weight_macs),
                  macs_text(total.attention_macs), "100%")
    out.print(table)


def encode_prompts_command(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline folder with text_encoder/ and tokenizer/.")],
    prompts: Annotated[Path, typer.Option(help="Text file, one prompt per line.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="safetensors file to write.")] = Path(
        "prompt_embeds.safetensors"),
) -> None:
    """Encode prompts with a pipeline's own text encoder into a --prompt-embeds file (with the empty
    prompt as uncond.encoder_hidden_states, for guidance)."""
    from dgo_compile.core.outputs import check_output

    check_output(output, None, protected=[pipeline, prompts])
    from safetensors.torch import save_file

    from dgo_compile.core.files import write_atomic
    from dgo_compile.frontend.prompts import encode_prompts, read_prompts

    tensors = encode_prompts(pipeline, read_prompts(prompts))
    write_atomic(output, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))
    shape = tuple(tensors["encoder_hidden_states"].shape)
    out.print(f"wrote {output}: encoder_hidden_states {shape} and uncond.encoder_hidden_states; "
              f"use it with --prompt-embeds")
