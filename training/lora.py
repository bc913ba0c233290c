"""LoRA adapters on any nn.Module, through peft: plain LoRA, DoRA, LoHa and LoKr.

An adapter is described engine-wide as ``dict[str, LoraTensors]``: module path (relative to the
denoiser's root module, dots as in ``named_modules``) -> its tensors as LoRA files name them, and alpha.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig
from peft.functional import (
    cast_adapter_dtype,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners import lora as peft_lora

ADAPTER = "default"
# B = 0 in every case, so step 0 is the base model exactly.
LORA_INITS = {"kaiming": True, "gaussian": "gaussian"}
TEXT_ENCODER = "text_encoders."  # a text encoder's layers in an adapter: this + their path in it (ComfyUI's name)
ALL_LINEAR = "all-linear"  # targets value: every Linear layer in the module (is_linear)
# The adapter kinds: what peft trains and ComfyUI's comfy/weight_adapter loads (LyCORIS's file keys for the last
# three). lora: a low-rank update; dora: LoRA plus a learned magnitude per output row (closer to full fine-tuning
# at the same rank); loha: a Hadamard product of two low-rank pairs (rank r reaches rank r^2); lokr: a Kronecker
# product (small files, suited to styles).
KINDS = ("lora", "dora", "loha", "lokr")
KIND_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}
# peft's state-dict names -> the file's, where they differ (peft's LoHa and LoKr names are LyCORIS's own)
_FILE_NAMES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
               "lora_magnitude_vector": "dora_scale"}
_PEFT_KEY = re.compile(r"^(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector|hada_\w+|lokr_\w+)$")


@dataclass
class LoraTensors:
    """One adapted layer as LoRA files hold it: ``tensors`` keyed by the name that follows the layer's in the
    file (``lora_down.weight`` and ``lora_up.weight``; DoRA adds ``dora_scale``, one magnitude per output row
    shaped [out, 1, ...]; LoHa has ``hada_w1_a`` ... ``hada_w2_b``; LoKr ``lokr_w1`` or ``lokr_w1_a``/``_b``
    and ``lokr_w2`` or ``lokr_w2_a``/``_b``), and alpha. The update is scaled by alpha / rank."""

    tensors: dict[str, torch.Tensor]
    alpha: float

    @classmethod
    def lora(cls, down: torch.Tensor, up: torch.Tensor, alpha: float) -> LoraTensors:
        """A plain LoRA layer: delta W = up @ down * alpha / rank; down [rank, in(, kh, kw)], up [out, rank(, 1, 1)]."""
        return cls({"lora_down.weight": down, "lora_up.weight": up}, alpha)

    @classmethod
    def read(cls, tensors: dict[str, torch.Tensor], alpha: float | None) -> LoraTensors:
        """A layer as a reader found it: a missing alpha is the rank's (scale 1, as every loader takes it), and a
        DoRA magnitude, one per output row in whatever shape it came (peft's [out] or [1, out, 1, 1]), takes the
        files' [out, 1, ...]."""
        if "dora_scale" in tensors:
            rows = tensors["dora_scale"].reshape(-1, *[1] * (tensors["lora_up.weight"].dim() - 1))
            tensors = {**tensors, "dora_scale": rows}
        layer = cls(tensors, 0.0)
        layer.alpha = float(alpha) if alpha is not None else float(layer.rank or 1)
        return layer

    @property
    def kind(self) -> str:
        return kind_of(self.tensors)

    @property
    def down(self) -> torch.Tensor:
        return self.tensors["lora_down.weight"]

    @property
    def up(self) -> torch.Tensor:
        return self.tensors["lora_up.weight"]

    @property
    def rank(self) -> int | None:
        """ComfyUI's (and LyCORIS's) rank: the inner size of the low-rank factors; None for a LoKr whose two
        factors are both full, which has no rank and is not scaled."""
        t = self.tensors
        if "lora_down.weight" in t:
            return t["lora_down.weight"].shape[0]
        if "hada_w1_b" in t:
            return t["hada_w1_b"].shape[0]
        low_rank = t.get("lokr_w2_b", t.get("lokr_w1_b"))
        return None if low_rank is None else low_rank.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.rank is None else self.alpha / self.rank


def kind_of(tensors: Mapping[str, object]) -> str:
    """The adapter kind of one layer's tensors (keyed as in a file); a layer with parts missing raises."""
    names = set(tensors)
    if names & {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}:
        kind, needed = "loha", [{"hada_w1_a"}, {"hada_w1_b"}, {"hada_w2_a"}, {"hada_w2_b"}]
    elif any(name.startswith("lokr_") for name in names):
        kind, needed = "lokr", [{"lokr_w1", "lokr_w1_a"}, {"lokr_w2", "lokr_w2_a"}]
        needed += [{f"lokr_w{i}_b"} for i in (1, 2) if f"lokr_w{i}_a" in names]
    else:
        kind, needed = ("dora" if "dora_scale" in names else "lora"), [{"lora_down.weight"}, {"lora_up.weight"}]
    missing = [" or ".join(sorted(options)) for options in needed if not options & names]
    if missing:
        raise ValueError(f"a {kind} layer without {', '.join(missing)} (it has {sorted(names)}): the file is "
                         "incomplete")
    return kind


class LoraAttachment:
    """Adapter layers (``kind``: one of KINDS) injected by peft into ``module`` in place; ``remove()`` restores the
    module tree.

    peft's public functional API does the work: ``inject_adapter_in_model`` wraps the targets (Linear and its
    subclasses such as ComfyUI's ops, Conv2d), ``get/set_peft_model_state_dict`` read and write the adapter,
    ``cast_adapter_dtype`` keeps it in fp32 whatever the model's dtype. Removal puts each wrapper's
    ``get_base_layer()`` back in its place, and what peft changes besides (every other parameter's
    ``requires_grad``) is put back too, so the caller's model leaves exactly as it came.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        targets: Sequence[str] | str,  # name suffixes, one regex, or ALL_LINEAR
        *,
        rank: int,
        alpha: float,
        kind: str = "lora",
        dropout: float = 0.0,
        init: str = "kaiming",
        initial: Mapping[str, LoraTensors] | None = None,
        device: torch.device | None = None,
    ) -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if init not in LORA_INITS:
            raise ValueError(f"Unknown LoRA init {init!r}; choose one of {sorted(LORA_INITS)}")
        patterns: dict[str, dict] = {}
        if initial:
            rank, alpha, patterns = _layer_patterns(initial, kind)
            targets = sorted(initial)
        elif targets == ALL_LINEAR:
            targets = [name for name, m in module.named_modules() if is_linear(m)]
        self.module, self.kind = module, kind
        self._requires_grad = {name: p.requires_grad for name, p in module.named_parameters()}
        self._attributes = set(vars(module))  # peft notes its config on the module (peft_config)
        config = _peft_config(kind, rank, alpha, dropout, init,
                              list(targets) if not isinstance(targets, str) else targets, **patterns)
        # peft wraps torch's Linear and its subclasses by itself; a Linear of another class by its Linear wrapper
        other_linears = {type(m) for m in module.modules() if is_linear(m) and not isinstance(m, torch.nn.Linear)}
        if other_linears and kind != "lora":
            raise ValueError(f"{kind} cannot adapt layers of {sorted(c.__name__ for c in other_linears)} (quantised "
                             "weights): peft trains it on torch's Linear only. Choose lora, or load the model in "
                             "bf16/fp16" + ("" if kind == "dora" else "/fp8"))
        if kind == "dora":
            _check_dora_weights(module, device)
        if other_linears:
            config._register_custom_module(dict.fromkeys(other_linears, peft_lora.Linear))
        try:
            with _adapters_in_fp32(module), warnings.catch_warnings():
                # peft warns of each such layer ("proceed at your own risk"); tests/unit/test_lora checks them
                warnings.filterwarnings("ignore", "Unsupported layer type", UserWarning)
                inject_adapter_in_model(config, module, adapter_name=ADAPTER)
        except ValueError as error:
            raise ValueError(f"Could not attach {kind} to targets {targets!r}: {error}") from error
        cast_adapter_dtype(module, ADAPTER)
        self.layers = sorted(_by_layer(self._state_dict()))
        if kind == "lokr":
            _unscale_full_kronecker(module, self.layers)
        if device is not None:  # layers whose weights stay in CPU memory still train on the compute device
            for param in self.parameters():
                param.data = param.data.to(device)
        if initial:
            self.load(initial)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable adapter parameters (fp32), in a stable order: per layer, in peft's (LoRA: down, up, then
        DoRA's magnitude)."""
        return [param for name in self.layers
                for key, param in self.module.get_submodule(name).named_parameters()
                if ADAPTER in key.split(".") and not key.startswith("base_layer.")]

    def tensors(self) -> dict[str, LoraTensors]:
        """A detached fp32 CPU copy of the adapter, keyed by module path, named as in files."""
        state = self._state_dict()
        return {name: LoraTensors.read({part: state[key].detach().float().cpu().clone() for part, key in keys.items()},
                                       self._alpha(name))
                for name, keys in sorted(_by_layer(state).items())}

    def _alpha(self, name: str) -> float:
        """A layer's alpha (peft's LoRA layers call it lora_alpha, its LyCORIS layers alpha)."""
        layer = self.module.get_submodule(name)
        return float((layer.lora_alpha if hasattr(layer, "lora_alpha") else layer.alpha)[ADAPTER])

    @torch.no_grad()
    def load(self, layers: Mapping[str, LoraTensors]) -> None:
        """Copy adapter weights in (to continue training an existing LoRA)."""
        unknown = sorted(set(layers) - set(self.layers))
        if unknown:
            raise ValueError(f"LoRA weights for modules that are not adapted: {unknown[:10]}")
        state = self._state_dict()
        by_layer = _by_layer(state)
        weights = {}
        for name, given in layers.items():
            mine = by_layer[name]
            if set(given.tensors) != set(mine):
                raise ValueError(f"{name}: the adapter has {sorted(mine)} ({self.kind}), the weights given "
                                 f"{sorted(given.tensors)} ({given.kind})")
            for part, tensor in given.tensors.items():
                live = state[mine[part]]
                if tensor.numel() != live.numel() or (part != "dora_scale" and tensor.shape != live.shape):
                    raise ValueError(f"{name}.{part}: the adapter's shape is {tuple(live.shape)}, the weights "
                                     f"given are {tuple(tensor.shape)}" + (
                                         " (a LoKr continues when it was made with LyCORIS's factor -1 and "
                                         "without decompose_both)" if self.kind == "lokr" else ""))
                weights[mine[part]] = tensor.reshape(live.shape).to(live)
        set_peft_model_state_dict(self.module, weights, adapter_name=ADAPTER)

    def remove(self) -> None:
        """Take every adapter layer out; the module tree and its outputs are the original ones again."""
        for name in self.layers:
            parent, _, child = name.rpartition(".")
            owner = self.module.get_submodule(parent) if parent else self.module
            setattr(owner, child, getattr(owner, child).get_base_layer())
        self.layers = []
        for name in set(vars(self.module)) - self._attributes:
            delattr(self.module, name)
        for name, param in self.module.named_parameters():
            wanted = self._requires_grad.get(name, param.requires_grad)
            if param.requires_grad != wanted:
                # weights made under torch.inference_mode (as ComfyUI loads them) only take the flag there
                with torch.inference_mode(param.is_inference()):
                    param.requires_grad_(wanted)

    def __enter__(self) -> LoraAttachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter as peft names it: ``<module path>.lora_A.weight``, ``.hada_w1_a``, ... (live tensors)."""
        return get_peft_model_state_dict(self.module, adapter_name=ADAPTER)


class Adapters:
    """A run's attachments as one adapter: ``parts`` maps a layer-name prefix to its attachment ("" for the
    denoiser's, TEXT_ENCODER for the text encoder's), so layer names are unique across them."""

    def __init__(self, parts: Mapping[str, LoraAttachment]):
        self.parts = dict(parts)

    @property
    def layers(self) -> list[str]:
        return [prefix + name for prefix, part in self.parts.items() for name in part.layers]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [param for part in self.parts.values() for param in part.parameters()]

    def parameter_groups(self, rates: Mapping[str, float]) -> list[dict]:
        """torch's parameter groups, one per part, in ``parameters()``'s order; a part named in ``rates`` trains at
        its own learning rate."""
        return [{"params": part.parameters(), **({"lr": rates[prefix]} if prefix in rates else {})}
                for prefix, part in self.parts.items()]

    def tensors(self) -> dict[str, LoraTensors]:
        return {prefix + name: tensors for prefix, part in self.parts.items() for name, tensors in part.tensors().items()}

    def load(self, layers: Mapping[str, LoraTensors]) -> None:
        for prefix, part in split_layers(layers, self.parts).items():
            self.parts[prefix].load(part)

    def remove(self) -> None:
        for part in self.parts.values():
            part.remove()


def split_layers(layers: Mapping[str, LoraTensors], prefixes: Iterable[str] = ("", TEXT_ENCODER)
                 ) -> dict[str, dict[str, LoraTensors]]:
    """An adapter's layers per part (``Adapters``): {prefix: {path inside that part: tensors}}, for the parts that
    have layers. A layer of a part not among ``prefixes`` is refused."""
    parts: dict[str, dict[str, LoraTensors]] = {}
    for name, tensors in layers.items():
        prefix = TEXT_ENCODER if name.startswith(TEXT_ENCODER) else ""
        parts.setdefault(prefix, {})[name.removeprefix(prefix)] = tensors
    if TEXT_ENCODER in parts and TEXT_ENCODER not in prefixes:
        raise ValueError(f"The LoRA has {len(parts[TEXT_ENCODER])} text-encoder layers; to train them on, set "
                         "te_learning_rate (with Train LoRA's clip connected)")
    return parts


def _by_layer(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, str]]:
    """peft's adapter state-dict keys grouped by adapted layer: {module path: {the name files give the tensor: key}}."""
    layers: dict[str, dict[str, str]] = {}
    for key in state:
        name, part = _PEFT_KEY.match(key).groups()
        layers.setdefault(name, {})[_FILE_NAMES.get(part, part)] = key
    return layers


