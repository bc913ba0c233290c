"""The one bridge from ComfyUI objects (MODEL, VAE, CLIP, progress bar, Cancel) to the engine's protocols."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import random
import sys
from collections.abc import Callable, Iterator, Sequence

import comfy.model_management as mm
import comfy.ops
import comfy.utils
import torch
import torch.overrides
import torch.utils.checkpoint
from comfy_execution.utils import get_executing_context

from ..training.batching import Batch, TrainData, stack_conditioning
from ..training.denoiser import NoiseSchedule
from ..training.loop import StepInfo
from ..training.memory import WeightOf, remakeable
from .families import Family, family_of, prediction_of

log = logging.getLogger(__name__)


class ComfyDenoiser:
    """A ComfyUI MODEL as the engine's Denoiser. Calls the diffusion model directly, so the output is the
    raw prediction (eps, v or velocity) rather than ComfyUI's denoised x0, which would divide by σ.

    The conditioning reaches the model the way ComfyUI's samplers send it: the cached text encoding
    (``context``, ``pooled``) and the edit pair's ``control`` latent go through the model's own
    ``extra_conds``, which builds SDXL's size embedding, SD3/FLUX's pooled vector, FLUX's guidance and
    Qwen-Image-Edit's reference latents. SDXL's size conditioning is the bucket's pixel size, uncropped,
    as when sampling at that size."""

    def __init__(self, model, guidance: float | None = None, family: Family | None = None,
                 budget: int | None = None, clip=None):
        self.patcher, self.budget = model, budget  # budget: device bytes for weights + step (None: what is free)
        self.clip = clip  # a CLIP trained beside it, whose weights share the budget where they share the device
        self.base = model.model
        self.module = self.base.diffusion_model
        self.device = model.load_device
        self.sampling = model.get_model_object("model_sampling")  # with ModelSampling* nodes' patches
        self.prediction = prediction_of(model)
        self.guidance = guidance  # FLUX-dev's guidance embedding while training (None: ComfyUI's default)
        # see OutOfPlaceAdds; ``family``: the caller's family_of(model), not looked up again
        self.in_place_residuals = (family or family_of(model)).in_place_residuals
        self._checkpointed: list[torch.nn.Module] = []
        self._own_forwards: list = []

    @property
    def dtype(self) -> torch.dtype:
        return self.base.manual_cast_dtype or self.base.get_dtype()

    @property
    def schedule(self) -> NoiseSchedule:
        """The model's own noise schedule, from ComfyUI's model_sampling: ᾱ_t = 1 / (1 + σ_t²) for DDPM models;
        for flow models the SD3-style shift s with σ(½) = s / (1 + s) (FLUX's model_sampling states its shift
        as log s, SD3's and Qwen's as s)."""
        if self.prediction == "flow":
            half = float(self.sampling.sigma(self.sampling.timestep(torch.tensor(0.5))))
            return NoiseSchedule(shift=half / (1 - half))
        return NoiseSchedule(alphas_cumprod=1 / (1 + self.sampling.sigmas.double() ** 2))

    def __call__(self, noisy: torch.Tensor, timestep: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        # DDPM gets its discrete t as is; flow σ becomes the model's timestep through model_sampling.
        t = self.sampling.timestep(timestep) if self.prediction == "flow" else timestep
        kwargs = self.model_inputs(noisy, cond)
        x = noisy
        if "c_concat" in kwargs:
            x = torch.cat([x, kwargs.pop("c_concat")], dim=1)
        context = kwargs.pop("c_crossattn")
        t = self.base.process_timestep(t.float(), x=noisy, **kwargs)
        training = self.in_place_residuals and torch.is_grad_enabled()
        with OutOfPlaceAdds() if training else contextlib.nullcontext():
            out = self.module(x.to(self.dtype), t, context=context, control=None, transformer_options={}, **kwargs)
        return out.float()

    def model_inputs(self, noisy: torch.Tensor, cond: dict[str, torch.Tensor]) -> dict[str, object]:
        """The keyword inputs ComfyUI's sampler would give the diffusion model for this batch."""
        height, width = (side * pixels_per_latent(self.base) for side in noisy.shape[-2:])
        params = {"noise": noisy, "device": noisy.device, "cross_attn": cond["context"], "width": width,
                  "height": height}
        params["pooled_output"] = cond.get("pooled")  # always sent by ComfyUI's sampler (0.3.75's Flux reads it)
        if "mask" in cond:  # 1 = token, 0 = padding: an integer mask, as ComfyUI's text encoders give it
            params["attention_mask"] = cond["mask"].round().long()
        if "control" in cond:
            params["reference_latents"] = [cond["control"]]
        if self.guidance is not None:
            params["guidance"] = self.guidance
        conds = self.base.extra_conds(**params)
        return {name: _to(c.process_cond(batch_size=noisy.shape[0], device=noisy.device, area=None).cond,
                          self.dtype, noisy.device) for name, c in conds.items()}

    def memory_free(self) -> int | None:
        """Device bytes the training step may use: the budget less the weights ComfyUI keeps on the device, or
        without one what the device has free. None on the CPU without a budget (nothing to fit)."""
        if self.budget is not None:
            return self.budget - self.patcher.loaded_size() - device_bytes(self.clip, self.device)
        return None if self.device.type == "cpu" else mm.get_free_memory(self.device)

    def offload(self, nbytes: int) -> int:
        """Move at least ``nbytes`` of frozen weights to CPU memory with ComfyUI's own partial unloading; those
        layers then fetch their weights per call (streamed ahead on ComfyUI's offload streams), and training
        fetches them again for the backward pass (``frozen_layers``). Returns the bytes moved."""
        return self.patcher.partially_unload(self.patcher.offload_device, nbytes)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations during the backward pass instead of keeping them. The blocks are
        the members of the diffusion model's top-level ModuleLists (UNet input/output blocks, DiT blocks), in
        every family; the wrapper is an instance attribute, removed again when turned off."""
        if enabled and not self._checkpointed:
            lists = [child for child in self.module.children() if isinstance(child, torch.nn.ModuleList)]
            # UNet blocks are Sequentials whose layers ComfyUI calls one by one: checkpoint those layers
            self._checkpointed = [layer for blocks in lists for block in blocks
                                  for layer in (block if isinstance(block, torch.nn.Sequential) else [block])]
            self._own_forwards = [vars(block).get("forward") for block in self._checkpointed]  # e.g. remade_weights'
            for block in self._checkpointed:
                forward = _out_of_place(block.forward) if self.in_place_residuals else block.forward
                block.forward = functools.partial(torch.utils.checkpoint.checkpoint, forward, use_reentrant=False)
        elif not enabled:
            for block, own in zip(self._checkpointed, self._own_forwards):
                del block.forward
                if own is not None:
                    block.forward = own
            self._checkpointed = []


IN_PLACE_ADD = torch.Tensor.add_  # what ``a += b`` dispatches to
FLUX_CODE = os.path.join("comfy", "ldm", "flux", "")
CLIP_CODE = os.path.join("comfy", "clip_model.py")
IN_PLACE_CODE = (FLUX_CODE, CLIP_CODE)


class OutOfPlaceAdds(torch.overrides.TorchFunctionMode):
    """ComfyUI's FLUX blocks and CLIP layers add residuals in place (``x += ...``): fine for sampling, but autograd
    needs the ``x`` their LayerNorm saved, and gradient checkpointing needs block inputs unchanged to recompute
    them. While training, ``x += y`` written in that code becomes ``x + y``; Python rebinds the name to the
    result, so the block computes the same values. In-place adds anywhere else (where a statement ``a.add_(b)``
    relies on mutation) are untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is IN_PLACE_ADD:
            caller = sys._getframe(1).f_code.co_filename  # the frame that wrote ``+=``
            if any(code in caller for code in IN_PLACE_CODE):
                return torch.add(args[0], args[1])
        return func(*args, **(kwargs or {}))


