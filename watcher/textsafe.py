"""Text that is safe to show on a terminal: control characters made visible.

A file's name can hold any byte but ``/`` and NUL; shown raw on a terminal, an escape sequence
in it could clear the screen, set the window title or forge a log line. ``visible`` is the one
function every human-facing line (the console log renderer, a CLI message) passes such values
through. JSON lines need none of this: ``json.dumps`` escapes control characters already.
"""

from __future__ import annotations

# line/paragraph separators and the bidirectional overrides/isolates (they reorder what follows)
_UNICODE_CONTROLS = frozenset({0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)})
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if code < 0x20 or 0x7F <= code <= 0x9F:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # a file name's byte that is not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code in _UNICODE_CONTROLS or 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    return ch


def visible(text: str) -> str:
    """``text`` with every character a terminal would act on written as an escape.

    Escaped: the C0 controls U+0000..U+001F (newline as ``\\n``, carriage return as ``\\r``,
    tab as ``\\t``, the others as ``\\xNN``, so ESC is ``\\x1b`` and an escape sequence is
    shown as text, never acted on), DEL U+007F and the C1 controls U+0080..U+009F (``\\xNN``;
    U+009B is a one-character CSI), U+2028/U+2029 (line and paragraph separators), the
    bidirectional embeddings, overrides and isolates U+202A..U+202E and U+2066..U+2069
    (``\\uNNNN``: they would reorder the rest of the line) and lone surrogates (``\\uNNNN``; a
    file name's byte that is not UTF-8, decoded as U+DC80..U+DCFF, is shown as that byte,
    ``\\xNN``). A backslash is doubled so an escape shown can never be mistaken for one made.
    Every other character, printable non-ASCII included, is left as it is.
    """
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape(ch) for ch in text)
