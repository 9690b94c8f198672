"""Secret/PII scan: planted values are found and counted (never reported), redact removes them, block stops."""

from __future__ import annotations

import json

import pytest

from helpers import invoke, qa_rows
from sovtune import scan
from sovtune.data import Row
from sovtune.errors import DataError

# Built at runtime so the repository itself holds no token-shaped strings for scanners to trip on.
GITHUB = "ghp_" + "A1b2C3d4E5" * 3 + "F6g7H8"
HF = "hf_" + "Qw9Er8Ty7Ui6Op5As4Df3Gh2Jk1LzXcVb"
OPENAI = "sk-proj-" + "Zx8Cv7Bn6Mm5Ll4Kk3Jj2Hh1Gg0FfDdSs"
AWS = "AKIA" + "IOSFODNN7EXAMPL1"
SLACK = "xoxb-" + "1234567890-0987654321-AbCdEfGhIjKl"
JWT = "eyJhbGciOiJIUzI1NiJ9." + "eyJzdWIiOiIxMjM0NTY3ODkwIn0." + "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
PRIVATE_KEY = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA1x2\n-----END RSA PRIVATE KEY-----"
EMAIL = "jane.doe@example.org"
PHONE = "+44 20 7946 0958"
IBAN = "DE89 3704 0044 0532 0130 00"
CARD = "4111 1111 1111 1111"

PLANTED = {
    "github_token": GITHUB, "huggingface_token": HF, "openai_key": OPENAI, "aws_access_key": AWS,
    "slack_token": SLACK, "jwt": JWT, "private_key": PRIVATE_KEY, "email": EMAIL, "phone_number": PHONE,
    "iban": IBAN, "card_number": CARD,
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(PLANTED))
def test_each_kind_is_found_in_context(kind: str) -> None:
    text = f"Here it is: {PLANTED[kind]} (keep it safe)."
    assert [finding.kind for finding in scan.find(text)] == [kind]
    redacted, _ = scan.redact(text)
    assert PLANTED[kind] not in redacted and scan.placeholder(kind) in redacted
    assert redacted.startswith("Here it is: ") and redacted.endswith(" (keep it safe).")


@pytest.mark.parametrize(
    "text",
    [
        "SELECT name FROM employees WHERE salary > 1000 AND id = 4111111111111112;",  # fails Luhn
        "order 1234567890123 shipped 2024-01-15, version 1.2.3, total 1,000,000",
        "IBAN DE89370400440532013001 is mistyped",  # fails mod-97
        "call extension 12345 or room 101",
        "the sk-learn package and hf_hub are libraries",
    ],
)
def test_ordinary_text_is_not_flagged(text: str) -> None:
    assert scan.find(text) == []


def test_luhn_and_mod97() -> None:
    assert scan.luhn_valid("4111111111111111") and not scan.luhn_valid("4111111111111112")
    assert scan.iban_valid("GB82 WEST 1234 5698 7654 32") and not scan.iban_valid("GB82 WEST 1234 5698 7654 33")
    assert not scan.iban_valid("DE89 3704 0044 0532 0130")  # right checksum rules, wrong length for DE


def rows_with_plants() -> list[Row]:
    rows = []
    for index, (kind, value) in enumerate(sorted(PLANTED.items())):
        messages = [
            {"role": "user", "content": f"question {index}"},
            {"role": "assistant", "content": f"use {value} here"},
        ]
        rows.append(Row(values={"messages": messages}, origin=f"train.jsonl:{index + 1}"))
    rows.append(Row(values={"messages": [{"role": "user", "content": "clean"}]}, origin="train.jsonl:99"))
    return rows


def test_warn_counts_without_values_and_keeps_rows() -> None:
    rows = rows_with_plants()
    out, report = scan.scan_rows(rows, policy="warn")
    assert out == rows
    summary = report.summary()
    assert summary["findings"] == {kind: 1 for kind in PLANTED}
    assert summary["rows_scanned"] == len(rows) and summary["rows_flagged"] == len(PLANTED)
    assert summary["secrets"] == 7 and summary["pii"] == 4
    dumped = json.dumps(summary) + report.describe()
    assert not any(value in dumped for value in PLANTED.values())


