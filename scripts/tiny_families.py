"""Tiny random-weight models of every family, built in-process from ComfyUI's own model classes.

ComfyUI's file detection fixes the widths of most flow models (FLUX: hidden 3072), so these are made the way
ComfyUI's loaders make a model after detection: ``supported_models.<Family>(unet_config).get_model()`` wrapped
in a ``ModelPatcher``. The architecture, the conditioning it takes (pooled text, SDXL size embedding, FLUX
guidance, Qwen reference latents), its ``model_sampling`` and its LoRA key map are ComfyUI's; only the widths
are small. ``TINY[family].cond`` gives the shapes of one caption's conditioning, as ComfyUI's text encoders
of that family return it (sequence ``context``, optional ``pooled``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tiny:
    config_class: str  # comfy.supported_models class
    unet_config: dict
    latent_channels: int
    cond: dict[str, tuple[int, ...]]  # one caption's conditioning: name -> shape
    model_type: str | None = None  # force a comfy.model_base.ModelType (SD2 v-prediction)
    edit: bool = False  # trained on edit pairs (reference latents)
    frames: bool = False  # latents carry a time axis, [C, 1, h, w] (Qwen's Wan VAE), as ComfyUI's VAE gives them


_UNET = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1, 1],
             channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
             transformer_depth_middle=1, use_spatial_transformer=True,
             num_head_channels=16, num_heads=-1, legacy=False, use_temporal_attention=False,
             use_temporal_resblock=False)
_FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=64,
             mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000,
             patch_size=2, qkv_bias=True)
_QWEN = dict(image_model="qwen_image", in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
             num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(8, 12, 12))

TINY = {
    "SD15": Tiny("SD15", {**_UNET, "context_dim": 64, "use_linear_in_transformer": False}, 4, {"context": (7, 64)}),
    "SD2-v": Tiny("SD20", {**_UNET, "context_dim": 64, "use_linear_in_transformer": True}, 4, {"context": (7, 64)},
                  model_type="V_PREDICTION"),
    "SDXL": Tiny("SDXL", {**_UNET, "context_dim": 64, "use_linear_in_transformer": True, "num_classes": "sequential",
                          "adm_in_channels": 32 + 6 * 256}, 4, {"context": (7, 64), "pooled": (32,)}),
    "SD3": Tiny("SD3", dict(in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=32,
                            pos_embed_max_size=32, num_patches=1024, input_size=None, pos_embed_scaling_factor=None,
                            context_embedder_config={"target": "torch.nn.Linear",
                                                     "params": {"in_features": 64, "out_features": 128}}),
                16, {"context": (7, 64), "pooled": (32,)}),
    "FLUX.1-dev": Tiny("Flux", {**_FLUX, "guidance_embed": True}, 16, {"context": (7, 64), "pooled": (32,)}),
    "Qwen-Image": Tiny("QwenImage", _QWEN, 16, {"context": (7, 64)}, frames=True),
    "Qwen-Image-Edit": Tiny("QwenImage", _QWEN, 16, {"context": (7, 64)}, edit=True, frames=True),
}


# diffusers' kohya FLUX converter hard-codes FLUX.1's width (3072, MLP 12288): checking that a file loads there
# needs the real width, at one double and one single block (0.5 G parameters).
FLUX_FULL_WIDTH = Tiny("Flux", {**_FLUX, "guidance_embed": True, "hidden_size": 3072, "num_heads": 24,
                                "axes_dim": [16, 56, 56]}, 16, {"context": (7, 64), "pooled": (32,)})


def tiny_model(family: str | Tiny, seed: int = 0):
    """A ComfyUI MODEL (ModelPatcher) of ``family`` (a TINY key, or a spec) with random weights; ComfyUI must
    be importable."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    spec = TINY[family] if isinstance(family, str) else family
    config = getattr(comfy.supported_models, spec.config_class)(dict(spec.unet_config))
    config.set_inference_dtype(torch.float32, None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if spec.model_type is not None:  # what SD20.get_model builds, with the prediction type given
            base = comfy.model_base.BaseModel(config, model_type=getattr(comfy.model_base.ModelType, spec.model_type))
        else:
            base = config.get_model({})
        _randomize(base.diffusion_model)
    base.diffusion_model.to(torch.float32)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _randomize(module) -> None:
    """ComfyUI's ops leave weights uninitialised (checkpoints overwrite them): give layers torch's default
    init, norms ones and zeros, and every other tensor (embeddings, modulation tables) small random values.
    Output layers that real models zero-initialise get random values too, so every LoRA shows."""
    import torch

    with torch.no_grad():
        for tensor in module.state_dict(keep_vars=True).values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * 0.02)
        for sub in module.modules():
            base = next((c for c in type(sub).__mro__ if c.__module__.startswith("torch.nn")
                         and "reset_parameters" in vars(c)), None)
            if base is not None:
                base.reset_parameters(sub)
            elif "norm" in type(sub).__name__.lower():
                for name, param in sub.named_parameters(recurse=False):
                    param.fill_(1.0 if name in ("weight", "scale") else 0.0)
