"""ComfyUI glue: the six nodes. The only package that imports ComfyUI."""

from .dataset_nodes import CaptionDropout, LoadLoraDataset
from .encode_node import EncodeLatentsCache
from .lora_nodes import ApplyLora, SaveLora
from .train_node import TrainLora

PREFIX = "LoraTrainer"  # ComfyUI silently drops custom nodes whose ID equals a built-in one (e.g. SaveLoRA)
NODES = {
    "LoadDataset": (LoadLoraDataset, "Load LoRA Dataset"),
    "CaptionDropout": (CaptionDropout, "Caption Dropout"),
    "EncodeLatentsCache": (EncodeLatentsCache, "Encode Latents Cache"),
    "Train": (TrainLora, "Train LoRA"),
    "Save": (SaveLora, "Save LoRA"),
    "Apply": (ApplyLora, "Apply LoRA"),
}
NODE_CLASS_MAPPINGS = {f"{PREFIX}{key}": cls for key, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {f"{PREFIX}{key}": title for key, (_, title) in NODES.items()}
