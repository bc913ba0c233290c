"""LoRA training engine for diffusion denoisers. Plain Python + torch: never imports ComfyUI."""
