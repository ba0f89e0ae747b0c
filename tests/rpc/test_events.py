"""The protocol core's events: keyword-only records that compare by class and fields."""

from __future__ import annotations

import pytest

from trio_jobs.rpc import _events as ev
from trio_jobs.rpc._status import StatusCode

pytestmark = pytest.mark.sans_io


def test_equal_by_class_and_fields() -> None:
    assert ev.WindowUpdated(stream_id=1) == ev.WindowUpdated(stream_id=1)
    assert ev.WindowUpdated(stream_id=1) != ev.WindowUpdated(stream_id=3)
    assert ev.WindowUpdated(stream_id=1) != ev.StreamEnded(stream_id=1)
    assert ev.SettingsReceived() == ev.SettingsReceived()
    assert ev.SettingsReceived() in [ev.WindowUpdated(stream_id=0), ev.SettingsReceived()]
    assert len({ev.StreamEnded(stream_id=1), ev.StreamEnded(stream_id=1)}) == 1


def test_repr_names_every_field() -> None:
    event = ev.CallCompleted(stream_id=5, code=StatusCode.NOT_FOUND, message="gone", metadata=())
    assert repr(event) == (
        f"CallCompleted(code={StatusCode.NOT_FOUND!r}, message='gone', metadata=(), stream_id=5)"
    )


def test_keyword_only_and_no_stray_attributes() -> None:
    with pytest.raises(TypeError):
        ev.StreamEnded(1)  # type: ignore[call-arg]
    event = ev.MessageReceived(stream_id=1, data=b"x", ack=6)
    with pytest.raises(AttributeError):
        event.extra = 1  # type: ignore[attr-defined]


def test_every_event_class_has_slots_and_keyword_init() -> None:
    classes = [c for c in vars(ev).values() if isinstance(c, type) and issubclass(c, ev.Event) and c is not ev.Event]
    assert len(classes) == 12
    for cls in classes:
        assert "__slots__" in vars(cls)
        assert not hasattr(cls(**dict.fromkeys(cls.__slots__)), "__dict__")
