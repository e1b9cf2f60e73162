"""Whole numbers read from text: the one parser every number of slurm-quota goes through.

Owns: what counts as a number (ASCII digits only, optionally one sign where the caller allows
it; never Unicode digits, `_` separators, hex or exponents, which Python's int() and float()
accept and the Lua plugin does not) and how many digits are read at all. Callers check the
range of the value and word the message. Pure: no I/O, no imports (the charge fast path
imports it).
"""

from __future__ import annotations

# Longest digit string read at all: more than any value slurm-quota reads needs, far below
# the length at which int() refuses (4300 digits on Python 3.11) or gets slow.
MAX_DIGITS = 30


def is_ascii_digits(text: str) -> bool:
    """True when text is one or more of 0-9 and nothing else (str.isdigit() also takes ², ٣)."""
    return text.isascii() and text.isdigit()


def int_or_none(text: object, *, signed: bool = False) -> int | None:
    """The integer written in text (surrounding spaces ignored), else None.

    ASCII digits only, at most MAX_DIGITS of them; with signed=True one leading + or - is
    allowed.
    """
    if not isinstance(text, str):
        return None
    value = text.strip()
    sign = 1
    if signed and value[:1] in ("+", "-"):
        sign = -1 if value[0] == "-" else 1
        value = value[1:]
    if len(value) > MAX_DIGITS or not is_ascii_digits(value):
        return None
    return sign * int(value)


def shown(text: object) -> str:
    """text as a short quoted form for a message (40 characters at most)."""
    value = str(text)
    return repr(value if len(value) <= 40 else value[:40] + "…")
