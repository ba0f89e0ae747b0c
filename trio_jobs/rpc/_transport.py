"""The byte transport under a connection: one interface, two implementations.

:class:`Transport` is what a connection (``_connection.py``) and the server's handshake use:
``do_handshake``, ``has_tls``, ``selected_alpn_protocol``, ``getpeercert``; ``write`` /
``write_pieces`` (never await), ``send_nowait``, ``send_some`` (the writer task),
``buffered``, ``queued_total``/``sent_total``; ``receive_into`` / ``receive_some``;
``linger``, ``aclose``, ``close``. :func:`open_transport` picks the implementation:

* :class:`SocketTransport` -- the lean TLS (``TRIO_JOBS_RPC_TRANSPORT=lean``, the default):
  ``ssl.SSLObject`` on the raw socket taken from a ``trio.SocketStream``;
* :class:`StreamTransport` -- any ``trio.abc.Stream``: a ``trio.SSLStream`` (a caller's
  ``trio.open_ssl_over_tcp_listeners``, or ``TRIO_JOBS_RPC_TRANSPORT=ssl-stream``), whose
  handshake, ALPN and peer certificate are asked of it; or a plain stream (memory streams
  in tests), with TLS done here when a context is given.

Theory of operation (the lean TLS)
----------------------------------
``trio.SSLStream`` costs a scheduler round (``cancel_shielded_checkpoint``) and a lock in
every ``send_all`` and ``receive_some``, on top of the socket's own round, and hands out
one TLS record (<= 16 KiB) per read. For the rpc layer that was most of the trio overhead
of a call. The lean transport does TLS itself, with ``ssl.SSLObject`` and two
``ssl.MemoryBIO``, and moves the ciphertext with non-blocking socket calls:

* :meth:`Transport.write` encrypts at once into the outgoing buffer. It never awaits, so any
  task may call it: the frames of concurrent tasks are never interleaved.
* :meth:`Transport.send_nowait` pushes that buffer into the kernel without waiting. When the
  socket takes everything (the common case) a write costs no scheduler round at all.
* :meth:`Transport.send_some` is for the connection's writer task only: it waits until the
  socket is writable and sends what it can. A cancelled wait leaves the buffer intact,
  so cancelling the writer never breaks the TLS session (unlike a half-done
  ``SSLStream.send_all``).
* :meth:`Transport.receive_into` costs exactly one scheduler round: it waits until the socket
  is readable (or yields after a read that succeeded at once, for fairness), then
  decrypts every byte it can from what the kernel had, up to ``max_bytes``, however many
  TLS records that is, straight into the caller's buffer (the connection's receive
  buffer, ``_h2/frames.py``). :meth:`Transport.receive_some` returns the same as a copy.

Over a stream the interface is the same, but the bytes go through the stream's
``send_all``/``receive_some``, so ``send_nowait`` sends nothing and the writer task does
every write.

Errors: every socket and TLS failure becomes ``trio.BrokenResourceError`` (from the
original exception), a transport we closed raises ``trio.ClosedResourceError``: the trio
meanings the rpc layer already maps to UNAVAILABLE. ``write`` and ``send_nowait`` never
raise (they are called from any task): a failure there is kept and raised by the next
``send_some``, which the writer is then woken to call.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import socket
import ssl
from typing import TYPE_CHECKING, Any, Final, cast, final

import trio

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

_SOCKET_READ: Final = 256 * 1024
_IOV_MAX: Final = 64  # pieces per sendmsg (Linux takes 1024)
_CLOSE_NOTIFY_TIMEOUT: Final = 1.0  # for a close_notify over a stream that may block
_LINGER_BYTES: Final = 4 * 1024 * 1024  # most input discarded by linger()


def open_transport(
    stream: trio.abc.Stream,
    ssl_context: ssl.SSLContext | None = None,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
    lean: bool = True,
) -> Transport:
    """The transport for ``stream``: a ``trio.SSLStream`` does its own TLS (then
    ``ssl_context`` must be None); a ``trio.SocketStream`` gets the lean TLS, or with
    ``lean=False`` a ``trio.SSLStream`` made here from ``ssl_context``; any other stream
    carries TLS done here (or plaintext without a context)."""
    if isinstance(stream, trio.SSLStream):
        if ssl_context is not None:
            raise ValueError("a trio.SSLStream does its own TLS: pass ssl_context=None")
        return StreamTransport(stream)
    if isinstance(stream, trio.SocketStream):
        if lean or ssl_context is None:
            return SocketTransport(stream, ssl_context, server_side=server_side, server_hostname=server_hostname)
        tls = trio.SSLStream(stream, ssl_context, server_side=server_side, server_hostname=server_hostname)
        return StreamTransport(tls)
    return StreamTransport(stream, ssl_context, server_side=server_side, server_hostname=server_hostname)


class Transport:
    """Plaintext in and out of one connection (see the module docstring): the TLS done
    here (``ssl.SSLObject``) and the queue of bytes to send; subclasses move the bytes.

    Ownership: the transport owns the stream (or the socket detached from a
    ``trio.SocketStream``) it was made from; :meth:`aclose` closes it.
    One task at a time may call :meth:`receive_some` and one :meth:`send_some`.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None = None,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
    ) -> None:
        self._tls: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        if ssl_context is not None:
            self._tls = ssl_context.wrap_bio(
                self._incoming,
                self._outgoing,
                server_side=server_side,
                server_hostname=server_hostname,
            )
        self._handshaken = ssl_context is None
        # Bytes to send (ciphertext when TLS), as the pieces they were written in: appending
        # to one bytearray moved everything unsent at every write (its memmove was a
        # third of a streaming server's samples), a queue of pieces copies nothing.
        self._out: collections.deque[bytes | bytearray | memoryview] = collections.deque()
        self._out_bytes = 0  # their total length
        self._in_flight = 0  # bytes a stream's send_all is writing now (StreamTransport)
        self.queued_total = 0  # bytes ever appended to _out
        self.sent_total = 0  # bytes ever handed to the kernel (or to the stream)
        self._failed: BaseException | None = None
        self._peer_eof = False
        self._close_notify_sent = False
        self._closed = False

    # -- TLS ----------------------------------------------------------------------------
    async def do_handshake(self) -> None:
        """Run the TLS handshake (no-op without TLS). Raises BrokenResourceError.

        Not under a timeout of its own: the caller puts it under one.
        """
        if self._handshaken:
            return
        tls = self._tls
        assert tls is not None
        while True:
            try:
                tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError as exc:
                self._collect_tls_output()  # the alert, best effort
                self.send_nowait()
                self._failed = exc
                raise trio.BrokenResourceError(exc) from exc
            self._collect_tls_output()
            while self._out:
                await self.send_some()
            if done:
                self._handshaken = True
                return
            chunk = await self._receive_raw()
            if chunk:
                self._incoming.write(chunk)
            else:  # the next do_handshake() raises SSLEOFError
                self._incoming.write_eof()

    @property
    def has_tls(self) -> bool:
        """The connection is TLS (done here, or by a trio.SSLStream)."""
        return self._tls is not None

    def selected_alpn_protocol(self) -> str | None:
        return self._tls.selected_alpn_protocol() if self._tls is not None else None

    def getpeercert(self) -> dict[str, Any] | None:
        if self._tls is None or not self._handshaken:
            return None
        return self._tls.getpeercert()

    def _collect_tls_output(self) -> None:
        if self._outgoing.pending:
            self._queue(self._outgoing.read())

    def _queue(self, data: bytes | bytearray | memoryview) -> None:
        self._out.append(data)
        self._out_bytes += len(data)
        self.queued_total += len(data)

    def _take(self) -> bytes:
        """Everything queued, as one piece (for a stream's send_all)."""
        data = b"".join(self._out)
        self._out.clear()
        self._out_bytes = 0
        return data

    # -- sending --------------------------------------------------------------------------
    @property
    def buffered(self) -> int:
        """Bytes written but not handed to the kernel (or the stream) yet."""
        return self._out_bytes + self._in_flight

    def write(self, data: bytes | bytearray) -> None:
        """Queue ``data`` (encrypted at once with TLS, else copied). Never awaits nor raises."""
        if self._failed is not None or self._closed:
            return
        if self._tls is None:
            self._queue(bytes(data))
            return
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:  # the session is dead (an alert was received)
            self._failed = exc
            return
        self._collect_tls_output()

    def write_pieces(self, pieces: Sequence[bytes | bytearray | memoryview]) -> None:
        """Queue ``pieces`` in order (never awaits nor raises).

        With TLS here they are gathered into one buffer and encrypted in one write: the
        one copy of the bytes between the application's message and the cipher
        (``SSLObject.write`` takes one buffer, and one write per piece cost more than the
        copy: measured on a 64 KiB stream, three writes per message were slower than a
        gather). Without TLS here they are queued as they are. The pieces must not change
        afterwards (the rpc layer's are immutable bytes, views of them, or buffers handed
        over).
        """
        if self._failed is not None or self._closed:
            return
        tls = self._tls
        if tls is None:
            for piece in pieces:
                if piece:
                    self._queue(piece)
            return
        try:
            tls.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        except ssl.SSLError as exc:  # the session is dead (an alert was received)
            self._failed = exc
            return
        self._collect_tls_output()

    def send_nowait(self) -> bool:
        """Hand what the kernel takes now to it; True if nothing is left. Never awaits
        nor raises (an error is kept for :meth:`send_some`)."""
        raise NotImplementedError

    async def send_some(self) -> None:
        """Send some of the buffer, waiting only if nothing can be sent now (the writer
        task only)."""
        raise NotImplementedError

    # -- receiving ------------------------------------------------------------------------
    async def _receive_raw(self) -> bytes | bytearray:
        """One read of ciphertext (or plaintext without TLS here): exactly one scheduler
        round. b'' = EOF."""
        raise NotImplementedError

    async def receive_into(self, reserve: Callable[[int], memoryview], max_bytes: int) -> int:
        """Up to ``max_bytes`` of plaintext, written into ``reserve(k)`` (a writable view
        of ``k`` bytes, ``k`` at least what is written, the view released before this
        returns); returns the count, 0 at the peer's end (close_notify + EOF).

        TLS decrypts straight into the view: no copy of its own, no object per record.
        One scheduler round per call. Raises BrokenResourceError (a transport or TLS
        failure, an EOF without close_notify) or ClosedResourceError (we closed).
        """
        self._check_usable()
        tls = self._tls
        if tls is None:
            data = await self._receive_raw()
            with reserve(len(data)) as view:
                view[:] = data
            return len(data)
        incoming = self._incoming
        waited = False
        while True:
            # Plaintext available now is at most what is buffered, decrypted or not.
            if incoming.pending or tls.pending() or incoming.eof:
                with reserve(max(1, min(max_bytes, incoming.pending + tls.pending()))) as view:
                    n = self._decrypt_into(view)
                if self._outgoing.pending:  # e.g. a KeyUpdate answer: the caller flushes it
                    self._collect_tls_output()
                if n or self._peer_eof:
                    if not waited:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return n
            chunk = await self._receive_raw()
            waited = True
            if chunk:
                incoming.write(chunk)
            else:  # the next read raises SSLEOFError unless a close_notify came first
                incoming.write_eof()

    async def receive_some(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of plaintext (a copy; see :meth:`receive_into`)."""
        buf = bytearray()

        def reserve(n: int) -> memoryview:
            buf[:] = bytes(n)
            return memoryview(buf)

        n = await self.receive_into(reserve, max_bytes)
        return bytes(buf[:n])

    def _decrypt_into(self, view: memoryview) -> int:
        """Decrypt what the records buffered so far hold into ``view``; the count."""
        tls = self._tls
        assert tls is not None
        read = tls.read
        incoming = self._incoming
        size = len(view)
        total = 0
        # Reading until SSLWantReadError costs an exception per call; with nothing left
        # in the BIO and nothing decrypted pending, that is known without asking.
        while total < size and (not total or incoming.pending or tls.pending()):
            try:
                # With a buffer, read() returns the count (typeshed says bytes).
                n = cast("int", read(size - total, view[total:]))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._peer_eof = True
                break
            except ssl.SSLError as exc:
                self._failed = exc
                if total:  # hand out what came before the failure first
                    break
                raise trio.BrokenResourceError(exc) from exc
            if not n:  # close_notify
                self._peer_eof = True
                break
            total += n
        return total

    # -- closing --------------------------------------------------------------------------
    def _send_close_notify(self) -> None:
        """Queue close_notify once (if the session is healthy); push it without waiting."""
        if self._tls is None or not self._handshaken or self._failed is not None:
            return
        if self._close_notify_sent:
            return
        self._close_notify_sent = True
        # SSLWantReadError: unwrap() wants the peer's close_notify; not waited for.
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()
        self._collect_tls_output()
        self.send_nowait()

    # -- closing --------------------------------------------------------------------------
    async def linger(self, limit: float, max_bytes: int = _LINGER_BYTES) -> None:
        """After our last bytes (a GOAWAY): let a peer that is still sending get them
        before any reset (:class:`SocketTransport`; a no-op elsewhere)."""

    async def aclose(self) -> None:
        """Send close_notify if the session is healthy (best effort, bounded), then close.
        Idempotent; always closes, even when cancelled."""
        raise NotImplementedError

    def close(self) -> None:
        """Close at once, no close_notify; wakes a task waiting on the transport."""
        self._closed = True
        self._out.clear()
        self._out_bytes = 0

    def _check_open(self) -> None:
        """ClosedResourceError once we closed the transport."""
        if self._closed:
            raise trio.ClosedResourceError("the connection was closed")

    def _check_usable(self) -> None:
        """ClosedResourceError once we closed it, BrokenResourceError once it failed."""
        self._check_open()
        if self._failed is not None:
            raise trio.BrokenResourceError(self._failed) from self._failed

    def _tls_closing(self) -> bool:
        """A close_notify is due: the session is healthy and none was sent."""
        return (
            self._tls is not None
            and self._handshaken
            and self._failed is None
            and not self._close_notify_sent
        )


@final
class SocketTransport(Transport):
    """The lean TLS on a socket taken over from a ``trio.SocketStream`` (module docstring)."""

    def __init__(
        self,
        stream: trio.SocketStream,
        ssl_context: ssl.SSLContext | None = None,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
    ) -> None:
        super().__init__(ssl_context, server_side=server_side, server_hostname=server_hostname)
        # We take the file descriptor over: non-blocking calls on it directly, trio only
        # for waiting. (TCP_NODELAY was set by SocketStream; it stays set.)
        self._sock = socket.socket(fileno=stream.socket.detach())
        self._sock.setblocking(False)
        self._last_read_full = True  # the last socket read filled its buffer (see _receive_raw)

    def send_nowait(self) -> bool:
        """Hand what the socket takes now to the kernel; True if nothing is left.

        Never awaits nor raises (a socket error is kept for :meth:`send_some`).
        """
        out = self._out
        if not out:
            return True
        sock = self._sock
        if self._failed is not None or self._closed:
            return False
        try:
            n = sock.send(out[0]) if len(out) == 1 else sock.sendmsg(itertools.islice(out, _IOV_MAX))
        except BlockingIOError:
            return False
        except OSError as exc:
            self._failed = exc
            return False
        self.sent_total += n
        self._out_bytes -= n
        while n:
            head = out[0]
            if len(head) > n:
                out[0] = memoryview(head)[n:]
                break
            n -= len(head)
            out.popleft()
        return not out

    async def send_some(self) -> None:
        """Send some of the buffer, waiting only if the socket takes nothing now.

        Writer task only. Not a checkpoint when the socket takes bytes at once (the
        writer loops only while it has bytes, so it cannot spin).
        """
        self._check_usable()
        if not self._out:
            return
        before = self.sent_total
        if not self.send_nowait() and self.sent_total == before and self._failed is None:
            await trio.lowlevel.wait_writable(self._sock)
            self.send_nowait()
        if self._failed is not None:
            raise trio.BrokenResourceError(self._failed) from self._failed

    async def _receive_raw(self) -> bytes | bytearray:
        """One read from the socket: exactly one scheduler round. b'' = EOF."""
        self._check_open()
        sock = self._sock
        await trio.lowlevel.checkpoint_if_cancelled()
        # Read at once only if the last read filled its buffer (a bulk stream: more is
        # likely there). After a short read the socket was empty, and in a conversation
        # (a call, its answer) it still is: trying costs a syscall and an exception.
        if self._last_read_full:
            try:
                data = sock.recv(_SOCKET_READ)
            except BlockingIOError:
                self._last_read_full = False
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc
            else:
                self._last_read_full = len(data) == _SOCKET_READ
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(_SOCKET_READ)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc
            self._last_read_full = len(data) == _SOCKET_READ
            return data

    async def linger(self, limit: float, max_bytes: int = _LINGER_BYTES) -> None:
        """After our last bytes (a GOAWAY): close_notify and FIN, then discard input a while.

        Closing a socket with unread input makes the kernel reset the connection, and a
        peer that is still sending (a flood) may then lose the GOAWAY that says why.
        Reads and drops what arrives until EOF, an error, ``limit`` seconds or
        ``max_bytes``; no decryption.
        """
        if self._closed or self._failed is not None:
            return
        sock = self._sock
        self._send_close_notify()
        with trio.move_on_after(limit):
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                return
            drained = 0
            while drained < max_bytes:
                await trio.lowlevel.wait_readable(sock)
                try:
                    data = sock.recv(_SOCKET_READ)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                drained += len(data)

    async def aclose(self) -> None:
        if self._closed:
            return
        if self._tls_closing():
            self._send_close_notify()  # sent (or dropped: the socket is full), never waited for
        self.close()

    def close(self) -> None:
        super().close()
        sock = self._sock
        if sock.fileno() != -1:
            trio.lowlevel.notify_closing(sock)
            sock.close()


@final
class StreamTransport(Transport):
    """A connection over any ``trio.abc.Stream`` (module docstring): a ``trio.SSLStream``
    does the TLS (its handshake, ALPN and certificate are asked of it); over another
    stream TLS is done here when ``ssl_context`` is given. Every write is the writer's."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        ssl_context: ssl.SSLContext | None = None,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
    ) -> None:
        self._stream = stream
        self._ssl_stream: trio.SSLStream[trio.abc.Stream] | None = None
        if isinstance(stream, trio.SSLStream):
            if ssl_context is not None:
                raise ValueError("a trio.SSLStream does its own TLS: pass ssl_context=None")
            self._ssl_stream = stream
        super().__init__(ssl_context, server_side=server_side, server_hostname=server_hostname)
        if self._ssl_stream is not None:
            self._handshaken = False

    async def do_handshake(self) -> None:
        if self._ssl_stream is None:
            await super().do_handshake()
        elif not self._handshaken:
            await self._ssl_stream.do_handshake()  # (its errors are trio's Broken/Closed already)
            self._handshaken = True

    @property
    def has_tls(self) -> bool:
        return self._ssl_stream is not None or self._tls is not None

    def selected_alpn_protocol(self) -> str | None:
        if self._ssl_stream is None:
            return super().selected_alpn_protocol()
        return cast("str | None", self._ssl_stream.selected_alpn_protocol())

    def getpeercert(self) -> dict[str, Any] | None:
        if self._ssl_stream is None:
            return super().getpeercert()
        if not self._handshaken:
            return None
        return cast("dict[str, Any] | None", self._ssl_stream.getpeercert())

    def send_nowait(self) -> bool:
        """Only the writer sends over a stream: True only when nothing is left."""
        return not self._out and self._in_flight == 0

    async def send_some(self) -> None:
        self._check_usable()
        if not self._out:
            return
        chunk = self._take()
        self._in_flight = len(chunk)
        try:
            await self._stream.send_all(chunk)
        finally:
            self._in_flight = 0
        self.sent_total += len(chunk)

    async def _receive_raw(self) -> bytes | bytearray:
        self._check_open()
        return await self._stream.receive_some(_SOCKET_READ)

    async def aclose(self) -> None:
        if self._closed:
            return
        try:
            if self._tls_closing():
                self._send_close_notify()
                if self._in_flight == 0 and self._out:
                    with _bounded_and_quiet():
                        await self._stream.send_all(self._take())
            elif self._ssl_stream is not None and self._handshaken and self._in_flight == 0:
                # trio sends close_notify without waiting for the peer's; bounded anyway.
                with _bounded_and_quiet():
                    await self._ssl_stream.aclose()
        finally:
            self.close()
            await trio.aclose_forcefully(self._stream)


@contextlib.contextmanager
def _bounded_and_quiet() -> Iterator[None]:
    """A best-effort close step: shielded, at most _CLOSE_NOTIFY_TIMEOUT, its failures
    ignored (the transport is closed right after anyway)."""
    with (
        trio.move_on_after(_CLOSE_NOTIFY_TIMEOUT, shield=True),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError),
    ):
        yield
