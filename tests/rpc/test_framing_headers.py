"""Message framing and header rules (pure functions), with hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_jobs.rpc._headers import (
    MetadataError,
    decode_grpc_message,
    decode_metadata,
    encode_grpc_message,
    encode_metadata,
    format_timeout,
    parse_timeout,
)
from trio_jobs.rpc._messages import FramingError, MessageDecoder, encode_message

pytestmark = pytest.mark.sans_io  # protocol objects only: the transport does not apply


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


@given(
    st.lists(st.binary(max_size=300), max_size=20), st.lists(st.integers(0, 10_000), max_size=40)
)
def test_any_split_decodes_identically(messages: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(encode_message(m) for m in messages)
    dec = MessageDecoder(max_message=300)
    got: list[bytes] = []
    for piece in split_at(wire, cuts):
        got += dec.feed(piece)
    assert got == messages
    assert dec.at_boundary()


@given(st.binary(max_size=64), st.lists(st.integers(0, 100), max_size=10))
def test_garbage_never_raises_anything_but_framing_error(garbage: bytes, cuts: list[int]) -> None:
    dec = MessageDecoder(max_message=32)
    try:
        for piece in split_at(garbage, cuts):
            for m in dec.feed(piece):
                assert len(m) <= 32
    except FramingError:
        pass


def test_oversized_length_is_refused_before_buffering() -> None:
    dec = MessageDecoder(max_message=1024)
    with pytest.raises(FramingError) as info:
        dec.feed(b"\x00\x7f\xff\xff\xff" + b"x" * 10)  # 2 GiB announced
    assert info.value.too_large
    assert dec.pending == 0
    with pytest.raises(FramingError):
        dec.feed(b"more")


@pytest.mark.parametrize("flag", [1, 2, 0x80])
def test_compressed_or_unknown_flag(flag: int) -> None:
    with pytest.raises(FramingError) as info:
        MessageDecoder(max_message=10).feed(bytes([flag]) + b"\x00\x00\x00\x01x")
    assert not info.value.too_large


def test_partial_message_is_not_at_boundary() -> None:
    dec = MessageDecoder(max_message=10)
    assert dec.feed(b"\x00\x00\x00") == []
    assert not dec.at_boundary()
    assert dec.feed(b"\x00\x02ab\x00\x00\x00\x00\x00") == [b"ab", b""]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1H", 3600.0),
        (b"2M", 120.0),
        (b"3S", 3.0),
        (b"4m", 0.004),
        (b"5u", 5e-6),
        (b"6n", 6e-9),
        (b"99999999S", 99_999_999.0),
    ],
)
def test_parse_timeout(value: bytes, seconds: float) -> None:
    assert parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value", [b"", b"S", b"123456789S", b"1s", b"-1S", b"1.5S", b"1 S", b"1SS"]
)
def test_parse_timeout_rejects(value: bytes) -> None:
    with pytest.raises(ValueError, match="grpc-timeout"):
        parse_timeout(value)


@given(st.floats(min_value=0, max_value=10**9, allow_nan=False))
def test_format_timeout_round_trips_within_8_digits(seconds: float) -> None:
    raw = format_timeout(seconds)
    assert len(raw) <= 9  # at most 8 digits and a unit
    back = parse_timeout(raw)
    assert back >= seconds * (1 - 1e-9) - 1e-9
    assert back <= max(seconds * 1.001, seconds + 1e-6) or seconds > 99_999_999 * 60


@given(st.text(max_size=50))
def test_grpc_message_round_trip_and_is_ascii(message: str) -> None:
    raw = encode_grpc_message(message)
    assert all(0x20 <= b <= 0x7E for b in raw)
    assert decode_grpc_message(raw) == message.encode("utf-8", "replace").decode("utf-8", "replace")


def test_grpc_message_lenient_decode() -> None:
    assert decode_grpc_message(b"50%") == "50%"
    assert decode_grpc_message(b"%zz%4") == "%zz%4"
    assert decode_grpc_message(b"caf%C3%A9") == "café"


def test_metadata_round_trip_and_rules() -> None:
    md = (("x-a", "b c"), ("x-bin", b"\x00\x01\xff"), ("Upper", "ok"))
    headers = encode_metadata(md)
    assert headers[1] == (b"x-bin", b"AAH/")
    assert decode_metadata(headers) == (("x-a", "b c"), ("x-bin", b"\x00\x01\xff"), ("upper", "ok"))
    # unpadded base64 is accepted; reserved and pseudo headers are skipped
    assert decode_metadata([(b"k-bin", b"AAH"), (b"grpc-status", b"0"), (b":path", b"/")]) == (
        ("k-bin", b"\x00\x01"),
    )
    for bad in (
        ("grpc-x", "v"),
        ("bad key", "v"),
        ("te", "v"),
        ("k", "é"),
        ("k", "a\nb"),
        ("k", b"raw"),
    ):
        with pytest.raises(MetadataError):
            encode_metadata((bad,))
    with pytest.raises(MetadataError):
        decode_metadata([(b"k-bin", b"!!!")])
