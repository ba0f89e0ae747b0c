"""The output log on its own: replay invariants (hypothesis), cap, closing, file reads."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_jobs.worker.errors import InvalidArgument
from trio_jobs.worker.output import OutputLog, write_all


def _random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# Appends from 0 B to 1 MiB. Big ones are generated from a seed (hypothesis cannot draw a
# megabyte), small ones are drawn byte by byte; one case holds every byte value.
APPEND = st.one_of(
    st.binary(max_size=300),
    st.builds(_random_bytes, st.integers(0, 1 << 20), st.integers(0, 2**32)),
    st.just(bytes(range(256))),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_follower_gets_exactly_output_from_its_offset(data: st.DataObject) -> None:
    appends = data.draw(st.lists(APPEND, max_size=10), label="appends")
    total = sum(map(len, appends))
    tail_size = data.draw(st.sampled_from([1, 100, 4096, 256 * 1024]), label="tail")
    # each follower: (joins after this many appends [len+1 = after the end], offset,
    # max_chunk, checkpoints between chunks, wait)
    followers = data.draw(st.lists(st.tuples(
        st.integers(0, len(appends) + 1),
        st.integers(0, total + 10),
        st.integers(max(1, total // 500), 1 << 20),
        st.integers(0, 3),
        st.booleans(),
    ), max_size=6), label="followers")
    writer_pauses = data.draw(st.lists(st.integers(0, 3), min_size=len(appends),
                                       max_size=len(appends)), label="writer pauses")
    # per append: through append(), or as the pump does it -- the writer writes the file
    # itself and publishes only the bytes the in-memory tail keeps
    tail_only = data.draw(st.lists(st.booleans(), min_size=len(appends), max_size=len(appends)),
                          label="tail-only publishes")
    expected = b"".join(appends)

    async def scenario(directory: Path) -> None:
        log = await OutputLog.create(directory / "out", cap=1 << 40, tail_size=tail_size)
        results: dict[int, tuple[int, bytes]] = {}

        async def follow(i: int, offset: int, max_chunk: int, pause: int, wait: bool) -> None:
            end_at_start = log.size
            got = bytearray()
            async for chunk in log.follow(offset, wait=wait, max_chunk=max_chunk):
                assert chunk.offset == offset + len(got)  # in order, no gap, no repeat
                assert 0 < len(chunk.data) <= max_chunk
                got += chunk.data
                for _ in range(pause):
                    await trio.lowlevel.checkpoint()
            if wait:  # ended only because the job ended and everything was read
                assert log.ended
                assert offset + len(got) == max(log.size, offset)
            results[i] = (end_at_start, bytes(got))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                def join(moment: int) -> None:
                    for i, (when, offset, max_chunk, pause, wait) in enumerate(followers):
                        if when == moment:
                            nursery.start_soon(follow, i, offset, max_chunk, pause, wait)

                for k, chunk in enumerate(appends):
                    join(k)
                    if tail_only[k]:
                        write_all(log.write_fd, chunk)
                        log.publish(chunk[-tail_size:], dropped=False, written=len(chunk))
                    else:
                        await log.append(chunk)
                    for _ in range(writer_pauses[k]):
                        await trio.lowlevel.checkpoint()
                join(len(appends))
                log.finish()
                join(len(appends) + 1)
        assert log.size == total
        assert (directory / "out").read_bytes() == expected
        for i, (_, offset, _, _, wait) in enumerate(followers):
            end_at_start, got = results[i]
            assert got == (expected[offset:] if wait else expected[offset:end_at_start])

    with tempfile.TemporaryDirectory() as d:
        trio.run(scenario, Path(d))


async def test_a_publish_must_bring_what_the_tail_keeps(tmp_path: Path) -> None:
    log = await OutputLog.create(tmp_path / "out", cap=1 << 20, tail_size=10)
    write_all(log.write_fd, b"0123456789abcdef")
    with pytest.raises(ValueError, match="last 10"):
        log.publish(b"abcdef", dropped=False, written=16)  # the ring would miss 4 bytes
    with pytest.raises(ValueError, match="of 16 bytes"):
        log.publish(b"x" * 17, dropped=False, written=16)  # more than was written
    assert log.size == 0  # nothing was published
    log.publish(b"6789abcdef", dropped=False, written=16)
    assert log.size == 16
    assert log.tail_read(6, 100) == b"6789abcdef"
    assert log.tail_read(5, 100) is None  # before the tail: from the file
    log.finish()
    assert b"".join([c.data async for c in log.follow(0)]) == b"0123456789abcdef"


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 5000), max_size=8), cap=st.integers(0, 20000))
def test_cap_keeps_a_prefix_and_says_truncated(sizes: list[int], cap: int) -> None:
    chunks = [bytes([i % 256]) * n for i, n in enumerate(sizes)]
    expected = b"".join(chunks)

    async def scenario(directory: Path) -> None:
        log = await OutputLog.create(directory / "out", cap=cap, tail_size=1000)
        for chunk in chunks:
            await log.append(chunk)
        log.finish()
        got = b"".join([c.data async for c in log.follow(0)])
        assert got == expected[:cap]
        assert log.truncated == (len(expected) > cap)
        assert (directory / "out").read_bytes() == expected[:cap]

    with tempfile.TemporaryDirectory() as d:
        trio.run(scenario, Path(d))


async def test_follower_waits_without_polling_and_wakes_on_append(tmp_path: Path) -> None:
    log = await OutputLog.create(tmp_path / "out", cap=1 << 20)
    reader = log.follow(0)
    got: list[bytes] = []

    async def consume() -> None:
        async for chunk in reader:
            got.append(chunk.data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        await trio.testing.wait_all_tasks_blocked()  # parked on the event, not spinning
        assert got == []
        await log.append(b"abc")
        await trio.testing.wait_all_tasks_blocked()
        assert got == [b"abc"]
        log.finish()
    assert got == [b"abc"]


async def test_aclose_from_another_task_ends_a_waiting_reader(tmp_path: Path) -> None:
    log = await OutputLog.create(tmp_path / "out", cap=1 << 20)
    reader = log.follow(0)
    ended = trio.Event()

    async def consume() -> None:
        async for _ in reader:
            raise AssertionError("no data was written")
        ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        await trio.testing.wait_all_tasks_blocked()
        await reader.aclose()
        await reader.aclose()  # idempotent
        with trio.fail_after(5):
            await ended.wait()
    log.finish()


async def test_two_tasks_on_one_reader_is_busy(tmp_path: Path) -> None:
    log = await OutputLog.create(tmp_path / "out", cap=1 << 20)
    reader = log.follow(0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.__anext__)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await reader.__anext__()
        await log.append(b"x")
    log.finish()
    await reader.aclose()


async def test_bad_offsets_are_invalid_arguments(tmp_path: Path) -> None:
    log = await OutputLog.create(tmp_path / "out", cap=10)
    with pytest.raises(InvalidArgument, match="offset"):
        log.follow(-1)
    with pytest.raises(InvalidArgument, match="max_chunk"):
        log.follow(0, max_chunk=0)
    log.finish()
    assert [c async for c in log.follow(1000)] == []  # past the end of an ended log: nothing


async def test_old_bytes_come_from_the_file_and_match(tmp_path: Path) -> None:
    """Data far behind the tail is read from the spool file (page cache or a thread)."""
    log = await OutputLog.create(tmp_path / "out", cap=1 << 30, tail_size=4096)
    payload = random.Random(1).randbytes(3 << 20)
    for i in range(0, len(payload), 65536):
        await log.append(payload[i : i + 65536])
    log.finish()
    digest = hashlib.sha256()
    async for chunk in log.follow(0, max_chunk=1 << 20):
        digest.update(chunk.data)
    assert digest.digest() == hashlib.sha256(payload).digest()
    # a view of an ended log (as after a restart) reads the same file
    view = OutputLog.ended_log(tmp_path / "out", size=len(payload))
    assert b"".join([c.data async for c in view.follow(len(payload) - 10)]) == payload[-10:]


async def test_shorter_file_than_recorded_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "out").write_bytes(b"12345")
    view = OutputLog.ended_log(tmp_path / "out", size=10)
    reader = view.follow(0)
    assert (await reader.__anext__()).data == b"12345"
    with pytest.raises(Exception, match="shorter"):
        await reader.__anext__()
    await reader.aclose()


async def test_bytes_not_in_the_page_cache_are_read_in_a_thread(tmp_path: Path) -> None:
    log = await OutputLog.create(tmp_path / "out", cap=1 << 30, tail_size=1)
    payload = random.Random(2).randbytes(1 << 20)
    await log.append(payload)
    log.finish()
    fd = os.open(tmp_path / "out", os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages can be dropped from the cache
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert b"".join([c.data async for c in log.follow(0, max_chunk=1 << 20)]) == payload