def _check_dora_weights(module: torch.nn.Module, device: torch.device | None) -> None:
    """peft's DoRA reads each adapted layer's weight whole, in its storage, on the compute device (the norm of its
    rows, every step): an fp8-stored weight cannot be added to, and one left in CPU memory is on the wrong device."""
    for name, param in module.named_parameters():
        if param.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise ValueError(f"DoRA needs the model's weights in bf16, fp16 or fp32; {name} is stored in "
                             f"{str(param.dtype).removeprefix('torch.')}. Load the model in bf16/fp16, or choose "
                             "lora, loha or lokr, which train on fp8 weights")
        if device is not None and param.device.type != device.type:
            raise ValueError(f"DoRA needs every weight on the compute device ({device}); {name} is in "
                             f"{param.device.type} memory (the model did not fit, or memory_budget_gb is below its "
                             "size). Free memory or raise the budget, or choose lora, loha or lokr")


def _peft_config(kind: str, rank: int, alpha: float, dropout: float, init: str, targets: list[str] | str,
                 **patterns: dict):
    """peft's config for an adapter ``kind``. LoHa and LoKr take LyCORIS's defaults (no Tucker decomposition of
    convolutions; LoKr's factor -1, the most square split); peft's dropout and A init are LoRA's only.
    ``patterns``: peft's rank_pattern and alpha_pattern, for layers whose rank or alpha differ."""
    if kind in ("lora", "dora"):
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                          init_lora_weights=LORA_INITS[init], use_dora=kind == "dora", **patterns)
    if kind not in KINDS:
        raise ValueError(f"Unknown adapter kind {kind!r}; choose one of {list(KINDS)}")
    if dropout or init != "kaiming":
        raise ValueError(f"lora_dropout and lora_init are for lora and dora; {kind} takes neither (set dropout 0 "
                         "and init kaiming)")
    config = LoHaConfig if kind == "loha" else LoKrConfig
    return config(r=rank, alpha=alpha, target_modules=targets, **patterns)


