"""Half precision on CUDA, one choice for training and inference: predict must
run the model in the precision it was trained in. The CPU stays in float32,
where autocast is slower and the outputs must not change."""

from __future__ import annotations

import torch


def cuda_half_dtype() -> torch.dtype:
    """bf16 where the GPU supports it (no loss scaling needed), else fp16."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def lightning_precision(device: str) -> str:
    """The Lightning ``precision`` for a ``train.device`` setting."""
    if device == "cpu" or not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if cuda_half_dtype() == torch.bfloat16 else "16-mixed"
