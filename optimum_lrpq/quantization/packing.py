"""Bit packing of integer codes into bytes, along the last dimension.

Layout: the codes of one row form a little-endian bit stream (code i occupies bits [i*bits, (i+1)*bits) and bit j
of the stream is bit j % 8 of byte j // 8). Every row is padded with zero bits to a whole byte on its own, so each
row of a packed weight ([out, packed_length(in, bits)]) can be addressed without unpacking the others.

Eight codes of `bits` bits fill exactly `bits` bytes, so both directions work on groups of 8 codes: a group is
assembled into one int64 word (at most 56 bits used for bits <= 7) and split into bytes, or the reverse. That is
vectorised over all groups and needs only loops over <= 8 positions, expressed as broadcast shifts.
"""

from __future__ import annotations

import math

import torch

from ..options import check_bits
from .uniform import qmax

# Codes per group; a group of codes occupies exactly `bits` bytes.
_GROUP = 8


def packed_length(length: int, bits: int) -> int:
    """Bytes needed for `length` codes of `bits` bits: ceil(length * bits / 8)."""
    check_bits(bits)
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}.")
    return math.ceil(length * bits / 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [..., L] (values in [0, 2**bits - 1], any int or float dtype) into uint8 [..., packed]."""
    check_bits(bits)
    _check_codes(codes, bits)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if 8 % bits == 0:
        return _pack_whole_bytes(codes, bits)
    *lead, length = codes.shape
    groups = math.ceil(length / _GROUP)
    padded = codes.new_zeros((*lead, groups * _GROUP), dtype=torch.int64)
    padded[..., :length] = codes.to(torch.int64)
    # Code i of a group goes to bits [i*bits, (i+1)*bits) of the group's word; disjoint bit fields, so sum == or.
    code_shifts = torch.arange(_GROUP, device=codes.device) * bits
    words = (padded.reshape(*lead, groups, _GROUP) << code_shifts).sum(dim=-1)
    byte_shifts = torch.arange(bits, device=codes.device) * 8
    group_bytes = (words.unsqueeze(-1) >> byte_shifts) & 0xFF
    # The trailing bytes of the last group beyond packed_length hold only padding bits.
    packed = group_bytes.reshape(*lead, groups * bits)[..., : packed_length(length, bits)]
    return packed.to(torch.uint8).contiguous()


def unpack(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 [..., packed_length(length, bits)] -> uint8 codes [..., length]."""
    check_bits(bits)
    expected = packed_length(length, bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}.")
    if packed.ndim == 0 or packed.shape[-1] != expected:
        raise ValueError(
            f"packed tensor of shape {tuple(packed.shape)} does not hold {length} codes of {bits} bits: "
            f"the last dimension must be {expected}."
        )
    if bits == 8:
        return packed.clone()
    if 8 % bits == 0:
        return _unpack_whole_bytes(packed, bits, length)
    *lead, _ = packed.shape
    groups = math.ceil(length / _GROUP)
    padded = packed.new_zeros((*lead, groups * bits), dtype=torch.int64)
    padded[..., :expected] = packed.to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    words = (padded.reshape(*lead, groups, bits) << byte_shifts).sum(dim=-1)
    code_shifts = torch.arange(_GROUP, device=packed.device) * bits
    codes = (words.unsqueeze(-1) >> code_shifts) & qmax(bits)
    return codes.reshape(*lead, groups * _GROUP)[..., :length].to(torch.uint8).contiguous()


# 2- and 4-bit codes never straddle a byte: uint8 shifts only (no int64 words; the common 4-bit weights unpack
# several times faster and without the large temporaries).


def _pack_whole_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    *lead, length = codes.shape
    padded = codes.new_zeros((*lead, packed_length(length, bits) * per_byte), dtype=torch.uint8)
    padded[..., :length] = codes.to(torch.uint8)
    fields = padded.reshape(*lead, packed_length(length, bits), per_byte)
    packed = fields[..., 0].clone()
    for k in range(1, per_byte):
        packed |= fields[..., k] << (k * bits)
    return packed


def _unpack_whole_bytes(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    per_byte = 8 // bits
    mask = qmax(bits)
    fields = torch.stack([(packed >> (k * bits)) & mask for k in range(per_byte)], dim=-1)
    return fields.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)[..., :length].contiguous()


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    """ValueError unless `codes` is an integer-valued tensor of rank >= 1 with values in [0, 2**bits - 1]."""
    if codes.ndim == 0:
        raise ValueError("codes must have at least one dimension (packing runs along the last one).")
    if codes.dtype == torch.bool or codes.is_complex():
        raise ValueError(f"codes must have an integer or float dtype, got {codes.dtype}.")
    if codes.numel() == 0:
        return
    if codes.is_floating_point() and not bool(torch.all(codes == torch.round(codes))):
        raise ValueError("codes must be integer-valued (found a non-integer or non-finite value).")
    low, high = codes.min().item(), codes.max().item()
    if low < 0 or high > qmax(bits):
        raise ValueError(
            f"codes must lie in [0, {qmax(bits)}] for {bits}-bit packing, got values in [{low:g}, {high:g}]."
        )
