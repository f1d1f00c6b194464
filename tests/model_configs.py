"""Diffusers configs used by the tests: tiny ones per family, and the published full-size ones.

Tiny configs keep every structural feature the compiler must handle (cross-attention, SDXL's
text_time conditioning, DiT class labels, PixArt captions) at a size that runs in milliseconds.
"""

TINY_UNET2D = {
    "_class_name": "UNet2DModel", "sample_size": 16, "in_channels": 3, "out_channels": 3,
    "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}
TINY_UNET2D_CLASS_COND = {**TINY_UNET2D, "num_class_embeds": 10}
TINY_SD = {
    "_class_name": "UNet2DConditionModel", "sample_size": 16, "in_channels": 4, "out_channels": 4,
    "block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32, "attention_head_dim": 8,
    "norm_num_groups": 16,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
TINY_SDXL = {
    **TINY_SD,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8, "transformer_layers_per_block": [1, 2],
    "use_linear_projection": True,
}
TINY_DIT = {
    "_class_name": "DiTTransformer2DModel", "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4,
    "out_channels": 8, "num_layers": 2, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10,
}
TINY_PIXART = {
    "_class_name": "PixArtTransformer2DModel", "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4,
    "out_channels": 8, "num_layers": 2, "sample_size": 8, "patch_size": 2, "cross_attention_dim": 16,
    "caption_channels": 12,
}
TINY = {
    "unet2d": TINY_UNET2D, "unet2d_class_cond": TINY_UNET2D_CLASS_COND, "sd": TINY_SD, "sdxl": TINY_SDXL,
    "dit": TINY_DIT, "pixart": TINY_PIXART,
}

# Published architectures, for the MACs check (weights are never needed).
SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
DDPM_CIFAR10_UNET = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"], "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
DIT_XL_2 = {
    "_class_name": "DiTTransformer2DModel", "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4,
    "out_channels": 8, "num_layers": 28, "sample_size": 32, "patch_size": 2, "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
    "norm_elementwise_affine": False, "upcast_attention": False, "dropout": 0.0,
}
# (config, published MACs per call, which MACs the publication counts)
PUBLISHED_MACS = {
    "sd15": (SD15_UNET, 338.8e9, "weight"),
    "ddpm_cifar10": (DDPM_CIFAR10_UNET, 6.1e9, "weight"),
    "dit_xl_2": (DIT_XL_2, 118.6e9, "both"),
}
SD21_768_UNET = {
    **SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "sample_size": 96,
    "use_linear_projection": True, "upcast_attention": True,
}
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
# Full-size UNets for benchmarks/full_size.py, each at its own resolution (64, 96 and 128 latent).
FULL_SIZE = {"sd15": SD15_UNET, "sd21_768": SD21_768_UNET, "sdxl": SDXL_UNET}