def _out_of_place(forward):
    """``forward`` under OutOfPlaceAdds also when gradient checkpointing recomputes it in the backward pass."""
    @functools.wraps(forward)
    def run(*args, **kwargs):
        with OutOfPlaceAdds():
            return forward(*args, **kwargs)

    return run


def pixels_per_latent(base) -> int:
    """Image pixels per latent pixel for ComfyUI's model ``base``: 8 for most, 16 for FLUX.2 (its latent format says;
    older hosts' formats do not, and their models are all 8)."""
    return getattr(base.latent_format, "spacial_downscale_ratio", 8)


def _to(value, dtype: torch.dtype, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else None)
    if isinstance(value, list):
        return [_to(v, dtype, device) for v in value]
    return value


class LatentsIn:
    """Cached latents are the VAE's raw output (like ComfyUI's LATENT); the model trains on them after
    its own ``process_latent_in`` (SD1: × 0.18215), as ComfyUI's samplers do."""

    def __init__(self, data: TrainData, model):
        self.data, self.base = data, model.model
        self.sizes = data.sizes

    def collate(self, indices: Sequence[int], rng: random.Random) -> Batch:
        batch = self.data.collate(indices, rng)
        return dataclasses.replace(batch, latents=self.base.process_latent_in(batch.latents))


