"""Tiny models built from configs (no Hub access) and matching inputs, shared by the tests."""

from __future__ import annotations

import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

IMAGE_SIZE = 32
NUM_LABELS = 5


def _vit_like_config(cls):
    return cls(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, num_labels=NUM_LABELS)


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """A freshly initialized tiny model in eval mode: one of MODEL_NAMES, or 'dinov2_backbone' (no head)."""
    torch.manual_seed(seed)
    if name == "vit":
        model = ViTForImageClassification(_vit_like_config(ViTConfig))
    elif name == "deit":
        model = DeiTForImageClassification(_vit_like_config(DeiTConfig))
    elif name == "deit_teacher":
        model = DeiTForImageClassificationWithTeacher(_vit_like_config(DeiTConfig))
    elif name == "dinov2":
        model = Dinov2ForImageClassification(Dinov2Config(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32,
                                                          num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=64, num_labels=NUM_LABELS))
    elif name == "dinov2_backbone":
        model = Dinov2Model(Dinov2Config(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64))
    elif name == "swin":
        model = SwinForImageClassification(SwinConfig(image_size=IMAGE_SIZE, patch_size=4, embed_dim=16, depths=[2, 2],
                                                      num_heads=[2, 4], window_size=4, num_labels=NUM_LABELS))
    else:
        raise KeyError(name)
    return model.eval()


MODEL_NAMES = ("vit", "deit", "deit_teacher", "swin", "dinov2")


def pixels(n: int = 8, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=x).logits


@torch.no_grad()
def layer_inputs(model: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """What module `name` of `model` receives on `x`, as rows of its last dimension ([tokens, features])."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        model(pixel_values=x)
    finally:
        handle.remove()
    return torch.cat(seen)
