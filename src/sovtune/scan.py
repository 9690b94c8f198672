"""Secret and PII scan of training rows: counts per kind (never the values), and redaction before tokenising.

Patterns favour precision: card numbers must pass Luhn and start like an issuer's; IBANs must pass mod-97 and
have their country's length; phone numbers need a leading + or the usual separators.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from sovtune.core import secrets
from sovtune.core.secrets import PII, SECRET, SECRET_DETECTORS, Detector, Finding, placeholder
from sovtune.errors import DataError


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


# Issuer prefixes (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro): Luhn alone passes 1 in 10
# random digit strings, the prefix keeps order numbers and ids out.
_CARD_PREFIX = re.compile(
    r"^(4|5[1-5]|2(2[2-9]|[3-6]\d|7[01]|720)|3[47]|6011|65|64[4-9]|35|30[0-5]|36|38|62|5[06-9]|6\d)"
)


def _card_valid(match: str) -> bool:
    digits = re.sub(r"[ -]", "", match)
    return 13 <= len(digits) <= 19 and bool(_CARD_PREFIX.match(digits)) and luhn_valid(digits)


# ISO 13616 registry lengths; a country missing here is accepted on the checksum alone.
IBAN_LENGTHS = {
    "AD": 24,
    "AE": 23,
    "AL": 28,
    "AT": 20,
    "AZ": 28,
    "BA": 20,
    "BE": 16,
    "BG": 22,
    "BH": 22,
    "BR": 29,
    "BY": 28,
    "CH": 21,
    "CR": 22,
    "CY": 28,
    "CZ": 24,
    "DE": 22,
    "DK": 18,
    "DO": 28,
    "EE": 20,
    "EG": 29,
    "ES": 24,
    "FI": 18,
    "FO": 18,
    "FR": 27,
    "GB": 22,
    "GE": 22,
    "GI": 23,
    "GL": 18,
    "GR": 27,
    "GT": 28,
    "HR": 21,
    "HU": 28,
    "IE": 22,
    "IL": 23,
    "IQ": 23,
    "IS": 26,
    "IT": 27,
    "JO": 30,
    "KW": 30,
    "KZ": 20,
    "LB": 28,
    "LC": 32,
    "LI": 21,
    "LT": 20,
    "LU": 20,
    "LV": 21,
    "MC": 27,
    "MD": 24,
    "ME": 22,
    "MK": 19,
    "MR": 27,
    "MT": 31,
    "MU": 30,
    "NL": 18,
    "NO": 15,
    "PK": 24,
    "PL": 28,
    "PS": 29,
    "PT": 25,
    "QA": 29,
    "RO": 24,
    "RS": 22,
    "SA": 24,
    "SC": 31,
    "SE": 24,
    "SI": 19,
    "SK": 24,
    "SM": 27,
    "ST": 25,
    "SV": 28,
    "TL": 23,
    "TN": 24,
    "TR": 26,
    "UA": 29,
    "VA": 22,
    "VG": 24,
    "XK": 20,
}


def iban_valid(match: str) -> bool:
    iban = match.replace(" ", "").upper()
    expected = IBAN_LENGTHS.get(iban[:2])
    if (expected is not None and len(iban) != expected) or not 15 <= len(iban) <= 34:
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def _phone_valid(match: str) -> bool:
    return 8 <= sum(char.isdigit() for char in match) <= 15


# Order matters: earlier detectors claim their spans first (a secret is not also PII, a card number is not also a
# phone number).
DETECTORS: tuple[Detector, ...] = SECRET_DETECTORS + (
    # Bounded parts (RFC 5321 limits) keep the scan linear on long runs like "a.a.a.a..." that never reach an "@".
    Detector(
        "email",
        PII,
        re.compile(
            r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
            r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?){0,8}\.[A-Za-z]{2,24}\b"
        ),
    ),
    Detector("iban", PII, re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"), iban_valid),
    Detector("card_number", PII, re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), _card_valid),
    Detector(
        "phone_number",
        PII,
        re.compile(
            r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
            r"|\(\d{3}\) ?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?![\w])"
        ),
        _phone_valid,
    ),
)
KINDS = tuple(detector.kind for detector in DETECTORS)


def find(text: str) -> list[Finding]:
    """Non-overlapping secret and PII findings in `text`, in order of position."""
    return secrets.find(text, DETECTORS)


def redact(text: str) -> tuple[str, list[Finding]]:
    findings = find(text)
    pieces, cursor = [], 0
    for finding in findings:
        pieces.append(text[cursor : finding.start])
        pieces.append(placeholder(finding.kind))
        cursor = finding.end
    pieces.append(text[cursor:])
    return "".join(pieces), findings


def _walk(value: Any, on_text: Callable[[str], str]) -> Any:
    """Apply `on_text` to every string in a row (nested messages included), keys untouched."""
    if isinstance(value, str):
        return on_text(value)
    if isinstance(value, dict):
        return {key: _walk(item, on_text) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_walk(item, on_text) for item in value)
    return value


@dataclass
class ScanReport:
    """What the scan found: counts per kind and where (row origins), never the matched values."""

    policy: str
    rows_scanned: int = 0
    rows_flagged: int = 0
    counts: Counter = field(default_factory=Counter)
    origins: list[str] = field(default_factory=list)  # first few flagged rows, "file:line"

    MAX_ORIGINS = 10

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add_row(self, origin: str, findings: list[Finding]) -> None:
        self.rows_scanned += 1
        if not findings:
            return
        self.rows_flagged += 1
        self.counts.update(finding.kind for finding in findings)
        if len(self.origins) < self.MAX_ORIGINS:
            self.origins.append(origin)

    def summary(self) -> dict[str, Any]:
        categories = Counter()
        for detector in DETECTORS:
            categories[detector.category] += self.counts.get(detector.kind, 0)
        return {
            "policy": self.policy,
            "rows_scanned": self.rows_scanned,
            "rows_flagged": self.rows_flagged,
            "findings": {kind: self.counts[kind] for kind in KINDS if self.counts.get(kind)},
            "secrets": categories[SECRET],
            "pii": categories[PII],
            "redacted": self.policy == "redact",
            "first_flagged_rows": list(self.origins),
        }

    def describe(self) -> str:
        return describe(self.summary())


def describe(summary: dict[str, Any]) -> str:
    """One line from a scan summary (as stored in data_stats.json and the manifest)."""
    if not summary["findings"]:
        return f"{summary['rows_scanned']} rows, no secrets or PII found"
    kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(summary["findings"].items()))
    action = {
        "warn": "left in (policy warn)",
        "redact": "redacted before tokenising",
        "block": "refused (policy block)",
    }
    return f"{summary['rows_flagged']} of {summary['rows_scanned']} rows flagged ({kinds}): {action[summary['policy']]}"


def scan_rows(
    rows: Iterable[Any], policy: str = "warn", report: ScanReport | None = None
) -> tuple[list[Any], ScanReport]:
    """Scan rows (objects with `.values` and `.origin`, as `sovtune.data.Row`) under a policy.

    warn: rows unchanged; redact: matches replaced by placeholders in new rows; block: `DataError` when any found.
    """
    from dataclasses import replace

    report = report or ScanReport(policy=policy)
    out = []
    for row in rows:
        found: list[Finding] = []

        def scan_text(text: str) -> str:
            if policy == "redact":
                clean, hits = redact(text)
                found.extend(hits)
                return clean
            found.extend(find(text))
            return text

        values = _walk(row.values, scan_text)
        report.add_row(row.origin, found)
        out.append(replace(row, values=values) if policy == "redact" and found else row)
    if policy == "block" and report.total:
        raise DataError(
            f"data scan: {report.describe()}; first at {', '.join(report.origins[:3])}. Remove them from the data, "
            "or set sovereignty.data_scan: redact to replace them before training"
        )
    return out, report
