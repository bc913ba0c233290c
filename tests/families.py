"""What each family's saved LoRA must be, shared by the in-process and the server tests."""

# family: objective, ss_base_model_version, modelspec.architecture, first key of the file
EXPECTED = {
    "SD15": ("ddpm-eps", "sd_v1", "stable-diffusion-v1/lora", "lora_unet_down_blocks_0_attentions_0_"),
    "SD2-v": ("ddpm-v", "sd_v2", "stable-diffusion-v2-768-v/lora", "lora_unet_down_blocks_0_attentions_0_"),
    "SDXL": ("ddpm-eps", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "lora_unet_input_blocks_1_1_"),
    "SD3": ("flow", "sd3", "stable-diffusion-v3-medium/lora", "lora_unet_joint_blocks_0_context_block_attn_"),
    "FLUX.1-dev": ("flow", "flux1", "flux-1-dev/lora", "lora_unet_double_blocks_0_img_attn_"),
    "Qwen-Image": ("flow", "qwen_image", "Qwen-Image/lora", "diffusion_model.transformer_blocks.0.attn."),
    "Qwen-Image-Edit": ("flow", "qwen_image_edit", "Qwen-Image-Edit/lora",
                        "diffusion_model.transformer_blocks.0.attn."),
    "Chroma": ("flow", "chroma", "chroma/lora", "lora_unet_double_blocks_0_img_attn_"),
    "Z-Image": ("flow", "z_image", "Z-Image/lora", "lora_unet_layers_0_attention_"),
    "FLUX.2": ("flow", "flux2", "flux-2-dev/lora", "lora_unet_double_blocks_0_img_attn_"),
}
