"""Step groups: per-channel steps rounded up to a few geometric levels (`quantization.step_groups`)."""

from __future__ import annotations

import pytest
import torch

from optimum_lrpq.quantization.step_groups import group_steps, step_levels, zero_points_for_steps
from optimum_lrpq.quantization.uniform import scale_zero_point_from_range


def random_steps(n: int = 3072, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(n, generator=generator) * 2.0) * 0.01  # steps spanning several octaves


def test_exact_levels_on_a_hand_example():
    scale = torch.tensor([8.0, 5.0, 4.0, 3.9, 2.0, 1.5, 0.01])
    assert torch.equal(group_steps(scale, 3), torch.tensor([8.0, 8.0, 4.0, 4.0, 2.0, 2.0, 2.0]))
    assert torch.equal(group_steps(scale, 4), torch.tensor([8.0, 8.0, 4.0, 4.0, 2.0, 2.0, 1.0]))
    assert torch.equal(group_steps(scale, 2, ratio=4.0), torch.tensor([8.0, 8.0, 8.0, 8.0, 2.0, 2.0, 2.0]))
    assert torch.equal(step_levels(torch.tensor(8.0), 4), torch.tensor([8.0, 4.0, 2.0, 1.0]))


@pytest.mark.parametrize("groups", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("ratio", [2.0, 1.5, 3.0])
def test_few_distinct_never_finer_idempotent(groups, ratio):
    scale = random_steps()
    grouped = group_steps(scale, groups, ratio)
    assert grouped.shape == scale.shape and grouped.dtype == torch.float32
    assert grouped.unique().numel() <= groups
    assert bool((grouped >= scale).all())  # never a finer step than calibration chose
    assert grouped.max() == scale.max()  # anchored at the largest step
    assert torch.equal(group_steps(grouped, groups, ratio), grouped)  # idempotent
    levels = step_levels(scale.max(), groups, ratio)
    assert bool(torch.isin(grouped, levels).all())
    # The smallest level >= each step: the next finer level is below the step (unless it is the last level).
    index = (levels[None, :] == grouped[:, None]).float().argmax(dim=1)
    finer = index < groups - 1
    assert bool((levels[index[finer] + 1] < scale[finer]).all())


def test_one_group_is_the_per_tensor_largest_step():
    scale = random_steps(64)
    assert torch.equal(group_steps(scale, 1), torch.full_like(scale, float(scale.max())))


def test_finer_channels_take_the_last_level_and_shape_is_kept():
    scale = torch.tensor([[1.0, 1e-6], [0.3, 1e-8]])
    grouped = group_steps(scale, 2)
    assert torch.equal(grouped, torch.tensor([[1.0, 0.5], [0.5, 0.5]]))


def test_ratio_two_levels_are_exact_powers_of_two_of_the_largest_step():
    scale = random_steps(512, seed=3)
    levels = step_levels(scale.max(), 8)
    assert torch.equal(levels, scale.max() * torch.tensor([2.0**-g for g in range(8)]))


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="groups must be a positive integer"):
        group_steps(torch.ones(3), 0)
    with pytest.raises(ValueError, match="groups must be a positive integer"):
        group_steps(torch.ones(3), True)
    with pytest.raises(ValueError, match="ratio must be a number > 1"):
        group_steps(torch.ones(3), 2, ratio=1.0)
    with pytest.raises(ValueError, match="finite positive steps"):
        group_steps(torch.tensor([1.0, 0.0]), 2)
    assert group_steps(torch.ones(0), 2).numel() == 0


def test_zero_points_follow_scale_zero_point_from_range():
    generator = torch.Generator().manual_seed(5)
    low = -torch.rand(256, generator=generator) * 3 + 0.5  # some ranges above 0: widened to contain it
    high = low.abs() + torch.rand(256, generator=generator) * 5
    scale, zero_point = scale_zero_point_from_range(low, high, 6)
    assert torch.equal(zero_points_for_steps(low, scale, 6), zero_point)  # same formula on the same step
    coarse = group_steps(scale, 2)
    zp = zero_points_for_steps(low, coarse, 6)
    assert torch.equal(zp, torch.round(-torch.clamp(low, max=0) / coarse).clamp(0, 63))
    # The coarser grid still spans the range: the lowest level is within half a step of the low end, and the top
    # level reaches the high end (up to that same half step).
    lowest, top = -zp * coarse, (63 - zp) * coarse
    assert bool(((lowest - torch.clamp(low, max=0)).abs() <= coarse / 2 + 1e-6).all())
    assert bool((top >= torch.clamp(high, min=0) - coarse / 2 - 1e-6).all())
