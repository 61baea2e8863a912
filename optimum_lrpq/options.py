"""Every choice a user can make, and the bit-width bounds: the one table the config and all consumers read.

A leaf module (no torch, nothing of ours): `LRPQConfig` validates against these tuples, and the pipeline, the
relevance pass, the allocation and the CLI take their lists from here, so a new choice is added in one place.
"""

from __future__ import annotations

import numbers
from typing import Any

# Bit widths every quantized tensor may use (packing stores 2..8-bit codes in uint8).
MIN_BITS = 2
MAX_BITS = 8

SOFTMAX_QUANTIZERS = ("auto", "log_sqrt2", "log2", "uniform")
RANGE_METHODS = ("minmax", "percentile_mse", "mse")
GRANULARITIES = ("per_tensor", "per_channel")
ATTENTION_GRANULARITIES = ("per_tensor", "per_head")
WEIGHT_ROUNDINGS = ("nearest", "gptq")
RECONSTRUCTIONS = ("block",)  # `LRPQConfig.reconstruction` (None: off)
CLIPPING_RULES = ("ccq_a", "ccq_b")
# `activation_step_groups`: per-channel input steps take at most G values, s_max / STEP_GROUP_RATIO**g (g < G).
STEP_GROUP_RATIO = 2.0

RELEVANCE_TARGETS = ("predicted", "label")
RELEVANCE_SCORES = ("linear_abs", "operands", "branch", "weight")
RELEVANCE_RULES = ("chefer", "epsilon")

ALLOCATIONS = ("lrp", "lrp_sensitivity", "sensitivity", "uniform", "random", "magnitude")
RELEVANCE_ALLOCATIONS = ("lrp", "lrp_sensitivity")  # need the LRP relevance pass
SENSITIVITY_ALLOCATIONS = ("lrp_sensitivity", "sensitivity")  # need the measured sensitivity table
SENSITIVITY_METRICS = ("kl", "mse")


def check_bits(value: Any, what: str = "bits") -> int:
    """`value` as an int if it is an integer number of bits in [MIN_BITS, MAX_BITS]; ValueError otherwise.

    bool is rejected (True is not a width); numpy integers are accepted.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"{what} must be an integer between {MIN_BITS} and {MAX_BITS}, got {value!r} ({type(value).__name__})."
        )
    if not MIN_BITS <= int(value) <= MAX_BITS:
        raise ValueError(f"{what} must be between {MIN_BITS} and {MAX_BITS} bits, got {value}.")
    return int(value)


def check_step_groups(value: Any, what: str = "activation_step_groups") -> int | None:
    """`value` as an int if it is None or a positive integer number of step groups; ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be None (one step per channel) or a positive integer, got {value!r}.")
    return int(value)


def check_choice(value: Any, what: str, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`; ValueError naming the choices otherwise."""
    if value not in choices:
        raise ValueError(f"{what} must be one of {list(choices)}, got {value!r}.")
    return value
