"""HPACK with memoised header blocks: gRPC sends and receives the same few blocks over and over.

A unary call's headers (``:status 200``, ``content-type``), its trailers (``grpc-status
0``) and a client's request headers for one method are identical call after call. After
the first time they are in the HPACK dynamic table, and encoding or decoding them again
only reads the table, so the same input maps to the same output for as long as the table
does not change. h2 nevertheless runs hpack's per-header Python code (and its debug
logging) every time: about a fifth of a unary call's protocol CPU.

Correctness rests on one invariant: a result is reused only if the header table is in
exactly the state it was in when the result was computed, and computing it did not change
the table. :class:`_VersionedTable` counts every change (insertion, eviction by insertion,
resize), so "same version" means "same table". A block whose encoding or decoding adds to
the table (a literal with incremental indexing, a size update) is never memoised, and the
encoder's pending size-update signal bypasses the memo entirely. Errors are never
memoised: a malformed block raises every time.

Buffers: each memo holds at most :data:`MEMO_ENTRIES` blocks of at most
:data:`MEMO_MAX_BLOCK` bytes and is simply cleared when full, so a peer that sends ever
new blocks costs a dict clear now and then, never memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, final

import h2.events
from h2.utilities import HeaderValidationFlags, normalize_inbound_headers, validate_headers
from hpack import Decoder, Encoder
from hpack.table import HeaderTable

if TYPE_CHECKING:
    from collections.abc import Iterable

MEMO_ENTRIES: Final = 16
MEMO_MAX_BLOCK: Final = 1024


@final
class _VersionedTable(HeaderTable):
    """A header table that counts its changes in ``version``."""

    def __init__(self) -> None:
        super().__init__()
        self.version = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.version += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.version += 1
        HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]


@final
class MemoEncoder(Encoder):
    """hpack's Encoder, reusing the block of a header list it encoded at this table state."""

    def __init__(self) -> None:
        super().__init__()
        self.header_table = self._table = _VersionedTable()
        self._memo: dict[tuple[Any, ...], tuple[int, bytes]] = {}

    def encode(self, headers: Iterable[Any], huffman: bool = True) -> bytes:
        table = self._table
        if table.resized or isinstance(headers, dict):  # a size update goes first: no memo
            return super().encode(headers, huffman)
        items = list(headers)
        # Only plain (name, value) pairs: a NeverIndexedHeaderTuple or a 3-tuple asking for
        # no indexing compares equal to (or differs only in length from) a plain pair but
        # must not share its block.
        if any(type(h) is not tuple or len(h) != 2 for h in items):
            return super().encode(items, huffman)
        key = (huffman, *items)
        hit = self._memo.get(key)
        if hit is not None and hit[0] == table.version:
            return hit[1]
        version = table.version
        block = super().encode(items, huffman)
        if table.version == version and len(block) <= MEMO_MAX_BLOCK:
            if len(self._memo) >= MEMO_ENTRIES:
                self._memo.clear()
            self._memo[key] = (version, block)
        return block


@final
class MemoDecoder(Decoder):
    """hpack's Decoder, reusing the headers of a block it decoded at this table state."""

    def __init__(self, max_header_list_size: int) -> None:
        super().__init__(max_header_list_size)
        self.header_table = self._table = _VersionedTable()
        self._memo: dict[bytes, tuple[int, int, int, list[Any]]] = {}

    def decode(self, data: bytes, raw: bool = False) -> list[Any]:
        if not raw or len(data) > MEMO_MAX_BLOCK:
            return list(super().decode(data, raw))
        table = self._table
        key = bytes(data)
        hit = self._memo.get(key)
        if (
            hit is not None
            and hit[0] == table.version
            and hit[1] == self.max_header_list_size
            and hit[2] == self.max_allowed_table_size
        ):
            return list(hit[3])
        version = table.version
        headers = list(super().decode(key, raw))
        if table.version == version:
            if len(self._memo) >= MEMO_ENTRIES:
                self._memo.clear()
            limits = (self.max_header_list_size, self.max_allowed_table_size)
            self._memo[key] = (version, *limits, headers)
        return list(headers)


@final
class HeaderChecker:
    """h2's inbound header normalisation and validation, memoised per header list.

    h2 runs them (a chain of seven generators per header) on every received block; they
    are a pure function of the header list and the validation flags, so a list seen
    before passes (or fails) the same way. The protocol turns h2's inbound checks off and
    calls :meth:`check` for every header event instead, before looking at the headers;
    a failure raises h2's ProtocolError, which closes the connection as h2 itself would.
    Bounded like the HPACK memos (``MEMO_ENTRIES`` lists of ``MEMO_MAX_BLOCK`` bytes).
    """

    def __init__(self, *, client_side: bool) -> None:
        self._client = client_side
        self._memo: dict[tuple[Any, ...], list[Any]] = {}

    def check(self, event: h2.events.Event) -> list[Any]:
        headers: list[Any] = getattr(event, "headers", None) or []
        flags = HeaderValidationFlags(
            is_client=self._client,
            is_trailer=isinstance(event, h2.events.TrailersReceived),
            is_response_header=isinstance(
                event, h2.events.ResponseReceived | h2.events.InformationalResponseReceived
            ),
            is_push_promise=isinstance(event, h2.events.PushedStreamReceived),
        )
        key = (flags, *headers)
        hit = self._memo.get(key)
        if hit is not None:
            return list(hit)
        checked = list(validate_headers(normalize_inbound_headers(headers, flags), flags))
        if sum(len(n) + len(v) for n, v in headers) <= MEMO_MAX_BLOCK:
            if len(self._memo) >= MEMO_ENTRIES:
                self._memo.clear()
            self._memo[key] = checked
        return list(checked)
