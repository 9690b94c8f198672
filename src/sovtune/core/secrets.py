"""Secrets never reach a file sovtune writes or a line it prints: credential environment values and recognisable
tokens (hf_..., ghp_..., sk-..., private keys) are replaced by markers.

The token detectors live here, below everything else; `sovtune.scan` adds the PII detectors for data scans.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Sequence

SECRET, PII = "secret", "pii"

# Environment variables whose names say they hold a credential; their values are redacted wherever they appear.
# Whole name parts only: HF_TOKEN, AWS_SECRET_ACCESS_KEY, DB_PASSWORD, but not TOKENIZERS_PARALLELISM or
# GIT_AUTHOR_NAME.
SECRET_NAME = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIALS?|AUTH)(_|$)", re.I
)
MIN_SECRET_LENGTH = 8  # shorter values (flags such as HF_HUB_DISABLE_IMPLICIT_TOKEN=1) are not credentials


@dataclass(frozen=True)
class Detector:
    kind: str
    category: str
    pattern: re.Pattern[str]
    valid: Callable[[str], bool] | None = None


@dataclass(frozen=True)
class Finding:
    kind: str
    category: str
    start: int
    end: int


# Order matters: earlier detectors claim their spans first.
SECRET_DETECTORS: tuple[Detector, ...] = (
    Detector(
        "private_key",
        SECRET,
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
            r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----)?"
        ),
    ),
    Detector("jwt", SECRET, re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")),
    Detector("aws_access_key", SECRET, re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b")),
    Detector(
        "aws_secret_key",
        SECRET,
        re.compile(
            r"(?i)\baws_?secret_?(?:access_?)?key\b[\"']?\s*[:=]\s*[\"']?(?P<value>[A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"
        ),
    ),
    Detector(
        "github_token", SECRET, re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{60,255})\b")
    ),
    Detector("huggingface_token", SECRET, re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")),
    Detector("openai_key", SECRET, re.compile(r"\bsk-(?:proj-|svcacct-|admin-|ant-)?[A-Za-z0-9_-]{20,}")),
    Detector(
        "slack_token",
        SECRET,
        re.compile(r"\bxox[abposre]-[A-Za-z0-9-]{10,}|https://hooks\.slack\.com/services/[A-Za-z0-9/]{20,}"),
    ),
    Detector("google_api_key", SECRET, re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b")),
    Detector("stripe_key", SECRET, re.compile(r"\b[rs]k_live_[0-9A-Za-z]{24,}\b")),
)


def find(text: str, detectors: Sequence[Detector] = SECRET_DETECTORS) -> list[Finding]:
    """Non-overlapping findings in `text`, in order of position; earlier detectors win overlaps."""
    claimed: list[Finding] = []
    for detector in detectors:
        for match in detector.pattern.finditer(text):
            # A detector that needs context (a key name) marks the secret itself as the `value` group.
            start, end = match.span("value") if "value" in match.re.groupindex else match.span()
            if detector.valid is not None and not detector.valid(match.group()):
                continue
            if any(start < other.end and other.start < end for other in claimed):
                continue
            claimed.append(Finding(detector.kind, detector.category, start, end))
    return sorted(claimed, key=lambda finding: finding.start)


def placeholder(kind: str) -> str:
    return f"[REDACTED_{kind.upper()}]"


def secret_env_values() -> dict[str, str]:
    """Values of credential-looking environment variables, longest first (so no value hides part of another)."""
    found = {
        name: value
        for name, value in os.environ.items()
        if SECRET_NAME.search(name) and len(value) >= MIN_SECRET_LENGTH and value.lower() not in ("true", "false")
    }
    return dict(sorted(found.items(), key=lambda item: -len(item[1])))


def redact_secrets(text: str) -> str:
    """`text` with credential env values and recognisable tokens (hf_..., ghp_..., sk-...) replaced by a marker."""
    for name, value in secret_env_values().items():
        if value in text:
            text = text.replace(value, f"[REDACTED:{name}]")
    for finding in reversed(find(text)):
        text = text[: finding.start] + placeholder(finding.kind) + text[finding.end :]
    return text