def test_redact_replaces_every_plant_in_nested_messages() -> None:
    out, report = scan.scan_rows(rows_with_plants(), policy="redact")
    dumped = json.dumps([row.values for row in out])
    assert not any(value in dumped for value in PLANTED.values())
    assert dumped.count("[REDACTED_") == len(PLANTED)
    assert out[0].values["messages"][0]["content"] == "question 0"  # untouched text survives
    assert report.summary()["redacted"] is True
    # Redacted rows scan clean: nothing slipped past the placeholders.
    _, again = scan.scan_rows(out, policy="warn")
    assert again.total == 0


def test_block_refuses_with_counts_and_locations_only() -> None:
    with pytest.raises(DataError) as info:
        scan.scan_rows(rows_with_plants(), policy="block")
    message = str(info.value)
    assert "train.jsonl:1" in message and "sovereignty.data_scan" in message
    assert not any(value in message for value in PLANTED.values())


def test_block_passes_clean_data() -> None:
    rows = [Row(values={"text": "nothing to see"}, origin="a:1")]
    out, report = scan.scan_rows(rows, policy="block")
    assert out == rows and report.total == 0


def planted_rows() -> list[dict]:
    rows = qa_rows()
    rows[0]["messages"][1]["content"] = f"Write to {EMAIL} using {HF} now."
    rows[1]["messages"][0]["content"] = f"My card is {CARD}"
    return rows


def test_check_reports_counts_never_values(make_recipe) -> None:
    result = invoke("check", str(make_recipe("scanwarn", rows=planted_rows())), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["data"]["data_scan"]["findings"] == {"email": 1, "huggingface_token": 1, "card_number": 1}
    [finding] = [check for check in report["checks"] if check["check"] == "data scan"]
    assert not finding["ok"] and "left in (policy warn)" in finding["detail"]
    assert EMAIL not in result.output and HF not in result.output and CARD not in result.output


def test_redact_happens_before_tokenising(make_recipe) -> None:
    from sovtune import model as models
    from sovtune.config import load_recipe
    from sovtune.inputs import prepare_recipe_data as prepare_data

    recipe = load_recipe(make_recipe("scanredact", rows=planted_rows(), sovereignty={"data_scan": "redact"}))
    tokenizer = models.load_tokenizer(recipe)
    data = prepare_data(recipe, tokenizer)
    text = "".join(tokenizer.decode(item.input_ids) for item in [*data.train, *data.eval])
    assert "jane.doe" not in text and "Qw9Er8" not in text and "4111" not in text
    assert "[REDACTED_EMAIL]" in text and "[REDACTED_CARD_NUMBER]" in text
    assert data.stats["data_scan"]["redacted"] is True


def test_block_stops_check_with_exit_2(make_recipe) -> None:
    result = invoke("check", str(make_recipe("scanblock", rows=planted_rows(), sovereignty={"data_scan": "block"})))
    assert result.exit_code == 2
    assert "2 of 24 rows flagged" in result.output and "scanblock-train.jsonl:1" in result.output.replace("\n", "")
    assert EMAIL not in result.output and HF not in result.output


def test_policy_is_validated(make_recipe) -> None:
    from sovtune.config import load_recipe
    from sovtune.errors import RecipeError

    with pytest.raises(RecipeError, match="sovereignty.data_scan: found 'redcat'.*did you mean 'redact'"):
        load_recipe(make_recipe("badpolicy", sovereignty={"data_scan": "redcat"}))


@pytest.mark.parametrize("text", ["a." * 10000, "1-" * 10000, "+1 " * 7000, "a@" * 10000, "eyJ" * 7000, "QUJD" * 5000])
def test_scan_stays_linear_on_pathological_rows(text: str) -> None:
    import time

    started = time.perf_counter()
    scan.find(text)
    assert time.perf_counter() - started < 1.0  # quadratic patterns took seconds on these 20 kB rows