class ComfyEncoders:
    """ComfyUI's VAE and CLIP as the cache's Encoders: text goes through the CLIP object the way
    CLIPTextEncode does, so every family's extras (pooled output, masks) come along."""

    def __init__(self, vae, clip):
        self.vae, self.clip = vae, clip
        self.latent_multiple = int(vae.spacial_compression_encode())
        self.identity = fingerprint(vae.first_stage_model, clip.cond_stage_model,
                                    extra=f"layer={clip.layer_idx};patches={len(clip.patcher.patches)}")

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(_comfy_image(pixels))[0].float().cpu()

    def encode_text(self, caption: str, image: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        # an edit pair's control image reaches vision-language encoders as TextEncodeQwenImageEdit sends it
        tokens = self.clip.tokenize(caption, images=[_comfy_image(image)]) if image is not None else \
            self.clip.tokenize(caption)
        (context, extras), *_ = self.clip.encode_from_tokens_scheduled(tokens, show_pbar=False)
        return {key: value.cpu() for key, value in text_conditioning(context, extras).items()}

    def release(self) -> None:
        """Take the VAE and text encoder off the GPU: training needs the memory."""
        unload(self.vae.patcher, self.clip.patcher)


# CLIP layers that get a text-encoder adapter, per Train LoRA targets preset (kohya trains all six)
CLIP_TARGETS = {"attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")}
CLIP_TARGETS["attention+mlp"] = CLIP_TARGETS["all-linear"] = (*CLIP_TARGETS["attention"], "mlp.fc1", "mlp.fc2")


