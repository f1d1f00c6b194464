"""Tiny diffusers pipeline folders written by tests: nothing is downloaded."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from model_configs import TINY_SD

TOKENS = 8  # tokenizer.model_max_length: the tiny text encoder's sequence length


def write_clip_tokenizer(folder: Path) -> None:
    """A character-level CLIP BPE tokenizer: a vocabulary of letters and no merges."""
    from transformers import CLIPTokenizer

    tokens = ["<|startoftext|>", "<|endoftext|>", *string.ascii_lowercase,
              *(c + "</w>" for c in string.ascii_lowercase)]
    vocab = {token: i for i, token in enumerate(tokens)}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=TOKENS).save_pretrained(folder)


def write_text_pipeline(path: Path, vae: bool = False) -> Path:
    """A StableDiffusionPipeline-shaped folder: tiny UNet2DConditionModel, CLIP text encoder and
    tokenizer, DDIM scheduler and, with `vae`, a tiny AutoencoderKL."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    UNet2DConditionModel.from_config(TINY_SD).save_pretrained(path / "unet")
    write_clip_tokenizer(path / "tokenizer")
    CLIPTextModel(CLIPTextConfig(
        vocab_size=2 + 2 * len(string.ascii_lowercase), hidden_size=TINY_SD["cross_attention_dim"],
        intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TOKENS,
        bos_token_id=0, eos_token_id=1, pad_token_id=1)).save_pretrained(path / "text_encoder")
    DDIMScheduler(clip_sample=False, timestep_spacing="trailing").save_pretrained(path / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    if vae:
        AutoencoderKL(latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8, sample_size=32,
                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                      ).save_pretrained(path / "vae")
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (path / "model_index.json").write_text(json.dumps(index))
    return path
