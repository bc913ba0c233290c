"""The pack's node IDs and the display names users see, as the frontend and ComfyUI-Manager must show them."""

OURS = {"LoraTrainerLoadDataset": "Load LoRA Dataset", "LoraTrainerCaptionDropout": "Caption Dropout",
        "LoraTrainerRegularization": "Regularisation Images",
        "LoraTrainerEncodeLatentsCache": "Encode Latents Cache", "LoraTrainerSamples": "Training Samples",
        "LoraTrainerTrain": "Train LoRA",
        "LoraTrainerSave": "Save LoRA", "LoraTrainerApply": "Apply LoRA",
        "LoraTrainerEvalGrid": "LoRA Evaluation Grid"}
