"""Terminal-safe text (trio_jobs/cli/escape.py): nothing a terminal acts on gets through,
two texts never look the same, and a command line reads back in bash as the same argv.

The checks use their own oracle of "dangerous" (Unicode categories, written out here) and
their own decoder of the escapes, not the module's predicates.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_jobs.cli.escape import shell_join, terminal_safe
from trio_jobs.cli.output import list_table, status_table
from trio_jobs.cli.serve_io import TerminalSafeFormatter
from trio_jobs.client import JobInfo
from trio_jobs.v1 import jobs_pb2 as pb

# what a terminal must never receive raw
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad\u034f\u115f\u1160\u3164\uffa0\ufe0f\U000e0001\U000e0100"
NASTY = "\x00\x07\x08\t\n\x0b\x0c\r\x1b\x7f\x80\x85\x9b\x9d\u00a0\u2028\u2029\u3000" + BIDI + INVISIBLE
SPOOF = [
    "\r\x1b[2K8e0f5f5e-6f0b-4c59-9a44-3b8a6c1f2d10  admin  running",
    "\n8e0f5f5e-6f0b-4c59-9a44-3b8a6c1f2d10  admin  exited 0",
    "x\x1b[1A\x1b[2Kup",
    "\x9b1A\x9b2K",  # C1 CSI
    "\u202eexe.txt",
    "a\tb",
    "\\x1b",  # the *text* of an escape
    "\udcff\udc9b",  # bytes that were not UTF-8 (surrogateescape)
]
IN_PROTO = SPOOF[:-1]  # (a protobuf string is UTF-8: it cannot hold the last one)


def dangerous(char: str) -> bool:
    cat = unicodedata.category(char)
    return (
        cat in {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
        or (cat == "Zs" and char != " ")
        or char in NASTY
    )


_ESCAPE = re.compile(r"\\(?:x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8})|([tnr\\]))")


def unescape(text: str) -> str:
    """The test's own decoder: bash's $'...' reading (\\xHH >= 80 is a raw byte)."""
    def one(m: re.Match[str]) -> str:
        hx, u4, u8, short = m.groups()
        if hx is not None:
            n = int(hx, 16)
            return chr(n) if n < 0x80 else chr(0xDC00 + n)
        if short is not None:
            return {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}[short]
        return chr(int(u4 or u8, 16))

    out = _ESCAPE.sub(one, text)
    return out


# text biased towards what matters: controls, bidi, invisible characters, backslashes and
# escape-looking text (most characters), and any code point at all (the rest)
_special = st.sampled_from(NASTY + "\\xu0123456789abcdefU '\"$")
_escapes = st.sampled_from(["\\x1b", "\\u202e", "\\n", "\\\\", "\\xff", "\\U000e0001", "\\"])
tricky = st.lists(
    st.one_of(
        _special,
        _special,
        _escapes,
        st.characters(codec=None, categories=None),
        st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
    ),
    max_size=40,
).map("".join)


@pytest.mark.parametrize("char", NASTY)
def test_each_known_dangerous_character_is_escaped(char: str) -> None:
    out = terminal_safe(f"a{char}b")
    assert out.startswith("a\\")
    assert out.endswith("b")
    assert not any(dangerous(c) for c in out)


@given(tricky)
def test_no_dangerous_character_gets_through(text: str) -> None:
    out = terminal_safe(text)
    assert not any(dangerous(c) for c in out), ascii(out)


@given(tricky)
def test_escaping_is_injective(text: str) -> None:
    assert unescape(terminal_safe(text)) == text


@given(tricky, st.data())
def test_different_texts_never_look_the_same(a: str, data: st.DataObject) -> None:
    # the likeliest collision: a text that spells out another's escapes
    b = data.draw(st.one_of(tricky, st.just(terminal_safe(a)), st.just(a.replace("\\", ""))))
    if a != b:
        assert terminal_safe(a) != terminal_safe(b)


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\")))
def test_plain_text_is_unchanged(text: str) -> None:
    assert terminal_safe(text) == text


def test_notation() -> None:
    assert terminal_safe("a\x1b[2K\r\n\tb") == "a\\x1b[2K\\r\\n\\tb"
    assert terminal_safe("\x7f\x9b\u202e\U000e0001") == "\\x7f\\u009b\\u202e\\U000e0001"
    assert terminal_safe("\\x1b") == "\\\\x1b"  # the text, not the character
    assert terminal_safe("\udcff") == "\\xff"  # the byte ff, not U+00FF
    assert terminal_safe("caf\u00e9 \u65e5\u672c \U0001f600") == "caf\u00e9 \u65e5\u672c \U0001f600"


@given(st.lists(tricky, max_size=5))
def test_shell_join_is_terminal_safe(argv: list[str]) -> None:
    out = shell_join(argv)
    assert not any(dangerous(c) for c in out), ascii(out)


def test_shell_join_keeps_shlex_form_for_plain_words() -> None:
    assert shell_join(["sh", "-c", "echo 'a b'", "a\\b", ""]) == "sh -c 'echo '\"'\"'a b'\"'\"'' 'a\\b' ''"
    assert shell_join(["echo", "it's\x1b"]) == "echo $'it\\'s\\x1b'"


def _bash_argv(line: str) -> list[bytes]:
    """What bash makes of ``line`` as the arguments of printf."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on this host")
    out = subprocess.run(
        [bash, "--norc", "--noprofile", "-c", "printf '%s\\0' " + line],
        capture_output=True,
        check=True,
        timeout=30,
        env={"LC_ALL": "C.UTF-8", "PATH": os.defpath},
    ).stdout
    return out.split(b"\0")[:-1]


