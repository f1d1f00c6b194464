"""Tiny diffusers pipeline folders written by tests: nothing is downloaded."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from model_configs import TINY_DIT, TINY_PIXART, TINY_SD, TINY_SDXL

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
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                  model_max_length=TOKENS).save_pretrained(folder)


def _clip_config(hidden: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=2 + 2 * len(string.ascii_lowercase), hidden_size=hidden, intermediate_size=37,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TOKENS, bos_token_id=0,
                          eos_token_id=1, pad_token_id=1, **extra)


def _write_vae(path: Path) -> None:
    """A tiny AutoencoderKL: 2 blocks, so 2 pixels per latent."""
    from diffusers import AutoencoderKL

    AutoencoderKL(latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8, sample_size=32,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  ).save_pretrained(path)


def write_sdxl_pipeline(path: Path) -> Path:
    """A StableDiffusionXLPipeline-shaped folder: the tiny SDXL UNet (text_time conditioning), two CLIP
    text encoders whose hidden states concatenate to its cross-attention width (16 + 16) and whose
    second one's projection (32) plus 6 time ids x 8 is its added-embedding width, tokenizers, DDIM
    scheduler and a tiny VAE."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    half = TINY_SDXL["cross_attention_dim"] // 2
    projection = TINY_SDXL["projection_class_embeddings_input_dim"] - 6 * TINY_SDXL["addition_time_embed_dim"]
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(TINY_SDXL).save_pretrained(path / "unet")
    CLIPTextModel(_clip_config(half)).save_pretrained(path / "text_encoder")
    CLIPTextModelWithProjection(_clip_config(half, projection_dim=projection)).save_pretrained(path / "text_encoder_2")
    write_clip_tokenizer(path / "tokenizer")
    write_clip_tokenizer(path / "tokenizer_2")
    DDIMScheduler(clip_sample=False, timestep_spacing="trailing").save_pretrained(path / "scheduler")
    _write_vae(path / "vae")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    return path


def write_model_pipeline(path: Path, config: dict) -> Path:
    """A pipeline folder without a VAE (random weights, DDIM scheduler) around a tiny model config."""
    from diffusers import DDIMScheduler

    from dgo_compile.frontend.families import FAMILIES

    torch.manual_seed(0)
    folder = "transformer" if "Transformer" in config["_class_name"] else "unet"
    FAMILIES[config["_class_name"]].model_class.from_config(config).save_pretrained(path / folder)
    DDIMScheduler(clip_sample=False, timestep_spacing="trailing").save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline",
                                                       folder: ["diffusers", config["_class_name"]],
                                                       "scheduler": ["diffusers", "DDIMScheduler"]}))
    return path


def write_text_pipeline(path: Path, vae: bool = False) -> Path:
    """A StableDiffusionPipeline-shaped folder: tiny UNet2DConditionModel, CLIP text encoder and
    tokenizer, DDIM scheduler and, with `vae`, a tiny AutoencoderKL."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    UNet2DConditionModel.from_config(TINY_SD).save_pretrained(path / "unet")
    write_clip_tokenizer(path / "tokenizer")
    CLIPTextModel(_clip_config(TINY_SD["cross_attention_dim"])).save_pretrained(path / "text_encoder")
    DDIMScheduler(clip_sample=False, timestep_spacing="trailing").save_pretrained(path / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    if vae:
        _write_vae(path / "vae")
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def write_dit_pipeline(path: Path) -> Path:
    """A DiTPipeline folder: the tiny DiT (learned sigma) with 1000 classes, since DiTPipeline hard-codes
    class 1000 as its null class, a DDIM scheduler and the tiny VAE (16 x 16 pixels)."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    DiTTransformer2DModel.from_config({**TINY_DIT, "num_embeds_ada_norm": 1000}).save_pretrained(path / "transformer")
    DDIMScheduler(clip_sample=False, timestep_spacing="trailing").save_pretrained(path / "scheduler")
    _write_vae(path / "vae")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
        "scheduler": ["diffusers", "DDIMScheduler"], "vae": ["diffusers", "AutoencoderKL"]}))
    return path


def write_t5_tokenizer(folder: Path) -> None:
    """A character-level T5 (Unigram) tokenizer: pad, eos, unk, the word boundary and the letters."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0), *((c,
                                                                                 -1.0) for c in string.ascii_lowercase)]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder)


def write_pixart_pipeline(path: Path, sigma: bool = False) -> Path:
    """A PixArtAlphaPipeline (or, with `sigma`, PixArtSigmaPipeline) folder: a tiny PixArt transformer,
    a 1-layer T5 encoder as wide as its captions and its tokenizer, DDIM and the tiny VAE. Alpha's
    transformer has sample_size 128, the size at which the transformer takes (and the pipeline passes)
    resolution and aspect-ratio conditions; run it with use_resolution_binning=False at a small size."""
    from diffusers import DDIMScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    # Alpha's size embeddings take a third of the width each (2 for resolution, 1 for aspect ratio): 24 wide
    config = TINY_PIXART if sigma else {**TINY_PIXART, "sample_size": 128, "attention_head_dim": 12,
                                        "cross_attention_dim": 24}
    PixArtTransformer2DModel.from_config(config).save_pretrained(path / "transformer")
    T5EncoderModel(T5Config(vocab_size=2 + 2 + len(string.ascii_lowercase), d_model=TINY_PIXART["caption_channels"],
                            d_kv=4, d_ff=16, num_layers=1, num_heads=2)).save_pretrained(path / "text_encoder")
    write_t5_tokenizer(path / "tokenizer")
    DDIMScheduler(clip_sample=False, timestep_spacing="trailing").save_pretrained(path / "scheduler")
    _write_vae(path / "vae")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtSigmaPipeline" if sigma else "PixArtAlphaPipeline",
        "transformer": ["diffusers", "PixArtTransformer2DModel"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    return path
