"""What every command module shares: the Typer app, the consoles, the common options and formatters.

Only light modules are imported here: every command checks its options and outputs before it imports
torch, diffusers or onnxruntime (inside its body), so `--help` and a bad argument answer at once. Help
text is plain (no rich markup), so `[prune]` and the like print as written."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(help="Compile diffusers denoisers into cheaper static ONNX artifacts.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None)
# Piped output gets a table wide enough to read rather than rich's 80-column default.
out = Console(width=None if sys.stdout.isatty() else 150)
err = Console(stderr=True)
# Under torchrun only process 0 reports progress and results; every process still reports its errors.
MAIN_PROCESS = os.environ.get("RANK", "0") == "0"
out.quiet = not MAIN_PROCESS

ModelArg = Annotated[Optional[Path], typer.Argument(
    help="Local diffusers model or pipeline folder, or a config.json. Default: the shipped MNIST model.",
    show_default=False)]
Seed = Annotated[int, typer.Option(help="Seed of the initial noise.")]
Steps = Annotated[int, typer.Option(help="Sampler steps.")]
Height = Annotated[int | None, typer.Option(
    help="Image height: pixels for a pipeline with a vae/, else the sample (latent) size. Default: the config's.",
    show_default=False)]
Width = Annotated[int | None, typer.Option(
    help="Image width: pixels for a pipeline with a vae/, else the sample (latent) size. Default: the config's.",
    show_default=False)]


def macs_text(macs: int) -> str:
    """MACs in G, or in M below a billion."""
    return f"{macs / 1e9:.3f} G" if macs >= 1e9 else f"{macs / 1e6:.1f} M"
