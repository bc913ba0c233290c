"""The training loop: ``train(config, denoiser, data, on_step=..., should_stop=...) -> TrainResult``.

Read top to bottom: attach LoRA, build optimizer and schedule, maybe resume, then for each optimizer
step run ``grad_accum`` micro-batches (noise -> predict -> weighted MSE -> backward), clip, step,
report, checkpoint. The adapters always come off the model at the end, whatever happened.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from diffusers.training_utils import EMAModel

from .batching import Batch, TrainData
from .buckets import plan_batches
from .checkpoint import TrainState, load_checkpoint, save_checkpoint
from .config import DTYPES, TrainConfig
from .denoiser import TEXT_KEYS, Denoiser, NoiseSchedule, TextEncoder
from .lora import TEXT_ENCODER, Adapters, LoraAttachment, LoraTensors, split_layers
from .memory import saved_bytes
from .objectives import DDPMObjective, FlowObjective, denoising_loss, make_objective
from .optim import make_optimizer, make_schedule

log = logging.getLogger(__name__)
EMA_DECAY = 0.9  # smoothing of the reported loss, per logging interval
PROBE_IMAGES, PROBE_DRAWS = 8, 2  # the probe: the run's first training images, each at fixed (noise, timestep) draws
PROBE_SEED = 0x9E0BE


@dataclass(frozen=True)
class StepInfo:
    step: int
    total: int
    loss: float | None  # mean over the last logging interval; None before the first
    smoothed_loss: float | None
    lr: float
    it_per_s: float
    eta_s: float
    logged: bool = False  # this step ended a logging interval: ``loss`` is new


@dataclass
class TrainResult:
    lora: dict[str, LoraTensors]
    steps_done: int
    cancelled: bool
    config: TrainConfig  # as trained: objective, shift and precision resolved for the model
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss of the interval)
    data_wait_s: float = 0.0  # time the loop waited for batches
    gradient_checkpointing: bool = False  # whether it ended up on (auto turns it on after running out of memory)
    first_step: int = 0  # the step it started from (a resumed run's checkpoint)
    train_s: float = 0.0  # time spent training, sampling left out
    sample_steps: list[int] = field(default_factory=list)  # the steps ``sample`` ran after (0: before the first)
    sampling_s: float = 0.0  # time spent in ``sample``
    probe: list[tuple[int, float]] = field(default_factory=list)  # (step, probe loss): at the first step and the last
    probe_images: int = 0  # how many training images the probe measures

    @property
    def probe_drop(self) -> float | None:
        """How much the probe loss fell over the run, as a fraction of where it started."""
        if len(self.probe) < 2 or not self.probe[0][1]:
            return None
        return 1 - self.probe[-1][1] / self.probe[0][1]

    @property
    def objective(self) -> str:
        return self.config.objective


class TrainingFailed(RuntimeError):
    """The run failed after at least one completed step; ``result`` holds the adapter trained so far, for the
    caller to keep. The original error is its ``__cause__``."""

    def __init__(self, message: str, result: TrainResult):
        super().__init__(message)
        self.result = result


class TrainingDiverged(TrainingFailed):
    """The loss became NaN/inf; ``result`` holds the adapter from the last good check."""


def objective_for(config: TrainConfig, schedule: NoiseSchedule = NoiseSchedule()) -> DDPMObjective | FlowObjective:
    """The objective of a resolved config (``TrainConfig.for_model``) on a model with ``schedule``."""
    if config.objective == "flow":
        return make_objective("flow", sampling=config.timestep_sampling, logit_mean=config.logit_mean,
                              logit_std=config.logit_std, mode_scale=config.mode_scale,
                              shift=config.shift or schedule.shift, dynamic_shift=config.dynamic_shift,
                              weighting=config.loss_weighting)
    return make_objective(config.objective, min_snr_gamma=config.min_snr_gamma, noise_offset=config.noise_offset,
                          alphas_cumprod=schedule.alphas_cumprod)


class BatchStream:
    """Micro-batch ``n`` of the run, the same on every run with this seed: bucketed epochs, each
    shuffled from (seed, epoch), so a resumed run continues with the very batch it would have seen.
    The next batch is prepared on a worker thread while the current one trains."""

    def __init__(self, data: TrainData, batch_size: int, seed: int, device: torch.device,
                 dtype: torch.dtype | None):
        self.data, self.batch_size, self.seed, self.device, self.dtype = data, batch_size, seed, device, dtype
        self.per_epoch = len(plan_batches(data.sizes, batch_size, seed, 0))
        self._plans: dict[int, list[list[int]]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-data")
        self._next: tuple[int, Future[Batch]] | None = None
        self.wait_s = 0.0  # time the loop spent waiting for data

    def indices(self, position: int) -> list[int]:
        epoch, index = divmod(position, self.per_epoch)
        if epoch not in self._plans:
            self._plans = {epoch: plan_batches(self.data.sizes, self.batch_size, self.seed, epoch)}
        return self._plans[epoch][index]

    def largest(self) -> Batch:
        """A batch of the run's largest bucket (the most memory a step needs)."""
        area = [h * w for h, w in self.data.sizes]
        index = area.index(max(area))
        return self.data.collate([index] * self.batch_size, random.Random(self.seed)).to(self.device, self.dtype)

    def collated(self, position: int) -> Batch:
        """Micro-batch ``position`` where the data keeps it (CPU memory)."""
        return self.data.collate(self.indices(position), random.Random(f"{self.seed}:{position}"))

    def _load(self, position: int) -> Batch:
        return self.collated(position).to(self.device, self.dtype)

    def get(self, position: int) -> Batch:
        started = time.perf_counter()
        if self._next is not None and self._next[0] == position:
            batch = self._next[1].result()
        else:
            batch = self._load(position)
        self.wait_s += time.perf_counter() - started
        self._next = (position + 1, self._pool.submit(self._load, position + 1))
        return batch

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def train(
    config: TrainConfig,
    denoiser: Denoiser,
    data: TrainData,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume_from: str | None = None,
    initial_lora: dict[str, LoraTensors] | None = None,
    interrupts: tuple[type[BaseException], ...] = (),
    sample: Callable[[int], None] | None = None,
    sample_every: int = 0,
    text_encoder: TextEncoder | None = None,
) -> TrainResult:
    """Train a LoRA on ``denoiser`` and return it; the model is left as it came. The config's ``auto`` settings
    become the model's own (``TrainConfig.for_model``); the result holds the config as trained.

    ``should_stop`` is polled before every step; ``interrupts`` are exception types that the host may
    raise from inside a step (ComfyUI's Cancel does, from its layers): both end the run early with
    ``cancelled`` set and the adapter of the last completed step.

    ``sample(step)`` runs before the first step of a fresh run, every ``sample_every`` steps and after the last, with
    the adapter as trained so far: the model in eval mode, no gradients, and the RNG state restored afterwards (the
    run stays as it would be without it). Its time is reported apart from the training time.

    ``result.probe`` holds the denoising loss of the run's first training images at fixed noise and timesteps
    (``probe_loss``), measured before the first step and after the last: the same draws both times, so its fall is
    what the adapter learned, which the per-step loss (new noise every step) blurs.

    With ``config.te_learning_rate``, ``text_encoder`` gets an adapter of the same kind, rank and alpha (its layers
    named TEXT_ENCODER + path in the result) that trains at that rate, until ``config.te_stop_step``; the batches'
    captions are then encoded every step and replace the cached text conditioning.
    """
    module = denoiser.module
    weight = next(module.parameters())
    device = getattr(denoiser, "device", weight.device)  # where it computes (some weights may be offloaded)
    schedule = getattr(denoiser, "schedule", NoiseSchedule())
    config = config.for_model(denoiser.prediction, schedule, getattr(denoiser, "dtype", weight.dtype))
    objective = objective_for(config, schedule)
    devices = [device.index or 0] if device.type == "cuda" else []
    if config.te_learning_rate and text_encoder is None:
        raise ValueError("te_learning_rate is set but there is no text encoder to train: connect the CLIP, or set "
                         "te_learning_rate to 0")
    text_encoder = text_encoder if config.te_learning_rate else None
    modules = [module] + ([text_encoder.module] if text_encoder else [])
    was_training = [m.training for m in modules]
    initial = split_layers(initial_lora or {}, ("", TEXT_ENCODER) if text_encoder else ("",))
    with torch.random.fork_rng(devices=devices):  # the host's global RNG is left as it was
        torch.manual_seed(config.seed)  # LoRA init and dropout follow the seed
        settings = dict(rank=config.rank, alpha=config.lora_alpha, kind=config.adapter, dropout=config.lora_dropout,
                        init=config.lora_init)
        adapters = Adapters({"": LoraAttachment(module, config.targets, **settings, initial=initial.get(""),
                                                  device=device)})
        stream = BatchStream(data, config.batch_size, config.seed, device, dtype=None)
        try:
            if text_encoder:
                adapters.parts[TEXT_ENCODER] = LoraAttachment(
                    text_encoder.module, text_encoder.targets, **settings, initial=initial.get(TEXT_ENCODER),
                    device=text_encoder.device)
            return _run(config, denoiser, objective, adapters, stream, device, on_step, should_stop,
                        resume_from, interrupts, Sampling(sample, sample_every, device), text_encoder)
        finally:
            stream.close()
            adapters.remove()
            _set_gradient_checkpointing(denoiser, False)
            for m, mode in zip(modules, was_training):
                m.train(mode)