def _unscale_full_kronecker(module: torch.nn.Module, layers: Sequence[str]) -> None:
    """A LoKr layer whose two factors both came out full (its rank is at least half their sizes) has no rank to
    scale by: LyCORIS, ComfyUI and A1111 apply it at scale 1 whatever alpha is, so it trains at 1 here too."""
    for name in layers:
        layer = module.get_submodule(name)
        if ADAPTER in layer.lokr_w1 and ADAPTER in layer.lokr_w2:
            layer.scaling[ADAPTER] = 1.0


def is_linear(layer: torch.nn.Module) -> bool:
    """torch's Linear, or a layer of another class that computes one (its in and out features and a weight):
    ComfyUI's mixed-precision Linear, which holds quantised weights (scaled fp8 and others), is a plain
    Module."""
    return isinstance(layer, torch.nn.Linear) or all(hasattr(layer, name) for name in ("in_features", "out_features",
                                                                                          "weight"))


@contextlib.contextmanager
def _adapters_in_fp32(module: torch.nn.Module) -> Iterator[None]:
    """peft makes each adapter in its base weight's dtype unless the layer states a ``compute_dtype`` (as
    bitsandbytes' quantised layers do); stating fp32 while injecting keeps adapters on fp8-stored layers from
    being rounded to fp8 (their initialisation too). Other dtypes end in fp32 as well (``cast_adapter_dtype``)."""
    stated = [layer for layer in module.modules() if hasattr(layer, "weight") and not hasattr(layer, "compute_dtype")]
    for layer in stated:
        layer.compute_dtype = torch.float32
    try:
        yield
    finally:
        for layer in stated:
            del layer.compute_dtype


