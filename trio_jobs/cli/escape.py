"""Text that is safe to show on a terminal (DESIGN §3: no terminal spoofing).

Every authenticated user is presumed hostile, and a job's command and arguments, the job id
and owner the server reports, and the server's error messages (which quote what a user sent)
end up on another person's terminal: an admin's ``trio-jobs list --all``. Printed raw, an
argument holding ``\\r``, ``\\n``, ``ESC [1A`` (cursor up), ``ESC [2K`` (erase line), a C1
CSI (U+009B) or a bidi override (U+202E) can erase, move or reorder what the admin sees and
draw a fake row. So every human-readable line the CLI prints goes through
:func:`terminal_safe` (or :func:`shell_join`, built on it); ``--json`` does not need it
(protobuf's JSON is ASCII, with every control escaped) and ``tail`` prints the job's bytes
by design.

What is escaped. A character is shown as an escape when

- Python's ``str.isprintable()`` refuses it: the categories Cc (C0 controls with tab, CR and
  LF, DEL, C1 controls U+0080-U+009F), Cf (format characters: the bidi embeddings, overrides
  and isolates U+202A-U+202E and U+2066-U+2069, the marks U+200E, U+200F, U+061C, zero-width
  spaces and joiners, the BOM, soft hyphen, tag characters), Cs (surrogates: see below), Co
  (private use), Cn (unassigned: a newer terminal may know one as something invisible), Zl,
  Zp, and every space separator but the ASCII space (a no-break space would make one
  argument look like two);
- or it is a default-ignorable character that Python calls printable but a terminal draws
  as nothing (Hangul fillers, the combining grapheme joiner, variation selectors): invisible
  text is how two different commands are made to look the same;
- or it is the backslash, which starts every escape. It is doubled so that the output names
  exactly one input (the escaping is injective): ``\\x1b`` on screen is an ESC character and
  ``\\\\x1b`` the four characters backslash, x, 1, b. Without that, a user could write the
  text of an escape and pass it off as another one.

The notation is bash's ``$'...'`` (ANSI-C quoting), which is also Python's for the code
points: ``\\t`` ``\\n`` ``\\r``; ``\\xHH`` for another ASCII control; ``\\uHHHH`` and
``\\UHHHHHHHH`` for a code point; and ``\\xHH`` from 80 to ff for a *byte* that was not UTF-8
(Python keeps such a byte as a lone surrogate U+DC80-U+DCFF, ``surrogateescape``). So
``\\x9b`` is the byte 9b and ``\\u009b`` the character U+009B, exactly as bash reads them,
and :func:`shell_join` can print a command line that pastes back into bash as the same argv.

The cost is that a harmless emoji with a variation selector shows as ``\\ufe0f`` after it,
and a Windows-style path shows doubled backslashes (outside a command line). Column widths
are counted on the escaped text; wide (East Asian) characters still count as one column,
which can shift a column but cannot hide or fake anything.
"""

from __future__ import annotations

import re
import shlex
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterable

# Default_Ignorable_Code_Point characters (Unicode DerivedCoreProperties) that
# str.isprintable() accepts; the others are Cf or Cn and already refused.
_INVISIBLE: Final = re.compile(
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u3164\ufe00-\ufe0f\uffa0\U000e0100-\U000e01ef]"
)
_SHORT: Final = {"\t": "\\t", "\n": "\\n", "\r": "\\r", "\\": "\\\\"}


def _escape_char(char: str) -> str:
    short = _SHORT.get(char)
    if short is not None:
        return short
    n = ord(char)
    if n < 0x80 or 0xDC80 <= n <= 0xDCFF:  # an ASCII control, or a byte that was not UTF-8
        return f"\\x{n & 0xFF:02x}"
    if n <= 0xFFFF:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def _is_shown_raw(char: str) -> bool:
    return char.isprintable() and _INVISIBLE.match(char) is None


def _is_plain(text: str) -> bool:
    """No character of ``text`` needs an escape (the backslash aside)."""
    return text.isprintable() and _INVISIBLE.search(text) is None


def terminal_safe(text: str) -> str:
    """``text`` with every control, invisible and bidi character (and the backslash)
    escaped; see the module's head for the rule. Injective: two texts never give the same
    result. The result holds no character a terminal would act on, and no line break."""
    if "\\" not in text and _is_plain(text):
        return text  # the common case, checked at C speed
    return "".join(
        char if char != "\\" and _is_shown_raw(char) else _escape_char(char) for char in text
    )


def shell_join(argv: Iterable[str]) -> str:
    """A command line for people that bash reads back as exactly ``argv``.

    A word with nothing to escape is quoted as ``shlex.join`` does (``'a b'``; a backslash is
    literal inside single quotes); a word with a control, invisible or bidi character, or a
    byte that is not UTF-8, is written in bash's ANSI-C quoting, ``$'...'``, with
    :func:`terminal_safe`'s escapes, which are that quoting's own.
    """
    words = []
    for word in argv:
        if _is_plain(word):
            words.append(shlex.quote(word))
        else:
            words.append("$'" + terminal_safe(word).replace("'", "\\'") + "'")
    return " ".join(words)


def lines_safe(text: str) -> str:
    """Each line of ``text`` escaped, the line breaks kept (a traceback)."""
    return "\n".join(terminal_safe(line) for line in text.split("\n"))
