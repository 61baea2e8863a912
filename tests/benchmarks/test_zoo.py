"""Helpers of benchmarks/zoo.py that need no data or download: the DINOv2 -> DeiT conversion and the augmentation."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import zoo


def _tiny_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    # 56 px / patch 14: a 4x4 position grid, resampled to 2x2 for 28 px inputs (as 37x37 -> 8x8 in the zoo).
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                          patch_size=14, image_size=56, layer_norm_eps=1e-6)
    model = Dinov2Model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda1" in name:
                p.copy_(torch.rand_like(p) * 2 - 0.5)  # LayerScale far from 1, some negative
            elif "embeddings" in name or "token" in name:
                p.normal_()  # non-zero positions and CLS so that resampling and token copies matter
    return model


def test_dinov2_to_deit_reproduces_backbone_without_distillation_token():
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    backbone = _tiny_dinov2()
    deit = DeiTForImageClassificationWithTeacher(DeiTConfig(
        image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, layer_norm_eps=1e-6, num_labels=10)).eval()
    missing, unexpected = deit.load_state_dict(zoo._deit_state_dict_from_dinov2(backbone, 28), strict=False)
    assert not unexpected
    assert all(k.startswith(("cls_classifier.", "distillation_classifier.")) for k in missing)

    x = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    check = zoo._check_deit_conversion(deit.deit, backbone, x)
    assert check["mapping_all_tokens_max_abs_diff"] < 1e-5
    # The copied distillation token stays equal to the CLS token, and it does change the features a little.
    assert check["distillation_vs_cls_max_abs_diff"] < 1e-5
    assert check["full_cls_max_abs_diff"] > 1e-4


def test_augment_is_seeded_and_identity_without_distortion(monkeypatch):
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = zoo._augment(images, torch.Generator().manual_seed(3))
    b = zoo._augment(images, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (4, 28, 28)
    monkeypatch.setattr(zoo, "AUGMENT", {"degrees": 0.0, "scale": (1.0, 1.0), "shift_pixels": 0.0})
    same = zoo._augment(images, torch.Generator().manual_seed(3))
    assert torch.allclose(same, images.float() / 255, atol=1e-5)