def _run(config: TrainConfig, denoiser: Denoiser, objective: DDPMObjective | FlowObjective,
         adapters: Adapters, stream: BatchStream, device: torch.device,
         on_step: Callable[[StepInfo], None] | None, should_stop: Callable[[], bool] | None,
         resume_from: str | None, interrupts: tuple[type[BaseException], ...], sampling: Sampling,
         text_encoder: TextEncoder | None) -> TrainResult:
    params = adapters.parameters()
    optimizer = make_optimizer(config.optimizer, adapters.parameter_groups({TEXT_ENCODER: config.te_learning_rate}),
                               config.learning_rate, config.weight_decay)
    schedule = make_schedule(config.lr_schedule, optimizer, warmup_steps=config.warmup_steps,
                             total_steps=config.steps, cycles=config.lr_cycles)
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    ema = (EMAModel(params, decay=config.ema_decay, update_after_step=config.ema_start, foreach=True)
           if config.ema_decay else None)
    step, position, smoothed = 0, 0, None
    if resume_from:
        lora, state = load_checkpoint(resume_from, config, sorted(adapters.layers))
        adapters.load(lora)
        optimizer.load_state_dict(state.optimizer)
        schedule.load_state_dict(state.schedule)
        if scaler is not None and state.scaler:
            scaler.load_state_dict(state.scaler)
        _set_rng(state.rng, device)
        if ema is not None:
            ema.load_state_dict(state.ema)
            ema.shadow_params = [s.to(p.device) for s, p in zip(ema.shadow_params, params)]  # a text encoder's: its own
        step, position, smoothed = state.step, state.position, state.smoothed_loss
        log.info("resumed from step %d (%s)", step, resume_from)
    checkpointing = _fit_memory(config, denoiser, objective, stream, position, params, text_encoder)
    modules = [denoiser.module] + ([text_encoder.module] if text_encoder else [])
    for module in modules:
        module.train()

    result = TrainResult(adapters.tensors(), step, False, config, first_step=step)
    good = [p.detach().clone() for p in params]  # last adapter known finite, for the NaN guard
    loss_sum = torch.zeros((), device=device)
    probes = _probe_batches(stream)
    result.probe_images = sum(batch.latents.shape[0] for batch in probes)
    result.probe.append((step, probe_loss(config, denoiser, objective, probes, device=device,
                                          text=text_encoder)))  # not in train_s
    interval_steps, interval_start, started = 0, time.perf_counter(), time.perf_counter()
    it_per_s = 0.0
    try:
        if step == 0 and sampling.due(0, config.steps):
            interval_start += sampling(0, modules, result)
        while step < config.steps:
            if should_stop is not None and should_stop():
                result.cancelled = True
                break
            try:
                loss_sum += _accumulate_gradients(config, denoiser, objective, stream, position, scaler,
                                                  _text_at(step, config, text_encoder))
            except interrupts:
                optimizer.zero_grad(set_to_none=True)  # the half-done step is dropped
                result.cancelled = True
                break
            except torch.OutOfMemoryError:
                can_retry = config.gradient_checkpointing == "auto" and hasattr(denoiser, "set_gradient_checkpointing")
                if checkpointing or not can_retry:
                    raise
                optimizer.zero_grad(set_to_none=True)  # the step is redone, same batch and noise, with less memory
                checkpointing = True
                _set_gradient_checkpointing(denoiser, True)
                _free_device_memory(device)
                log.warning("step %d ran out of memory; gradient checkpointing is now on", step + 1)
                continue
            position += config.grad_accum
            if scaler:
                scaler.unscale_(optimizer)
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(params)
            step += 1
            interval_steps += 1

            at_checkpoint = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
            if step % config.log_every == 0 or step == config.steps or at_checkpoint:
                mean = (loss_sum / interval_steps).item()  # note: the one host-device sync per interval
                if not math.isfinite(mean):
                    _restore(params, good)
                    result.lora, result.steps_done = adapters.tensors(), step - interval_steps
                    raise TrainingDiverged(
                        f"Loss became {mean} between steps {step - interval_steps} and {step}; kept the adapter "
                        f"of step {result.steps_done}. Lower the learning rate or use fp32/bf16.", result)
                good = [p.detach().clone() for p in params]
                smoothed = mean if smoothed is None else EMA_DECAY * smoothed + (1 - EMA_DECAY) * mean
                result.losses.append((step, mean))
                now = time.perf_counter()
                it_per_s = interval_steps / max(now - interval_start, 1e-9)
                loss_sum.zero_()
                interval_steps, interval_start = 0, now
            result.steps_done = step
            if at_checkpoint:
                state = TrainState(step, position, optimizer.state_dict(), schedule.state_dict(),
                                   scaler.state_dict() if scaler else None, _get_rng(device), smoothed,
                                   config.to_dict(), config.trajectory_hash(), ema.state_dict() if ema else None)
                save_checkpoint(config.checkpoint_dir, adapters.tensors(), state, config.keep_checkpoints)
            if sampling.due(step, config.steps):
                try:
                    interval_start += sampling(step, modules, result)
                except interrupts:
                    result.cancelled = True
                    break
            if on_step is not None:
                last = result.losses[-1][1] if result.losses else None
                eta = (config.steps - step) / it_per_s if it_per_s else math.inf
                try:
                    on_step(StepInfo(step, config.steps, last, smoothed, schedule.get_last_lr()[0], it_per_s, eta,
                                     logged=bool(result.losses) and result.losses[-1][0] == step))
                except interrupts:
                    result.cancelled = True
                    break
    except Exception as error:  # keep what the completed steps learned; Cancel is handled above
        if isinstance(error, TrainingFailed) or result.steps_done == 0:
            raise
        result.lora = _output(adapters, ema)
        raise TrainingFailed(f"{type(error).__name__} after step {result.steps_done}: {error}", result) from error
    result.lora = _output(adapters, ema)  # the final probe measures it
    result.data_wait_s = stream.wait_s
    result.gradient_checkpointing = checkpointing
    result.train_s = time.perf_counter() - started - result.sampling_s
    if step > result.first_step and not result.cancelled:
        try:
            result.probe.append((step, probe_loss(config, denoiser, objective, probes, device=device,
                                                  text=text_encoder)))
        except interrupts:  # Cancel while measuring: the trained adapter is kept, the measurement dropped
            result.cancelled = True
    log.info("trained %d steps in %.1fs; waited %.1f%% of the time for data", step - result.first_step, result.train_s,
             100 * stream.wait_s / max(result.train_s, 1e-9))
    return result


