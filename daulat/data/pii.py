"""PII scrubbing: e-mail addresses, phone numbers, IBANs and payment-card numbers become typed placeholders.

    text, counts = scrub("Mail ana@example.co.id or call +62 812-3456-7890.")
    # "Mail <EMAIL> or call <PHONE>.", Counter({"email": 1, "phone": 1})

Patterns find candidates; checksums decide for the types that have one, so that an order number or a
timestamp is not taken for a card: an IBAN must pass ISO 13616's mod-97 check with its country's length,
a card number (13 to 19 digits, spaces or dashes between groups) Luhn's check. Phone numbers have no
checksum: a candidate needs an international prefix (+62, +49, 0049) or a national trunk 0 followed by
enough digits, 8 to 15 in all (E.164), written with the separators people use (spaces, dashes, dots,
parentheses). A number inside an IBAN-shaped string that fails its check ("DE89 3704 0044 0532 0130 01",
a typo or a made-up example) is left as it is, not read as a phone or card number from its tail
("0044 0532..." looks like a call to +44). Only counts per type are returned, never the values, so a manifest can say how much was
removed without keeping any of it.
"""

from __future__ import annotations

import re
from collections import Counter

PLACEHOLDERS = {"email": "<EMAIL>", "iban": "<IBAN>", "card": "<CARD_NUMBER>", "phone": "<PHONE>"}

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}(?![\w-])")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,3})?(?![A-Za-z0-9])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_PHONE = re.compile(r"(?<![\w+])(?:\+|00)\d{1,3}[\s.-]?(?:\(0\)[\s.-]?)?(?:\(?\d{1,5}\)?[\s.-]?){1,5}\d{2,5}(?!\w)"
                    r"|(?<![\w+])\(?0\d{1,4}\)?[\s.-]?\d{2,5}(?:[\s.-]?\d{2,5}){1,3}(?!\w)")

# ISO 13616 lengths of the IBAN of each country (the ones most users meet; others are checked by mod 97 only)
_IBAN_LENGTHS = {
    "AD": 24, "AT": 20, "BE": 16, "BG": 22, "CH": 21, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "EE": 20,
    "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28, "IE": 22, "IS": 26, "IT": 27,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31, "NL": 18, "NO": 15, "PL": 28, "PT": 25,
    "RO": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TR": 26, "AE": 23, "SA": 24, "QA": 29,
}


def iban_is_valid(candidate: str) -> bool:
    """ISO 13616: the right length for its country, and mod 97 of the rearranged number is 1."""
    iban = candidate.replace(" ", "").upper()
    if not 15 <= len(iban) <= 34 or _IBAN_LENGTHS.get(iban[:2], len(iban)) != len(iban):
        return False
    digits = "".join(str(int(c, 36)) for c in iban[4:] + iban[:4])
    return int(digits) % 97 == 1


def luhn_is_valid(candidate: str) -> bool:
    """Luhn's checksum, the one every payment-card number carries in its last digit."""
    digits = [int(c) for c in candidate if c.isdigit()]
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _phone_is_plausible(candidate: str) -> bool:
    digits = sum(c.isdigit() for c in candidate)
    return 8 <= digits <= 15


def scrub(text: str, kinds=tuple(PLACEHOLDERS)) -> tuple[str, Counter]:
    """(text with each PII value of `kinds` replaced by its placeholder, counts per kind).

    Order matters: e-mails first (their local part may hold digits), then the checksummed numbers, then
    phones, so that a valid card number is reported as a card and not as a phone.
    """
    counts: Counter = Counter()
    protected: list[tuple[int, int]] = []  # spans of IBAN-shaped strings that failed the IBAN check
    checks = {"email": (_EMAIL, None), "iban": (_IBAN, iban_is_valid), "card": (_CARD, luhn_is_valid),
              "phone": (_PHONE, _phone_is_plausible)}
    for kind in ("email", "iban", "card", "phone"):
        if kind not in kinds:
            continue
        pattern, valid = checks[kind]
        if kind in ("card", "phone"):  # after the IBAN pass every IBAN-shaped string left is an invalid one
            protected = [m.span() for m in _IBAN.finditer(text)]

        def replace(match, kind=kind, valid=valid):
            start, end = match.span()
            if any(start < p_end and p_start < end for p_start, p_end in protected):
                return match.group(0)
            if valid is not None and not valid(match.group(0)):
                return match.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        text = pattern.sub(replace, text)
    return text, counts
