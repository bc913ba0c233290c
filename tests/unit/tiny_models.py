"""Tiny, seeded diffusers models (random weights, built from configs) and matching conditioning.

Shapes follow the real families — 4 latent channels for the SD UNets, 16 for FLUX and Qwen-Image,
2x2-packed to 64 transformer input channels — at widths small enough that a forward + backward at
32x32 latents takes milliseconds on a laptop CPU.
"""

import torch
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, UNet2DConditionModel

LATENT_CHANNELS = {"unet": 4, "sdxl": 4, "flux": 16, "qwen": 16}
CONTEXT_DIM = 32  # text-encoder width (cross_attention_dim / joint_attention_dim) for every family
POOLED_DIM = 16  # pooled text embedding width (FLUX's CLIP-L, SDXL's CLIP-G)

_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=4,  # diffusers' legacy name: this is the number of heads
    cross_attention_dim=CONTEXT_DIM,
)


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD1.x-shaped UNet: two cross-attention down/up blocks and a cross-attention mid block."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**_UNET)


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """``tiny_unet`` plus SDXL's "text_time" added conditioning (pooled text + 6 size/crop ids)."""
    torch.manual_seed(seed)
    time_dim = 8
    return UNet2DConditionModel(**_UNET, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                                projection_class_embeddings_input_dim=POOLED_DIM + 6 * time_dim)


def tiny_flux(seed: int = 0) -> FluxTransformer2DModel:
    """FLUX.1-dev-shaped: one double- and one single-stream block, 2 heads of 16, guidance embedding."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=CONTEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )


def tiny_qwen_image(seed: int = 0) -> QwenImageTransformer2DModel:
    """Qwen-Image-shaped: two double-stream blocks, 2 heads of 16."""
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=CONTEXT_DIM,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )


def tiny_cond(family: str, batch: int, seq_len: int = 8,
              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random conditioning shaped for ``family`` ("unet", "sdxl", "flux" or "qwen").

    "qwen" gets a ``mask`` in which sample i has ``max(1, seq_len - 2 * (i + 1))`` real tokens, so every
    sample has padding; "flux" and "sdxl" get ``pooled``. Pass the same seeded generator for the same
    tensors.
    """
    if family not in LATENT_CHANNELS:
        raise ValueError(f"Unknown family {family!r}; choose one of {sorted(LATENT_CHANNELS)}")
    cond = {"context": torch.randn(batch, seq_len, CONTEXT_DIM, generator=generator)}
    if family in ("flux", "sdxl"):
        cond["pooled"] = torch.randn(batch, POOLED_DIM, generator=generator)
    if family == "qwen":
        real = torch.tensor([max(1, seq_len - 2 * (i + 1)) for i in range(batch)])
        cond["mask"] = (torch.arange(seq_len)[None, :] < real[:, None]).long()
    return cond