def adapter_settings(layers: Mapping[str, LoraTensors]) -> tuple[str, int, float]:
    """(kind, rank, alpha) of an adapter: its one kind, its most common rank and alpha (other trainers' files vary
    them by layer)."""
    kinds = sorted({layer.kind for layer in layers.values()})
    if len(kinds) != 1:
        raise ValueError(f"The LoRA mixes {' and '.join(kinds)} layers; training continues one kind")
    ranks = _ranks(layers)
    # a LoKr layer with full factors is not scaled, so its alpha says nothing (LyCORIS writes huge ones)
    alphas = [float(layer.alpha) if layer.rank is not None else float(ranks[name]) for name, layer in layers.items()]
    return kinds[0], Counter(ranks.values()).most_common(1)[0][0], Counter(alphas).most_common(1)[0][0]


def _ranks(layers: Mapping[str, LoraTensors]) -> dict[str, int]:
    # a LoKr layer whose factors are both full has no rank: peft builds full factors for any rank of at least half
    # the second factor's sides
    return {name: layer.rank or max(layer.tensors["lokr_w2"].shape[:2]) for name, layer in layers.items()}


def _layer_patterns(initial: Mapping[str, LoraTensors], kind: str) -> tuple[int, float, dict[str, dict]]:
    """(rank, alpha, peft's rank_pattern and alpha_pattern) that build ``initial``'s layers: the most common rank
    and alpha, and a pattern entry for each layer that differs."""
    found, rank, alpha = adapter_settings(initial)
    if found != kind:
        raise ValueError(f"The LoRA to continue is made of {found} layers; set adapter to {found} (it is {kind})")
    # peft matches a pattern against a module's whole path or its end after a dot
    return rank, alpha, {"rank_pattern": {re.escape(n): r for n, r in _ranks(initial).items() if r != rank},
                         "alpha_pattern": {re.escape(n): float(layer.alpha) for n, layer in initial.items()
                                           if float(layer.alpha) != alpha}}
