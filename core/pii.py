"""Personal data redaction: emails, phone numbers, card numbers and order ids replaced by
placeholders. Used for training-data exports and, by default, for log lines."""

from __future__ import annotations

import re

_EMAIL = re.compile(r"\b[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+\b")
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
_ORDER = re.compile(
    r"\b((?:order|purchase|invoice|ticket|booking|confirmation|tracking|case)"
    r"(?:\s+(?:number|no\.?|id|code))?\s*:?\s*)(#?[A-Z0-9][A-Z0-9-]{3,})\b",
    re.I,
)
_HASH_ID = re.compile(r"(?<!\w)#\d{4,}\b")
_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}")
_PHONE = re.compile(r"(?<![\w+])\+?\(?\d(?:[\s().-]{0,2}\d){6,14}(?!\d)")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def redact_pii(text: str) -> str:
    """Emails, card numbers (Luhn), order ids and phone numbers replaced by placeholders.

    The placeholders are the Bitext ones, so redacted logs and Bitext look alike.
    """
    text = _EMAIL.sub("{{Email}}", text)
    text = _ORDER.sub(
        lambda m: m.group(0) if not re.search(r"\d", m.group(2))
        else f"{m.group(1)}{{{{Order Number}}}}",
        text,
    )

    def card(m: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", m.group(0))
        return "{{Card Number}}" if 13 <= len(digits) <= 19 and _luhn(digits) else m.group(0)

    text = _CARD.sub(card, text)
    text = _HASH_ID.sub("{{Order Number}}", text)
    return _PHONE.sub(
        lambda m: m.group(0) if _DATE.fullmatch(m.group(0)) else "{{Phone Number}}", text
    )