# bash cannot pass NUL in an argument, and a lone surrogate other than a surrogateescape'd
# byte cannot come from a command line or the wire
words = st.text(
    alphabet=st.one_of(
        st.sampled_from(NASTY.replace("\x00", "") + "\\'\"$`!*?~ {}()#;&|<>\n"),
        st.characters(codec="utf-8", exclude_characters="\x00"),
        st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
    ),
    max_size=12,
)


@settings(max_examples=40, deadline=None)
@given(st.lists(words, min_size=1, max_size=4))
def test_bash_reads_the_command_line_back_as_the_same_argv(argv: list[str]) -> None:
    assert _bash_argv(shell_join(argv)) == [os.fsencode(w) for w in argv]


def test_bash_reads_the_spoofing_payloads_back() -> None:
    argv = ["/usr/bin/echo", *(w for w in SPOOF)]
    assert _bash_argv(shell_join(argv)) == [os.fsencode(w) for w in argv]


def _job(args: list[str], job_id: str = "8e0f5f5e-6f0b-4c59-9a44-3b8a6c1f2d10", owner: str = "alice") -> JobInfo:
    msg = pb.JobStatus(job_id=job_id, owner=owner, command="echo", args=args, state=pb.JOB_STATE_EXITED, exit_code=0)
    msg.created_at.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    msg.ended_at.FromDatetime(datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC))
    return JobInfo.from_proto(msg)


def test_tables_escape_every_cell_and_line_up() -> None:
    jobs = [
        _job([payload], job_id=f"id-{i}\x1b[2K", owner=f"alice\r{i}\u202e") for i, payload in enumerate(IN_PROTO)
    ]
    table = list_table(jobs, show_owner=True)
    lines = table.split("\n")
    assert len(lines) == len(jobs) + 1
    assert not any(dangerous(c) for c in "".join(lines))
    starts = {line.index("exited 0") for line in lines[1:]}
    assert len(starts) == 1  # widths measured on the escaped text: the STATE column is straight
    assert lines[0].index("STATE") in starts
    for job in jobs:
        status = status_table(job).split("\n")
        assert len(status) == 10
        assert not any(dangerous(c) for c in "".join(status))


def test_log_formatter_escapes_message_and_traceback() -> None:
    try:
        raise ValueError("client sent \x1b[2K\rFAKE\nline")
    except ValueError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "call %s failed", ("\u202eevil",), sys.exc_info())
    out = TerminalSafeFormatter().format(record)
    assert not any(dangerous(c) for c in out.replace("\n", ""))
    assert out.split("\n")[0] == "call \\u202eevil failed"
    # a traceback keeps its line breaks (so an exception's \n is one too), nothing else
    assert out.split("\n")[-2:] == ["ValueError: client sent \\x1b[2K\\rFAKE", "line"]
