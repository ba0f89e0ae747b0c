"""The memoising HPACK coder is byte-for-byte hpack's, whatever the header sequence."""

from __future__ import annotations

from typing import Any, NoReturn

import pytest
from hpack import Decoder, Encoder, HPACKError, NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_jobs.rpc._h2.hpack import MEMO_ENTRIES, MemoDecoder, MemoEncoder

pytestmark = pytest.mark.one_rpc_mode  # compares the rpc modes itself (or uses no protocol): one run

# A small alphabet so that blocks repeat (memo hits) and the table churns (evictions).
_NAMES = st.sampled_from([b"content-type", b"grpc-status", b"x-a", b"x-b", b":status"])
_VALUES = st.sampled_from([b"0", b"1", b"application/grpc", b"v" * 40, b"w" * 300])
_PAIR = st.tuples(_NAMES, _VALUES)
# plain pairs mostly; sometimes the two ways of asking hpack not to index a header
_HEADER = st.one_of(
    _PAIR,
    _PAIR,
    _PAIR,
    _PAIR.map(lambda p: NeverIndexedHeaderTuple(*p)),
    _PAIR.map(lambda p: (p[0], p[1], True)),
)
_HEADERS = st.lists(_HEADER, min_size=0, max_size=4)
_STEPS = st.lists(st.one_of(_HEADERS, st.sampled_from([64, 256, 4096])), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(steps=_STEPS)
def test_memo_coders_match_hpack(steps: list[list[Any] | int]) -> None:
    plain_enc, memo_enc = Encoder(), MemoEncoder()
    plain_dec, memo_dec = Decoder(), MemoDecoder(65536)
    for step in steps:
        if isinstance(step, int):  # the peer's SETTINGS_HEADER_TABLE_SIZE changed
            # (only to a new value: hpack's encoder loses a size update when it is set
            # twice to the same value, with or without the memo)
            if step != plain_enc.header_table_size:
                plain_enc.header_table_size = memo_enc.header_table_size = step
            continue
        block = plain_enc.encode(step)
        assert memo_enc.encode(step) == block
        expected = list(plain_dec.decode(block, raw=True))
        assert memo_dec.decode(block, raw=True) == expected
        assert [(bytes(n), bytes(v)) for n, v in expected] == [(h[0], h[1]) for h in step]


def _hpack_refuses(m: pytest.MonkeyPatch) -> None:
    """Make hpack's own coding raise: what the memo coders return then came from the memo."""

    def refuse(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError("hpack was called: not a memo hit")

    m.setattr(Encoder, "encode", refuse)
    m.setattr(Decoder, "decode", refuse)


def test_repeated_blocks_are_memoised_and_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A memo hit returns what an independent coder computes: hpack's own Encoder and
    Decoder, fed the same sequence, are the reference (never the memo itself)."""
    enc, dec = MemoEncoder(), MemoDecoder(65536)
    plain_enc, plain_dec = Encoder(), Decoder(65536)
    headers = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    first = enc.encode(headers)  # adds content-type to the table: not memoised
    assert first == plain_enc.encode(headers)
    assert not enc._memo
    assert dec.decode(first, raw=True) == plain_dec.decode(first, raw=True)
    assert not dec._memo
    again = enc.encode(headers)  # only reads the table now: memoised
    assert again != first
    assert again == plain_enc.encode(headers)
    expected = plain_dec.decode(again, raw=True)
    assert [(bytes(n), bytes(v)) for n, v in expected] == headers
    assert dec.decode(again, raw=True) == expected  # a miss, which fills the memo
    assert len(enc._memo) == len(dec._memo) == 1
    # the same block once more from each coder: hpack's answer, without hpack
    plain_again, expected_again = plain_enc.encode(headers), plain_dec.decode(again, raw=True)
    with monkeypatch.context() as m:
        _hpack_refuses(m)
        assert enc.encode(headers) == plain_again
        assert dec.decode(again, raw=True) == expected_again
    for i in range(3 * MEMO_ENTRIES):  # never-indexed literals: memoisable, all different
        block = Encoder().encode([(b"x-n", b"%d" % i, True)])
        dec.decode(block, raw=True)
    assert len(dec._memo) <= MEMO_ENTRIES


def test_malformed_block_raises_every_time() -> None:
    dec = MemoDecoder(65536)
    for _ in range(2):
        with pytest.raises(HPACKError):
            dec.decode(b"\xff\xff\xff\xff", raw=True)


def test_a_never_indexed_header_does_not_share_a_plain_pairs_block() -> None:
    plain, memo = Encoder(), MemoEncoder()
    sensitive = [NeverIndexedHeaderTuple(b"x-a", b"1")]
    pair = [(b"x-a", b"1")]
    for headers in (sensitive, pair, pair, sensitive):  # equal as tuples, not as headers
        assert memo.encode(headers) == plain.encode(headers)
