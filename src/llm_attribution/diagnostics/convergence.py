"""How far training gradients turn between checkpoints (the study's section 4.2, uncertain convergence)."""

from __future__ import annotations

import torch

from ..features.gradients import Features


def gradient_cosine(a: Features, b: Features) -> float:
    """Mean over examples of the cosine between their full (all-block) gradients in ``a`` and ``b``."""
    dot = torch.zeros(len(a.ids), dtype=torch.float64)
    norm_a = torch.zeros_like(dot)
    norm_b = torch.zeros_like(dot)
    for name, block in a.blocks.items():
        x, y = block.double(), b.blocks[name].double()
        dot += (x * y).sum(dim=1)
        norm_a += x.square().sum(dim=1)
        norm_b += y.square().sum(dim=1)
    return float((dot / (norm_a.sqrt() * norm_b.sqrt()).clamp(min=1e-300)).mean())
