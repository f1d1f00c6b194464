"""Prompt embeddings from a pipeline's own text encoder.

Text-conditional denoisers take `encoder_hidden_states`; users have prompts. A pipeline folder
with `text_encoder/` and `tokenizer/` (Stable Diffusion 1.x/2.x layout) can turn prompts into
the condition tensors that `--prompt-embeds` files hold, including the empty prompt's embedding
as `uncond.encoder_hidden_states` for classifier-free guidance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from dgo_compile.core.errors import DgoError
from dgo_compile.frontend.families import T5_TOKENS

MAX_TOKENS = 4096  # a tokenizer's model_max_length above this means none


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DgoError(f"cannot read prompts from {path}: {exc}") from exc
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise DgoError(f"{path} holds no prompts: write one prompt per line")
    return prompts


def has_text_encoder(pipeline: str | Path) -> bool:
    return (Path(pipeline) / "text_encoder" / "config.json").is_file()


def encode_prompts(pipeline: str | Path, prompts: list[str]) -> dict[str, torch.Tensor]:
    """{"encoder_hidden_states": (n, tokens, dim), "uncond.encoder_hidden_states": (1, tokens, dim)}:
    the last hidden state of the pipeline's text encoder, as its diffusers pipeline feeds the UNet."""
    encode = prompt_encoder(pipeline)
    return {"encoder_hidden_states": encode(prompts), "uncond.encoder_hidden_states": encode([""])}


def prompt_encoder(pipeline: str | Path) -> Callable[[list[str]], torch.Tensor]:
    """The pipeline's text encoder, loaded once, as prompts -> (n, tokens, dim) float32 (its last hidden
    state), for callers that encode many prompts in chunks."""
    folder = Path(pipeline)
    if (folder / "text_encoder_2").is_dir():
        raise DgoError(f"{folder} has two text encoders (SDXL-style), whose pooled embeddings and time ids this "
                       "command does not build: pass them in a `prompt_embeds` safetensors file", field="prompt_embeds")
    if not has_text_encoder(folder) or not (folder / "tokenizer").is_dir():
        raise DgoError(f"{folder} has no text_encoder/ and tokenizer/ to encode prompts with: pass a pipeline "
                       "folder that has them, or precomputed embeddings with `prompt_embeds`", field="prompt_embeds")
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise DgoError("encoding prompts needs the transformers package: pip install transformers") from exc
    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
    encoder_class = getattr(transformers, (index.get("text_encoder") or [None, "CLIPTextModel"])[1], None)
    tokenizer_class = getattr(transformers, (index.get("tokenizer") or [None, "AutoTokenizer"])[1], None)
    if encoder_class is None or tokenizer_class is None:
        raise DgoError(f"{folder}/model_index.json names a text encoder or tokenizer class that transformers "
                       f"{transformers.__version__} does not have")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = tokenizer_class.from_pretrained(folder / "tokenizer")
        encoder = encoder_class.from_pretrained(folder / "text_encoder").eval()
    except Exception as exc:
        raise DgoError(f"cannot load the text encoder or tokenizer in {folder}: {exc}") from exc

    # T5 tokenizers have no length limit of their own: PixArt pipelines cut captions at T5_TOKENS
    length = tokenizer.model_max_length if tokenizer.model_max_length <= MAX_TOKENS else T5_TOKENS

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids
        return encoder(ids)[0].float()

    return encode
