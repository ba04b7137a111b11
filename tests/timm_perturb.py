"""Shared by the parity tests: timm's random init moved away from its special values.

LayerNorm scales != 1, non-zero biases and tokens, q/k weights large enough for peaked attention (attention
logits of std ~1.5 at any width, like trained models rather than timm's near-uniform init), a spread Swin
relative-position bias, BatchNorm affine and running statistics away from (1, 0, 0, 1), and the explicit
(non-fused) attention path, so that forward hooks see the post-softmax maps. Then eval mode.
"""
from __future__ import annotations

import torch


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias") or name.endswith("_token"):
                p.copy_(0.05 * noise)
            elif "qkv" in name and name.endswith("weight"):
                p.copy_((1.5 / p.shape[1]) ** 0.5 * noise)
            elif "relative_position_bias_table" in name:
                p.copy_(0.5 * noise)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
    return model.eval()
