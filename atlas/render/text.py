"""How token strings are shown: visible markers for whitespace and control characters.

Token strings may hold spaces, newlines, tabs, control characters and any unicode. Example text keeps
spaces as they are (they separate words) and replaces line breaks, tabs and control characters by
visible markers, and invisible format characters (Unicode category Cf, such as U+200B) by
``⟨U+200B⟩``; token chips (top tokens, logit tables) also show spaces as ``·`` so that `` the`` and
``the`` differ. ``assets/atlas.js`` (``Atlas.visible``) applies the same rules in the browser; the
static facts of a page use these Python functions.
"""

from __future__ import annotations

import unicodedata

_BASE = {"\n": "↵", "\t": "⇥", "\r": "␍", "\x7f": "␡"}
_EXAMPLE_TABLE = {i: chr(0x2400 + i) for i in range(32)}
_EXAMPLE_TABLE.update({ord(k): v for k, v in _BASE.items()})


def _format_char(c: str) -> str:
    return f"⟨U+{ord(c):04X}⟩" if unicodedata.category(c) == "Cf" else c


def visible(token: str) -> str:
    """A token as shown inside example text: line breaks, tabs, control and format characters made visible."""
    s = token.translate(_EXAMPLE_TABLE)
    if not s.isascii():
        s = "".join(map(_format_char, s))
    return s


def chip(token: str) -> str:
    """A token as shown on its own (a chip): like :func:`visible`, and spaces shown as ``·``."""
    s = visible(token).replace(" ", "·")
    return s if s else "∅"