@dataclass
class Sampling:
    """``train``'s ``sample`` callback and when it runs."""

    sample: Callable[[int], None] | None
    every: int
    device: torch.device

    def due(self, step: int, total: int) -> bool:
        return self.sample is not None and (step in (0, total) or (self.every > 0 and step % self.every == 0))

    def __call__(self, step: int, modules: Sequence[torch.nn.Module], result: TrainResult) -> float:
        """Run the callback after ``step``; returns the seconds it took, also added to ``result.sampling_s``."""
        started = time.perf_counter()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), _evaluating(modules):  # samplers seed the RNG
            self.sample(step)
        result.sample_steps.append(step)
        took = time.perf_counter() - started
        result.sampling_s += took
        return took


def _probe_batches(stream: BatchStream) -> list[Batch]:
    """The first epoch's first batches, up to PROBE_IMAGES images: what the probe measures. They wait in CPU memory
    (text conditioning can be megabytes an image), not on the device the training needs."""
    batches, images = [], 0
    for position in range(stream.per_epoch):
        if images >= PROBE_IMAGES:
            break
        batches.append(stream.collated(position))
        images += batches[-1].latents.shape[0]
    return batches


def probe_loss(config: TrainConfig, denoiser: Denoiser, objective: DDPMObjective | FlowObjective,
               batches: Sequence[Batch], draws: int = PROBE_DRAWS, device: torch.device | None = None,
               text: TextEncoder | None = None) -> float:
    """The mean weighted denoising loss of ``batches`` (moved to ``device`` one at a time, if given) at ``draws``
    (noise, timestep) draws each, the same draws on every call: the model (and ``text``, the text encoder that
    encodes the captions, if given) in eval mode (no LoRA dropout), no gradients."""
    modules = [denoiser.module] + ([text.module] if text else [])
    with torch.no_grad(), _evaluating(modules):
        losses = [_loss(config, denoiser, objective, batch if device is None else batch.to(device),
                        PROBE_SEED + 1000 * index + draw, text)
                  for index, batch in enumerate(batches) for draw in range(draws)]
    return torch.stack(losses).mean().item()


