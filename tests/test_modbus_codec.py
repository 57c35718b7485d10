"""Register codec: every data type, word order, byte order and scale, both ways."""

from __future__ import annotations

import itertools
import math

import pytest

from lmgw.modbus.codec import DATA_TYPES, EncodeError, Encoding, decode, encode, value_range

ORDERS = list(itertools.product(("big", "little"), ("big", "little")))
SAMPLES = {
    "u16": [0, 1, 0x1234, 65535],
    "s16": [-32768, -1, 0, 1234, 32767],
    "u32": [0, 1, 0x12345678, 4294967295],
    "s32": [-2147483648, -1, 0, 70000, 2147483647],
    "f32": [0.0, -1.5, 3.25, 12345.5, -0.125],
}


@pytest.mark.parametrize("word_order,byte_order", ORDERS)
@pytest.mark.parametrize("dtype", sorted(SAMPLES))
def test_round_trip_every_type_and_order(dtype, word_order, byte_order):
    enc = Encoding(dtype, word_order, byte_order)
    for value in SAMPLES[dtype]:
        registers = encode(enc, value)
        assert len(registers) == enc.count and all(0 <= r <= 0xFFFF for r in registers)
        assert decode(enc, registers) == value


def test_word_and_byte_order_layout():
    # 0x11223344 as the four documented layouts (ABCD, CDAB, BADC, DCBA)
    assert encode(Encoding("u32", "big", "big"), 0x11223344) == [0x1122, 0x3344]
    assert encode(Encoding("u32", "little", "big"), 0x11223344) == [0x3344, 0x1122]
    assert encode(Encoding("u32", "big", "little"), 0x11223344) == [0x2211, 0x4433]
    assert encode(Encoding("u32", "little", "little"), 0x11223344) == [0x4433, 0x2211]
    assert encode(Encoding("u16", byte_order="little"), 0x1234) == [0x3412]
    assert encode(Encoding("f32"), 1.0) == [0x3F80, 0x0000]


@pytest.mark.parametrize("dtype,scale,value", [
    ("s32", 0.1, 1234.5), ("s32", 0.1, -0.3), ("u16", 0.01, 655.35), ("s16", 0.1, -21.5),
    ("u32", 1000, 5000), ("f32", 0.001, 12.5), ("u16", 1, 7),
])
def test_scaled_round_trip_has_no_float_noise(dtype, scale, value):
    enc = Encoding(dtype, scale=scale)
    assert decode(enc, encode(enc, value)) == value


def test_unscaled_integers_stay_integers():
    assert isinstance(decode(Encoding("u16"), [7]), int)
    assert decode(Encoding("s32", scale=0.1), encode(Encoding("s32", scale=0.1), 123.4)) == 123.4


def test_f32_not_a_number_reads_as_null():
    assert decode(Encoding("f32"), [0x7FC0, 0x0000]) is None
    assert decode(Encoding("f32"), [0x7F80, 0x0000]) is None  # infinity


def test_bool():
    enc = Encoding("bool")
    assert encode(enc, True) == [1] and encode(enc, False) == [0]
    assert decode(enc, [True]) is True and decode(enc, [0]) is False


@pytest.mark.parametrize("dtype,scale,value,message", [
    ("u16", 1, 65536, "does not fit"),
    ("u16", 1, -1, "does not fit"),
    ("s16", 0.1, 3276.8, "does not fit"),
    ("u32", 1, 2 ** 32, "does not fit"),
    ("u16", 1, 1.5, "not a multiple"),
    ("s32", 0.1, 0.05, "not a multiple"),
    ("f32", 1, 1e39, "does not fit"),
    ("f32", 1, math.inf, "finite"),
    ("u16", 1, math.nan, "finite"),
    ("u16", 1, True, "expected a number"),
    ("u16", 1, "12", "expected a number"),
    ("bool", 1, 1, "true or false"),
])
def test_values_that_do_not_fit_are_refused(dtype, scale, value, message):
    with pytest.raises(EncodeError, match=message):
        encode(Encoding(dtype, scale=scale), value)


def test_bad_encodings_and_register_counts():
    with pytest.raises(ValueError, match="unknown data type"):
        Encoding("u64")
    with pytest.raises(ValueError, match="word_order"):
        Encoding("u32", word_order="middle")
    with pytest.raises(ValueError, match="scale"):
        Encoding("u16", scale=0)
    with pytest.raises(ValueError, match="needs 2"):
        decode(Encoding("u32"), [1])
    assert set(DATA_TYPES) == {"bool", *SAMPLES}


@pytest.mark.parametrize("dtype,scale,expected", [
    ("u16", 1, (0, 65535)), ("s16", 0.1, (-3276.8, 3276.7)), ("u32", 1, (0, 4294967295)),
    ("s32", 1, (-2147483648, 2147483647)), ("u16", 0.01, (0, 655.35)), ("bool", 1, None),
])
def test_value_range_is_what_the_type_holds_after_scaling(dtype, scale, expected):
    assert value_range(Encoding(dtype, scale=scale)) == expected
    if expected is not None:
        enc = Encoding(dtype, scale=scale)
        assert [decode(enc, encode(enc, v)) for v in expected] == list(expected)


def test_f32_range():
    low, high = value_range(Encoding("f32"))
    assert low == -high and encode(Encoding("f32"), high) == [0x7F7F, 0xFFFF]
