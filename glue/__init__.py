"""ComfyUI glue: the nodes, in ComfyUI's v3 schema (``comfy_api.latest.io``: each node's inputs, outputs, display
name and help in its ``define_schema``). The only package that imports ComfyUI.

Node IDs carry the prefix ``LoraTrainer``: ComfyUI silently drops a custom node whose ID equals a built-in one
(it has its own ``SaveLoRA``). The mappings are literal dicts so that static scanners (ComfyUI-Manager's node
index) can read them without importing the pack.
"""

from .dataset_nodes import CaptionDropout, LoadLoraDataset, RegularizationImages
from .encode_node import EncodeLatentsCache
from .evaluation import EvaluationGrid
from .lora_nodes import ApplyLora, SaveLora
from .paths import remove_killed_writes
from .samples import TrainingSamples
from .train_node import TrainLora

remove_killed_writes()

NODE_CLASS_MAPPINGS = {
    "LoraTrainerLoadDataset": LoadLoraDataset,
    "LoraTrainerCaptionDropout": CaptionDropout,
    "LoraTrainerRegularization": RegularizationImages,
    "LoraTrainerEncodeLatentsCache": EncodeLatentsCache,
    "LoraTrainerSamples": TrainingSamples,
    "LoraTrainerTrain": TrainLora,
    "LoraTrainerSave": SaveLora,
    "LoraTrainerApply": ApplyLora,
    "LoraTrainerEvalGrid": EvaluationGrid,
}
