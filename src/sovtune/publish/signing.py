"""Signatures over a folder of published files in the OpenSSF Model Signing format, with a key pair (fully offline).

A thin layer over the `model-signing` package: the signature it writes (`model.sig`, a Sigstore bundle around an
in-toto statement listing every file's SHA-256) verifies with the reference CLI,
`model_signing verify key --public_key PUB.pem --signature FOLDER/model.sig FOLDER`. Errors become one line.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from sovtune.core.hashing import sha256_file
from sovtune.core.rundir import RunDir
from sovtune.errors import SovtuneError

SIGNATURE = RunDir.SIGNATURE
PASSWORD_ENV = "SOVTUNE_SIGNING_KEY_PASSWORD"  # for an encrypted private key; never logged (a secret-named variable)
KEY_HELP = (
    "create one with `openssl ecparam -name prime256v1 -genkey -noout -out key.pem` and its public key with "
    "`openssl ec -in key.pem -pubout -out key.pub.pem`"
)


class SigningError(SovtuneError):
    """A key cannot be used, a signature cannot be made, or a signature does not verify."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message  # the message without the folder's name, for callers that name it otherwise


def _hashing(ignored: list[str]) -> Any:
    import model_signing.hashing

    # What the reference CLI does: the signature file itself and git files are not signed; every other file is.
    return model_signing.hashing.Config().set_ignored_paths(paths=ignored, ignore_git_paths=True)


def check_private_key(private_key: Path) -> Any:
    """The signing configuration for a PEM private key; SigningError (one line) when it cannot be one."""
    import model_signing.signing

    private_key = Path(private_key)
    _readable(private_key, "signing key")
    password = os.environ.get(PASSWORD_ENV) or None
    try:
        # cryptography wants the password as bytes (the library's annotation says str).
        config = model_signing.signing.Config().use_elliptic_key_signer(
            private_key=private_key,
            password=password.encode() if password else None,  # type: ignore[arg-type]
        )
    except TypeError:
        raise SigningError(
            f"{private_key}: the key is encrypted; export {PASSWORD_ENV}=<its password>, or use an unencrypted key"
        ) from None
    except Exception as exc:  # cryptography's ValueError/UnsupportedAlgorithm: not a PEM EC private key
        raise SigningError(
            f"{private_key}: not a usable signing key ({_reason(exc)}); it must be a PEM elliptic-curve private key: "
            f"{KEY_HELP}"
        ) from None
    return config


def sign_folder(folder: Path, private_key: Path) -> bytes:
    """Sign every file of `folder`; returns the signature, also written to `folder/model.sig`."""
    folder = Path(folder)
    config = check_private_key(private_key)
    try:
        config.set_hashing_config(_hashing([SIGNATURE])).sign(folder, folder / SIGNATURE)
    except OSError as exc:
        raise SigningError(f"{folder}: cannot sign ({exc.strerror or exc})") from None
    return (folder / SIGNATURE).read_bytes()


def check_public_key(public_key: Path) -> Any:
    """The verifier for a PEM public key; SigningError (one line) when it cannot be one. Called before anything
    is downloaded, so a mistyped --trust fails first."""
    import model_signing.verifying

    public_key = Path(public_key)
    _readable(public_key, "public key")
    try:
        return model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public_key)
    except Exception as exc:
        raise SigningError(
            f"{public_key}: not a usable public key ({_reason(exc)}); give the PEM public key of the signing key: "
            f"{KEY_HELP}"
        ) from None


def verify_folder(folder: Path, public_key: Path, signature: str = SIGNATURE) -> None:
    """Check `folder/signature` with `public_key` exactly as the reference CLI does: every file signed, none
    changed, none added or missing. SigningError (one line) when it does not verify."""
    folder = Path(folder)
    config = check_public_key(public_key)
    if not (folder / signature).is_file():
        raise SigningError(f"{folder}: no {signature}; the files are not signed", f"no {signature}: not signed")
    try:
        config.set_hashing_config(_hashing([signature])).verify(folder, folder / signature)
    except Exception as exc:  # the library raises ValueError, cryptography's InvalidSignature, protobuf errors
        mismatch = str(exc).startswith("Signature mismatch")  # the signature is good, the files are not its files
        detail = _differences(folder, signature) if mismatch else _reason(exc)
        reason = f"{signature} does not verify with {public_key}: {detail}"
        raise SigningError(f"{folder}/{reason}", reason) from None


def verifies_with_private_key(folder: Path, private_key: Path, signature: str = SIGNATURE) -> bool:
    """Whether `folder/signature` verifies with the public half of `private_key` (a key already checked usable)."""
    from cryptography.hazmat.primitives import serialization

    password = os.environ.get(PASSWORD_ENV)
    key = serialization.load_pem_private_key(Path(private_key).read_bytes(), password.encode() if password else None)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with tempfile.TemporaryDirectory(prefix="sovtune-key-") as tmp:
        (Path(tmp) / "public.pem").write_bytes(public)
        try:
            verify_folder(folder, Path(tmp) / "public.pem", signature)
        except SigningError:
            return False
    return True


def signed_digests(signature: bytes, where: str) -> dict[str, str]:
    """The files a signature covers and their SHA-256, read from its statement without checking the signature
    (for "does this signature cover these files?" before a push; `verify_folder` is the trust check)."""
    try:
        bundle = json.loads(signature)
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"], validate=True))
        predicate = statement["predicate"]
        if predicate["serialization"]["method"] != "files":
            raise ValueError(f"serialization {predicate['serialization']['method']!r}")
        return {
            str(item["name"]): str(item["digest"]) for item in predicate["resources"] if item["algorithm"] == "sha256"
        }
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise SigningError(
            f"{where}: not a model signature sovtune can read ({_reason(exc)}); sign again with `sovtune sign`"
        ) from None


def _readable(path: Path, what: str) -> None:
    if not path.is_file():
        raise SigningError(f"{path}: no such {what} file; {KEY_HELP}")


def _differences(folder: Path, signature: str) -> str:
    """Which files differ from the ones the (authentic) signature lists: changed, not signed, missing."""
    signed = signed_digests((folder / signature).read_bytes(), str(folder / signature))
    present = {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).as_posix() != signature
    }
    parts = [
        f"{label}: {', '.join(names)}"
        for label, names in (
            ("changed", sorted(p for p in present if p in signed and present[p] != signed[p])),
            ("not signed", sorted(set(present) - set(signed))),
            ("missing", sorted(set(signed) - set(present))),
        )
        if names
    ]
    return "; ".join(parts) or "the files do not match the signature"


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return (text[:300] + "...") if len(text) > 300 else text
