"""Pre-training objectives: masked-patch MSE and InfoNCE (paper App. B.1)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalisation of reconstruction targets, as MAE's (and AudioMAE's) norm_pix_loss:
    mean and unbiased variance (divided by P - 1) over each patch's P elements."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=True)
    return (patches - mean) / (var + eps).sqrt()


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked patches given, pred and target (B, m, P)."""
    return (pred.float() - target.float()).pow(2).mean()


def info_nce(x: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between x and y (B, D): row i of x and row i of y are the positives,
    every other row of the other side a negative; cosine similarity over temperature. B is one
    forward pass (a micro-batch): negatives are not gathered across passes or devices.

    In fp32 even under autocast (a B x B product, no cost): bf16 rounds a cosine near 1 by up to
    0.002, 0.02 in a logit at temperature 0.1."""
    device = x.device.type  # the meta device (FLOPs counting) has no autocast
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) \
            else contextlib.nullcontext():
        x = F.normalize(x.float(), dim=-1)
        y = F.normalize(y.float(), dim=-1)
        logits = x @ y.t() / temperature
        labels = torch.arange(x.shape[0], device=x.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
