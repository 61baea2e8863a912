"""Bit packing of quantized codes: exact round trips, sizes, byte layout and input validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_lrpq.quantization.packing import pack, packed_length, unpack

ALL_BITS = list(range(2, 9))


def _random_codes(shape, bits, seed=0, dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g).to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    rows=st.integers(0, 4),
    length=st.integers(0, 70),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_property(bits, rows, length, seed):
    codes = _random_codes((rows, length), bits, seed)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_length(length, bits))
    assert torch.equal(unpack(packed, bits, length), codes.to(torch.uint8))


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), values=st.lists(st.integers(0, 255), min_size=1, max_size=40))
def test_round_trip_of_listed_values(bits, values):
    codes = torch.tensor([v % (1 << bits) for v in values])
    assert torch.equal(unpack(pack(codes, bits), bits, len(values)), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("length", [1, 3, 7, 8, 9, 15, 17, 63, 65])
def test_round_trip_odd_lengths(bits, length):
    codes = _random_codes((3, length), bits, seed=length)
    assert torch.equal(unpack(pack(codes, bits), bits, length), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_extreme_codes_round_trip(bits):
    codes = torch.tensor([[0, (1 << bits) - 1] * 5 + [(1 << bits) - 1]])
    assert torch.equal(unpack(pack(codes, bits), bits, 11), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_zero_size_edges(bits):
    empty_rows = pack(torch.zeros(5, 0, dtype=torch.int64), bits)
    assert empty_rows.shape == (5, 0)
    assert unpack(empty_rows, bits, 0).shape == (5, 0)
    no_rows = pack(torch.zeros(0, 13, dtype=torch.int64), bits)
    assert no_rows.shape == (0, packed_length(13, bits))
    assert unpack(no_rows, bits, 13).shape == (0, 13)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_higher_rank_packs_along_last_dim(bits):
    codes = _random_codes((2, 3, 4, 5), bits, seed=bits)
    packed = pack(codes, bits)
    assert packed.shape == (2, 3, 4, packed_length(5, bits))
    assert torch.equal(unpack(packed, bits, 5), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_rows_are_independent(bits):
    codes = _random_codes((4, 21), bits, seed=bits)
    packed = pack(codes, bits)
    for row in range(4):
        assert torch.equal(packed[row], pack(codes[row], bits))
        assert torch.equal(unpack(packed[row : row + 1], bits, 21)[0], codes[row].to(torch.uint8))


@pytest.mark.parametrize(
    ("length", "bits", "expected"),
    [
        (0, 3, 0),
        (1, 2, 1),
        (1, 8, 1),
        (4, 2, 1),
        (5, 2, 2),
        (2, 4, 1),
        (3, 4, 2),
        (8, 3, 3),
        (9, 3, 4),
        (8, 5, 5),
        (3, 6, 3),
        (8, 7, 7),
        (768, 4, 384),
        (3072, 3, 1152),
    ],
)
def test_packed_length(length, bits, expected):
    assert packed_length(length, bits) == expected
    assert pack(torch.zeros(2, length, dtype=torch.int64), bits).shape == (2, expected)


def test_byte_layout_is_little_endian():
    assert pack(torch.tensor([1, 2]), 4).tolist() == [0x21]
    assert pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00_11_10_01]
    # 3 bits: code 2 occupies stream bits 6..8, i.e. the top two bits of byte 0 and bit 0 of byte 1.
    assert pack(torch.tensor([0, 0, 7, 0, 0, 0, 0, 0]), 3).tolist() == [0xC0, 0x01, 0x00]
    assert pack(torch.tensor([0, 0, 0, 0, 0, 0, 0, 7]), 3).tolist() == [0x00, 0x00, 0xE0]
    assert pack(torch.tensor([5, 200]), 8).tolist() == [5, 200]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int32, torch.int64, torch.float32, torch.float64])
def test_accepts_integer_valued_dtypes(dtype):
    codes = _random_codes((2, 10), 3, seed=1)
    assert torch.equal(pack(codes.to(dtype), 3), pack(codes, 3))


@pytest.mark.parametrize("bad", [0, 1, 9, 16, -4, 4.0, "4", None, True])
def test_bad_bits_raise(bad):
    with pytest.raises(ValueError, match=rf"bits must be .*between 2 and 8.*got {bad!r}"):
        pack(torch.zeros(3, dtype=torch.int64), bad)
    with pytest.raises(ValueError, match=r"bits must be .*between 2 and 8"):
        unpack(torch.zeros(3, dtype=torch.uint8), bad, 3)
    with pytest.raises(ValueError, match=r"bits must be .*between 2 and 8"):
        packed_length(3, bad)


@pytest.mark.parametrize(("bits", "codes"), [(4, [0, 16]), (2, [4]), (3, [-1, 2]), (8, [256]), (5, [0.0, 32.0])])
def test_out_of_range_codes_raise(bits, codes):
    with pytest.raises(ValueError, match=rf"codes must lie in \[0, {(1 << bits) - 1}\] for {bits}-bit packing"):
        pack(torch.tensor(codes), bits)


@pytest.mark.parametrize("value", [1.5, float("nan"), float("inf")])
def test_non_integer_codes_raise(value):
    with pytest.raises(ValueError, match="codes must"):
        pack(torch.tensor([0.0, value]), 4)


def test_other_bad_inputs_raise():
    with pytest.raises(ValueError, match="at least one dimension"):
        pack(torch.tensor(3), 4)
    with pytest.raises(ValueError, match="integer or float dtype"):
        pack(torch.tensor([True, False]), 4)
    with pytest.raises(ValueError, match="last dimension must be 2"):
        unpack(torch.zeros(4, 3, dtype=torch.uint8), 4, 4)
    with pytest.raises(ValueError, match="must be uint8"):
        unpack(torch.zeros(4, 2, dtype=torch.int32), 4, 4)
    with pytest.raises(ValueError, match="length must be >= 0"):
        packed_length(-1, 4)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("length", [1, 5, 8, 17, 64])
def test_layout_matches_a_bit_stream_written_by_hand(bits, length):
    """Every width (the byte-aligned 2/4/8-bit paths and the grouped 3/5/6/7-bit one) writes the same stream."""
    codes = torch.randint(0, 1 << bits, (3, length), generator=torch.Generator().manual_seed(bits * 100 + length))
    stream = [(int(code) >> b) & 1 for code in codes[1] for b in range(bits)]
    stream += [0] * (-len(stream) % 8)
    expected = [sum(stream[8 * i + j] << j for j in range(8)) for i in range(len(stream) // 8)]
    assert pack(codes, bits)[1].tolist() == expected
    assert torch.equal(unpack(pack(codes, bits), bits, length), codes.to(torch.uint8))
