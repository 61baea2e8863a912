"""`UniformQuantizer.grid`: what kernel backends read at every forward of a layer."""

from __future__ import annotations

import copy

import torch

from optimum_lrpq.nn.activation import UniformQuantizer


def test_grid_is_reused_while_its_tensors_are_the_same():
    quant = UniformQuantizer(4, channels=3)
    quant.set_grid(torch.tensor([0.1, 0.2, 0.4]), torch.tensor([1.0, 2.0, 3.0]))
    grid = quant.grid(applied=True)
    assert quant.grid(applied=True) is grid  # asked at every forward: no new object
    quant.scale.mul_(2)  # an in-place edit is seen through the same tensor
    assert torch.equal(quant.grid(applied=True).scale, torch.tensor([0.2, 0.4, 0.8]))
    step = torch.tensor([0.1, 0.2, 0.4])
    other = quant.grid(product_step=step)  # other arguments: another grid
    assert other is not grid and other.product_step is step and not other.applied
    assert quant.grid(product_step=step) is other
    assert quant.grid(product_step=step.clone()) is not other
    quant.set_grid(torch.tensor([0.5]), torch.tensor([7.0]))  # new tensors: a new grid on them
    fresh = quant.grid()
    assert fresh.scale is quant.scale and fresh.zero_point is quant.zero_point and fresh.bits == 4
    quant.bits = 6
    assert quant.grid().bits == 6


def test_copied_quantizer_grid_holds_the_copy_s_tensors():
    quant = UniformQuantizer(8)
    quant.set_grid(torch.tensor([0.1]), torch.tensor([3.0]))
    quant.grid()
    twin = copy.deepcopy(quant)
    twin.scale.fill_(0.5)
    assert twin.grid().scale is twin.scale and float(quant.grid().scale) == float(torch.tensor(0.1))
    moved = quant.to(torch.float64)  # .to() replaces the buffers: the grid follows
    assert moved.grid().scale is moved.scale
