"""Segmentation losses that respect the ignore value (255) of the masks.

Targets are label maps [B, H, W]: 0 background, c+1 for class c, 255 ignore.
"sigmoid" losses (bce_dice, focal) take one logit per class; "softmax" losses
(ce_lovasz) take a background logit plus one per class.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from mapgap.models.segmentation import Activation

IGNORE = 255
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _one_hot(target: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,H,W] labels -> ([B,C,H,W] float foreground per class, [B,1,H,W] valid)."""
    valid = (target != IGNORE).unsqueeze(1)
    labels = torch.arange(1, n_classes + 1, device=target.device).view(1, -1, 1, 1)
    return (target.unsqueeze(1) == labels).float(), valid.float()


def soft_dice(probs: torch.Tensor, onehot: torch.Tensor, valid: torch.Tensor,
              eps: float = 1.0) -> torch.Tensor:
    """1 - Dice per class over the batch (so tiny objects in big tiles still count)."""
    dims = (0, 2, 3)
    inter = (probs * onehot * valid).sum(dims)
    total = ((probs + onehot) * valid).sum(dims)
    return (1 - (2 * inter + eps) / (total + eps)).mean()


def bce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    onehot, valid = _one_hot(target, logits.shape[1])
    bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    bce = (bce * valid).sum() / (valid.sum() * logits.shape[1]).clamp_min(1)
    return bce + soft_dice(logits.sigmoid(), onehot, valid)


def focal(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
          alpha: float = 0.25) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017): down-weights easy background pixels."""
    onehot, valid = _one_hot(target, logits.shape[1])
    bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p = logits.sigmoid()
    p_t = p * onehot + (1 - p) * (1 - onehot)
    weight = (alpha * onehot + (1 - alpha) * (1 - onehot)) * (1 - p_t) ** gamma
    return (weight * bce * valid).sum() / valid.sum().clamp_min(1)


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_softmax(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Lovasz-softmax (Berman et al. 2018): a direct surrogate of mean IoU over the
    classes present in the batch (background included), ignoring 255."""
    n = probs.shape[1]
    probs = probs.permute(0, 2, 3, 1).reshape(-1, n)
    labels = target.reshape(-1)
    keep = labels != IGNORE
    probs, labels = probs[keep], labels[keep]
    losses = []
    for c in range(n):
        fg = (labels == c).float()
        if fg.sum() == 0:
            continue
        errors = (fg - probs[:, c]).abs()
        errors_sorted, order = errors.sort(descending=True)
        losses.append(torch.dot(errors_sorted, _lovasz_grad(fg[order])))
    if not losses:
        return probs.sum() * 0.0
    return torch.stack(losses).mean()


def ce_lovasz(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if (target != IGNORE).any():
        ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    else:
        ce = logits.sum() * 0.0
    return ce + lovasz_softmax(logits.softmax(dim=1), target)


LOSSES: dict[str, tuple[LossFn, Activation]] = {
    "bce_dice": (bce_dice, "sigmoid"),
    "focal": (focal, "sigmoid"),
    "ce_lovasz": (ce_lovasz, "softmax"),
}


def loss_for(name: str) -> tuple[LossFn, Activation]:
    """The loss function and the output activation it implies."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r} (choose from {', '.join(LOSSES)})") from None
