"""A stand-in for systemd's end of ``$NOTIFY_SOCKET``, and waits on it.

``notify_socket`` binds a datagram unix socket (abstract by default, as systemd's own
``@/org/freedesktop/systemd1/notify/...``), puts its name in ``$NOTIFY_SOCKET`` for every
``trio-jobs serve`` the test starts (``Host.env()`` passes the test's environment on), and
hands the test a :class:`NotifyListener`. Waiting is select-based and bounded: no sleeping.
A reload's end is therefore observable exactly: ``RELOADING=1`` and then ``READY=1``.
"""

from __future__ import annotations

import selectors
import socket
import time
import uuid
from typing import TYPE_CHECKING, Final

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

NOTIFY_TIMEOUT: Final = 60.0


class NotifyListener:
    def __init__(self, name: str) -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + name[1:].encode() if name.startswith("@") else name)
        self.received: list[str] = []  # every datagram so far, in order

    def expect(self, line: str, timeout: float = NOTIFY_TIMEOUT) -> str:
        """The next datagram that holds ``line`` (e.g. ``READY=1``) as one of its lines;
        datagrams before it are kept in ``received``. TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise TimeoutError(f"no {line!r} on NOTIFY_SOCKET within {timeout}s (got {self.received})")
                message = self.sock.recv(4096).decode()
                self.received.append(message)
                if line in message.split("\n"):
                    return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    listener = NotifyListener(f"@trio-jobs-test/notify/{uuid.uuid4().hex}")
    monkeypatch.setenv("NOTIFY_SOCKET", listener.name)
    try:
        yield listener
    finally:
        listener.close()
