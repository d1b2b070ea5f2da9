"""Stable identities: how two spellings of one account compare equal (``oncall-7`` == ``ONCALL-7`` == ``ｏｎｃａｌｌ-７``).

Used by the console (who is logged in), policy (separation of duties) and the ledger (who did what). Display names
are never compared.
"""

from __future__ import annotations

import unicodedata

from pilothouse.bus.errors import PermanentError

MAX_ID_CHARS = 256

# Invisible code points outside Unicode category Cf (which is removed wholesale).
_INVISIBLE_RANGES = (
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x115F, 0x1160),  # Hangul choseong/jungseong fillers
    (0x17B4, 0x17B5),  # Khmer inherent vowels
    (0x180B, 0x180F),  # Mongolian free variation selectors
    (0x3164, 0x3164),  # Hangul filler
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFFA0, 0xFFA0),  # halfwidth Hangul filler
    (0xE0100, 0xE01EF),  # variation selectors supplement
)


class IdentityInvalid(PermanentError):
    """An identity that cannot be compared safely (empty, too long, control characters)."""


def is_invisible(ch: str) -> bool:
    """True for zero-width, bidi, tag-block, variation selectors and other code points that render as nothing."""
    if unicodedata.category(ch) == "Cf":
        return True
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _INVISIBLE_RANGES)


def strip_invisible(text: str) -> str:
    """Remove every invisible code point."""
    return "".join(ch for ch in text if not is_invisible(ch))


def normalise_identity(raw: str) -> str:
    """The stable, comparable form of a principal id: invisible characters removed, NFKC + casefold, trimmed.

    Refuses (IdentityInvalid) rather than repairs an id that is empty afterwards or still holds control characters.
    """
    if not isinstance(raw, str):
        raise IdentityInvalid(f"identity must be a string, got {type(raw).__name__}")
    text = strip_invisible(raw)
    # casefold can produce non-NFKC sequences: normalise again afterwards (Unicode's NFKC_Casefold recipe).
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    text = strip_invisible(text).strip()
    if not text:
        raise IdentityInvalid(f"identity {raw!r} is empty after normalisation")
    if len(text) > MAX_ID_CHARS:
        raise IdentityInvalid(f"identity longer than {MAX_ID_CHARS} characters")
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in text):
        raise IdentityInvalid(f"identity {raw!r} contains control characters")
    return text