class ComfyTextEncoder:
    """A ComfyUI CLIP as the engine's TextEncoder: captions tokenized as CLIPTextEncode does (prompt weights
    included) and encoded as ``CLIP.encode_from_tokens`` does (clip skip included), through the adapter the loop
    attaches to ``cond_stage_model``, with gradients. Not through ``encode_from_tokens`` itself: it loads the CLIP
    onto the GPU on every call, which may unload the model being trained (load_for_training loads both once)."""

    def __init__(self, clip, preset: str):
        self.clip, self.module = clip, clip.cond_stage_model
        self.device = clip.patcher.load_device
        self.targets = CLIP_TARGETS[preset]
        self._tokens: dict[str, dict] = {}

    def encode(self, caption: str) -> tuple[torch.Tensor, dict]:
        """(context [1, L, D], extras: ``pooled_output`` and what else the encoder adds) of one caption, as
        ``encode_from_tokens(..., return_dict=True)`` gives them."""
        if caption not in self._tokens:
            self._tokens[caption] = self.clip.tokenize(caption)
        model = self.module
        model.reset_clip_options()
        if self.clip.layer_idx is not None:
            model.set_clip_options({"layer": self.clip.layer_idx})
        model.set_clip_options({"execution_device": self.device})  # 0.33 reads it; 0.3.75 uses the weights' device
        device_context = getattr(mm, "cuda_device_context", lambda device: contextlib.nullcontext())
        # the CLIP computes in fp32 whatever the autocast of the step around it (CLIP-G overflows in fp16)
        with OutOfPlaceAdds(), torch.autocast(self.device.type, enabled=False), device_context(self.device):
            out = model.encode_token_weights(self._tokens[caption])
        return out[0], {"pooled_output": out[1], **(out[2] if len(out) > 2 else {})}

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return stack_conditioning([text_conditioning(*self.encode(caption)) for caption in captions])

    def conditioning(self, prompt: str) -> list:
        """``prompt`` as ComfyUI's CONDITIONING, through the adapter as trained so far (Training Samples)."""
        return [list(self.encode(prompt))]


def text_conditioning(context: torch.Tensor, extras: dict) -> dict[str, torch.Tensor]:
    """One caption's encoding as ComfyUI gives it (context [1, L, D] and its extras) as the engine's conditioning:
    ``context`` [L, D] in fp32, ``pooled``, ``mask`` and any other tensor the encoder adds."""
    out = {"context": context[0].float()}
    for key, value in extras.items():
        if isinstance(value, torch.Tensor):
            out[{"pooled_output": "pooled", "attention_mask": "mask"}.get(key, key)] = value[0]
    return out