@contextlib.contextmanager
def _evaluating(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """``modules`` in eval mode (no LoRA dropout) for the block, then in the modes they had."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _text_at(step: int, config: TrainConfig, text_encoder: TextEncoder | None) -> TextEncoder | None:
    """What encodes the captions of step ``step + 1``: the text encoder, frozen (no gradients) after
    ``te_stop_step``."""
    if text_encoder is None or not config.te_stop_step or step < config.te_stop_step:
        return text_encoder
    return _frozen(text_encoder)


def _frozen(text_encoder: TextEncoder) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad(), _evaluating([text_encoder.module]):  # no LoRA dropout either
            return text_encoder(captions)

    return encode


def _accumulate_gradients(config: TrainConfig, denoiser: Denoiser, objective: DDPMObjective | FlowObjective,
                          stream: BatchStream, position: int, scaler: torch.amp.GradScaler | None,
                          text: Callable[[list[str]], dict] | None = None) -> torch.Tensor:
    """Forward + backward of ``grad_accum`` micro-batches from ``position`` on; returns their summed loss."""
    total = 0.0
    for micro in range(position, position + config.grad_accum):
        loss = _loss(config, denoiser, objective, stream.get(micro), _micro_seed(config, micro), text) / config.grad_accum
        (scaler.scale(loss) if scaler else loss).backward()
        total = total + loss.detach()
    return total


def _micro_seed(config: TrainConfig, micro: int) -> int:
    """The seed of micro-batch number ``micro``'s noise and timesteps: the run's seed decides them all."""
    return config.seed * 1_000_003 + micro


def _loss(config: TrainConfig, denoiser: Denoiser, objective: DDPMObjective | FlowObjective, batch: Batch,
          seed: int, text: Callable[[list[str]], dict] | None = None) -> torch.Tensor:
    """The weighted denoising loss of ``batch`` at the noise and timesteps that ``seed`` draws; ``text``: a text
    encoder that encodes the batch's captions now, in place of their cached encoding."""
    device = batch.latents.device
    cond = batch.cond
    if text is not None:
        if batch.captions is None:
            raise ValueError("Training the text encoder needs the captions of the batch; this dataset does not keep "
                             "them (encode it again with Encode Latents Cache)")
        live = {k: v.to(device) for k, v in text(batch.captions).items()}  # outside autocast: the encoder's precision
        cond = {**{k: v for k, v in cond.items() if k not in TEXT_KEYS}, **live}
    autocast_dtype = None if config.precision == "fp32" else DTYPES[config.precision]
    generator = torch.Generator(device).manual_seed(seed)
    x0 = batch.latents.float()
    noise = objective.sample_noise(x0, generator)
    noised = objective.make(x0, noise, objective.sample_timesteps(x0, generator))
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        pred = denoiser(noised.noisy, noised.timestep, cond)
    return denoising_loss(pred, noised, config.loss, config.huber_c, config.huber_schedule, batch.mask,
                          config.unmasked_weight, batch.weight)


def _fit_memory(config: TrainConfig, denoiser: Denoiser, objective: DDPMObjective | FlowObjective,
                stream: BatchStream, position: int, params: Sequence[torch.nn.Parameter],
                text_encoder: TextEncoder | None = None) -> bool:
    """Make the step fit the device memory the denoiser has left (``memory_free()``; nothing to do where it
    states none), before the first step; returns whether gradient checkpointing is on.

    What a step keeps for its backward pass is measured on the largest bucket (``saved_bytes``, a forward pass
    that keeps nothing), beside the adapter's training state (weights, gradients, two AdamW moments, fp32). If
    it does not fit: gradient checkpointing (when ``auto``), measured again; then, if the denoiser can
    ``offload(bytes)``, frozen weights leave the device until it fits. An eighth is added for the step's
    transient memory (a layer's cast weight, attention scratch)."""
    checkpointing = config.gradient_checkpointing == "on"
    _set_gradient_checkpointing(denoiser, checkpointing)
    free = denoiser.memory_free() if hasattr(denoiser, "memory_free") else None
    if free is None:
        return checkpointing
    free -= 4 * sum(p.numel() * p.element_size() for p in params)
    batch = stream.largest()
    resident = list(denoiser.module.parameters()) + (list(text_encoder.module.parameters()) if text_encoder else [])
    device = stream.device

    def needs() -> int:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):  # dropout draws
            return saved_bytes(lambda: _loss(config, denoiser, objective, batch, _micro_seed(config, position),
                                             text_encoder), resident) * 9 // 8

    need = needs()
    log.info("a step keeps %.0f MiB for its backward pass; %.0f MiB free", need / 2**20, free / 2**20)
    if need > free and config.gradient_checkpointing == "auto":
        checkpointing = True
        _set_gradient_checkpointing(denoiser, True)
        need = needs()
        log.info("gradient checkpointing on: a step keeps %.0f MiB", need / 2**20)
    if need > free and hasattr(denoiser, "offload") and config.adapter == "dora":
        # peft's DoRA reads each base weight whole on the compute device (the norm of its rows) every step
        log.warning("a DoRA step needs %.0f MiB more than the budget and cannot keep frozen weights in CPU memory; "
                    "choose lora (which can) or a smaller batch or resolution", (need - free) / 2**20)
    elif need > free and hasattr(denoiser, "offload"):
        moved = denoiser.offload(need - free)
        log.info("kept %.0f MiB of frozen weights in CPU memory to fit the step", moved / 2**20)
    return checkpointing


def _output(adapters: Adapters, ema: EMAModel | None) -> dict[str, LoraTensors]:
    """What the run gives: the adapter as trained or, with an EMA, its average, which then replaces the trained
    weights on the model (the run is over; the checkpoints hold the trained ones)."""
    if ema is not None:
        ema.copy_to(adapters.parameters())
    return adapters.tensors()


def _restore(params: Sequence[torch.nn.Parameter], saved: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)


def _get_rng(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _set_rng(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def _free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _set_gradient_checkpointing(denoiser: Denoiser, enabled: bool) -> None:
    setter = getattr(denoiser, "set_gradient_checkpointing", None)
    if setter is not None:
        setter(enabled)
    elif enabled:
        raise ValueError(f"{type(denoiser).__name__} cannot do gradient checkpointing; turn it off")