def _comfy_image(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> ComfyUI's IMAGE: [B, H, W, 3] in [0, 1]."""
    return ((pixels + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


# ComfyUI leaves CLIP-L's text projection uninitialised when a checkpoint has none (SD1.x): its values differ
# from one load to the next, and they do not reach an SD1 model. Every other weight identifies the encoder.
UNLOADED_IN_SOME_CHECKPOINTS = ("text_projection.weight",)


def fingerprint(*modules: torch.nn.Module, extra: str = "") -> str:
    """A cheap identity for encoder weights: class, names, shapes, dtypes and the first values of each tensor."""
    h = hashlib.sha256(extra.encode())
    for module in modules:
        h.update(type(module).__name__.encode())
        for name, tensor in module.state_dict().items():
            if name.endswith(UNLOADED_IN_SOME_CHECKPOINTS):
                continue
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            if tensor.numel():
                h.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def frozen_layers(module: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, WeightOf, Callable[[], bool]]]:
    """ComfyUI's Linear and Conv2d layers of ``module`` as ``training.memory.remade_weights`` takes them: the
    weight comes from ComfyUI's own ``cast_bias_weight`` (fp8 upcast, scaled-fp8 and quantised formats
    dequantised, an offloaded weight fetched from CPU memory, LoRA patches from LoraLoader applied), while
    the layer casts at all. Weights stored in a form that cannot be cast are refused by layer name."""
    for name, layer in module.named_modules():
        if not isinstance(layer, comfy.ops.CastWeightBiasOp) or not remakeable(layer):
            continue
        weight = layer.weight
        if weight is not None and not (weight.is_floating_point() or _quantized(weight)):
            raise TypeError(f"layer {name} stores its weight as {type(weight).__name__} of {weight.dtype}, which "
                            "training cannot compute gradients through; load the model with ComfyUI's own loader "
                            "(Load Diffusion Model or Load Checkpoint) as bf16, fp16 or fp8 instead")
        yield layer, functools.partial(_cast_weight, layer), functools.partial(_casts, layer)


def _quantized(tensor: torch.Tensor) -> bool:
    """ComfyUI's QuantizedTensor (0.33+: its mixed-precision layers' scaled fp8 and other quantised weights)."""
    return type(tensor).__name__ == "QuantizedTensor"


def _casts(layer: torch.nn.Module) -> bool:
    """Whether ComfyUI makes this layer's weight per call (manual cast, quantised, offloaded, patched)."""
    return bool(layer.comfy_cast_weights or layer.weight_function or layer.bias_function or hasattr(layer, "_v")
                or _quantized(layer.weight))


@contextlib.contextmanager
def _cast_weight(layer: torch.nn.Module, like: torch.Tensor) -> Iterator[torch.Tensor]:
    """The weight the layer's forward multiplies by, in ``like``'s dtype and device. Scaled-fp8 layers of
    0.3.75 multiply their scale in after the cast (their ``convert_weight`` does the same); a quantised layer
    with a ``pre_quant_scale`` (AWQ) scales its input by it, which is its weight's columns scaled."""
    weight, bias, stream = comfy.ops.cast_bias_weight(layer, like, offloadable=True)
    try:
        convert = getattr(layer, "convert_weight", None)
        made = weight if convert is None else convert(weight).to(like.dtype)
        pre_scale = getattr(layer, "pre_quant_scale", None)
        yield made if pre_scale is None else made * pre_scale.to(made)
    finally:
        comfy.ops.uncast_bias_weight(layer, weight, bias, stream)


def unload(*patchers) -> None:
    loaded = mm.current_loaded_models
    for i in reversed(range(len(loaded))):
        if loaded[i].model in patchers:
            loaded[i].model_unload()
            loaded.pop(i)
    mm.soft_empty_cache()


def load_for_training(model, budget: int | None = None, clip=None) -> None:
    """Load the MODEL (and a CLIP whose text encoder trains too) onto the compute device the way ComfyUI does for
    sampling, with weights that autograd may use. ComfyUI loads what fits the free memory (or ``budget`` bytes,
    the CLIP's weights counted); what it leaves in CPU memory is cast per call. The training loop then fits its
    step (ComfyDenoiser.memory_free/offload)."""
    mm.load_models_gpu([model] + ([clip.patcher] if clip is not None else []))
    loaded = model.loaded_size() + device_bytes(clip, model.load_device)
    if budget is not None and loaded > budget:
        model.partially_unload(model.offload_device, loaded - budget)
    leave_inference_mode(model.model.diffusion_model)
    if clip is not None:
        leave_inference_mode(clip.cond_stage_model)


def device_bytes(clip, device: torch.device) -> int:
    """The bytes of ``clip``'s weights loaded on ``device`` (ComfyUI keeps a text encoder on the CPU in low-VRAM
    modes); 0 without a CLIP."""
    return clip.patcher.loaded_size() if clip is not None and clip.patcher.load_device == device else 0


@contextlib.contextmanager
def training_mode() -> Iterator[None]:
    """ComfyUI's training mode while the loop runs: ``model_management.in_training``, which core's trainer sets
    too. Hosts that have it (0.33+) route kernels without a backward pass (comfy_kitchen's RoPE for FLUX and
    Qwen-Image) to plain torch while it is on. The previous value comes back however the loop ends; hosts
    without the flag (0.3.75) train as they are."""
    if not hasattr(mm, "in_training"):
        yield
        return
    previous, mm.in_training = mm.in_training, True
    try:
        yield
    finally:
        mm.in_training = previous


def leave_inference_mode(module: torch.nn.Module) -> None:
    """ComfyUI loads weights inside ``torch.inference_mode``; autograd refuses to save such tensors for the
    backward pass. Swap each for an ordinary copy of the same values, one at a time (peak memory: one
    tensor), so outputs stay bit-for-bit the same and later runs find nothing left to do.

    Quantised weights stay as they are: training only reads them (frozen_layers remakes them for the backward
    pass), and 0.33's own loading, which runs in inference mode, cannot re-wrap one that is not an inference
    tensor ("Cannot set version_counter"), so sampling after training would fail."""
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and param.is_inference() and not _quantized(param):
                    sub._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=param.requires_grad)
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None and buffer.is_inference():
                    sub._buffers[name] = buffer.clone()


PROGRESS_EVENT = "lora_trainer.progress"


class Progress:
    """Engine callbacks -> ComfyUI's progress bar (websocket ``progress``), a status line on the node, and
    Cancel: the interrupt flag is read before every step (ComfyUI's layers may also raise it mid-step;
    the loop treats that as the same stop)."""

    def __init__(self, total: int):
        context = get_executing_context()  # the running node (none when called outside a prompt)
        self.node_id = context.node_id if context is not None else None
        self.bar = comfy.utils.ProgressBar(total, node_id=self.node_id)
        self.interrupted = False

    def should_stop(self) -> bool:
        self.interrupted = self.interrupted or mm.processing_interrupted()
        return self.interrupted

    def on_step(self, info: StepInfo) -> None:
        if self.should_stop():
            return
        self.bar.update_absolute(info.step, info.total)  # its hook may raise the interrupt: the loop stops
        self.text(status_line(info))
        if info.logged:  # a new logging interval: a point of the chart
            self.event(step=info.step, total=info.total, loss=info.loss, smoothed=info.smoothed_loss)

    def show(self, image, step: int) -> None:
        """A PIL image made after ``step`` on the node (ComfyUI's live preview, as its sampler sends; at most 512
        pixels), and the step marked on the live chart."""
        self.bar.update_absolute(step, preview=("JPEG", image, 512))
        self.event(step=step, total=self.bar.total, sample=True)

    def event(self, **data) -> None:
        """``lora_trainer.progress`` to the client that queued the prompt: the pack's frontend draws the live loss
        chart from it (web/lora_trainer.js)."""
        server = _prompt_server()
        if server is not None and self.node_id is not None:
            server.send_sync(PROGRESS_EVENT, {"node": self.node_id, **data}, getattr(server, "client_id", None))

    def text(self, message: str) -> None:
        """A status line on the node, sent only to the client that queued the prompt (as ComfyUI sends its own
        progress events; a prompt queued without a client id reaches every client)."""
        server = _prompt_server()
        if server is not None and self.node_id is not None:
            server.send_progress_text(message, self.node_id, getattr(server, "client_id", None))


def status_line(info: StepInfo) -> str:
    """One short line (the node is narrow; the frontend wraps anywhere, even inside a number): step, loss, speed."""
    loss = "…" if info.loss is None else f"{info.loss:.4f} (avg {info.smoothed_loss:.4f})"
    eta = "" if info.eta_s == float("inf") else f" · ETA {info.eta_s:.0f}s"
    return f"step {info.step}/{info.total} · loss {loss} · {info.it_per_s:.2f} it/s{eta}"


def _prompt_server():
    try:
        import server
    except ImportError:
        return None
    return getattr(server.PromptServer, "instance", None)


def interrupt_now() -> None:
    """End the prompt the way ComfyUI's Cancel does, after our own clean-up. (The flag itself may already be
    consumed: ComfyUI's progress hook resets it when it raises.)"""
    raise mm.InterruptProcessingException()


def checkpoint_name(model) -> str:
    """The file name of the checkpoint or diffusion model the MODEL was loaded from; "" where the host cannot tell.

    ComfyUI 0.33's loaders (CheckpointLoaderSimple, UNETLoader) record how to load the model again in
    ``ModelPatcher.cached_patcher_init``, ``(loader, (path, ...)[, index])``, which clones carry along. 0.3.75
    keeps no trace of the file, nor do models made in a graph; their LoRAs name the model family instead
    (``metadata_for``)."""
    init = getattr(model, "cached_patcher_init", None)
    arguments = init[1] if isinstance(init, tuple) and len(init) > 1 else None
    if not isinstance(arguments, tuple) or not arguments or not isinstance(arguments[0], str | os.PathLike):
        return ""
    return os.path.basename(os.fspath(arguments[0]))
