"""Fetch the real tokenizer vocabularies the model-family tests use, into a cache outside the repository.

llama.cpp ships the vocabularies of many model families as small GGUF files (`models/ggml-vocab-*.gguf`: tokens,
merges, special-token ids and, for some, the chat template), and the llama-cpp-python source distribution on the
package index vendors them. This script asks pip for that source distribution at a pinned version, lets pip check
its sha256 (and checks it again), and extracts only the vocabulary files. The vocabularies carry their models'
licences, so they are never committed: they live in the cache (default ~/.cache/sovtune/test-tokenizers, or
$SOVTUNE_TEST_TOKENIZERS), and tests that need them skip, saying to run this script, when they are absent.

Idempotent: a complete cache (every file listed in its manifest, with the recorded sha256) is left as it is.

    python scripts/fetch_test_tokenizers.py            # fetch once; later runs print "already there"
    python scripts/fetch_test_tokenizers.py --check    # exit 1 when the cache is incomplete, fetch nothing
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from sovtune.core.files import atomic_write_json, fsync_tree, replace_dir, temporary_sibling
from sovtune.core.hashing import sha256_file

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
# sha256 of llama_cpp_python-0.3.36.tar.gz as the package index serves it.
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VOCAB_DIR = "vendor/llama.cpp/models/"
MANIFEST = "manifest.json"
ENV_VAR = "SOVTUNE_TEST_TOKENIZERS"


def cache_root() -> Path:
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "sovtune" / "test-tokenizers").expanduser()


def vocab_folder(root: Path | None = None) -> Path:
    """Where the vocabulary files of the pinned release are (tests read this too)."""
    return (root or cache_root()) / f"{PACKAGE}-{VERSION}"


def is_complete(folder: Path) -> bool:
    """Every file the manifest lists is there with its recorded sha256."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = manifest.get("files") or {}
    return bool(files) and all(
        (folder / name).is_file() and sha256_file(folder / name) == digest for name, digest in files.items()
    )


def download(workdir: Path) -> Path:
    """The pinned source distribution, through pip, which refuses it unless its sha256 matches."""
    requirement = workdir / "requirement.txt"
    requirement.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{SDIST_SHA256}\n", encoding="utf-8")
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
        "--require-hashes", "-r", str(requirement), "-d", str(workdir),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"pip download {PACKAGE}=={VERSION} failed: {_pip_failure(result.stderr or result.stdout)}")
    archives = sorted(workdir.glob("*.tar.gz"))
    if len(archives) != 1:
        raise SystemExit(f"pip download left {len(archives)} archives in {workdir}; expected one source distribution")
    if sha256_file(archives[0]) != SDIST_SHA256:  # pip checked it; a second look costs a fraction of a second
        raise SystemExit(f"{archives[0].name}: sha256 differs from the pinned {SDIST_SHA256}; not extracted")
    return archives[0]


def _pip_failure(output: str) -> str:
    """What went wrong, in one line: pip's hash report spans several lines and ends with the digest it got."""
    lines = [" ".join(line.split()) for line in output.splitlines() if line.strip()]
    got = next((line.split()[-1] for line in lines if line.startswith("Got ")), None)
    if got is not None:
        return (
            f"the index served an archive with sha256 {got}, not the pinned {SDIST_SHA256}; nothing extracted: "
            "check which index pip uses (pip config list)"
        )
    errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR:")]
    return f"{(errors or lines or ['no output'])[-1][:300]}; check network access to the index"


def extract_vocabularies(archive: Path, staged: Path) -> dict[str, str]:
    """Only regular files named models/ggml-vocab-*.gguf, written under their base name (no path from the archive)."""
    staged.mkdir(parents=True)
    files: dict[str, str] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            name = member.name.split("/", 1)[-1]
            base = name.rsplit("/", 1)[-1]
            wanted = name.startswith(VOCAB_DIR) and base.startswith("ggml-vocab-") and base.endswith(".gguf")
            if not wanted or not member.isfile() or "/" in name[len(VOCAB_DIR) :]:
                continue
            source = tar.extractfile(member)
            assert source is not None
            with source, open(staged / base, "wb") as target:
                shutil.copyfileobj(source, target)
            files[base] = sha256_file(staged / base)
    if not files:
        raise SystemExit(f"{archive.name}: no {VOCAB_DIR}ggml-vocab-*.gguf files inside")
    return files


def fetch(root: Path) -> Path:
    folder = vocab_folder(root)
    if is_complete(folder):
        print(f"already there: {folder}")
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staged = temporary_sibling(folder)
    shutil.rmtree(staged, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory(prefix="sovtune-vocab-", dir=root) as work:
            archive = download(Path(work))
            files = extract_vocabularies(archive, staged)
        atomic_write_json(
            staged / MANIFEST,
            {"source": f"{PACKAGE}=={VERSION}", "sdist_sha256": SDIST_SHA256, "files": files},
        )
        fsync_tree(staged)
        replace_dir(staged, folder)  # the cache holds a complete set or the previous state, never a mix
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    print(f"fetched {len(files)} vocabularies of {PACKAGE} {VERSION} into {folder}")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the cache is complete")
    args = parser.parse_args(argv)
    if args.check:
        folder = vocab_folder()
        complete = is_complete(folder)
        print(f"{'complete' if complete else 'incomplete'}: {folder}")
        return 0 if complete else 1
    fetch(cache_root())
    return 0


if __name__ == "__main__":
    sys.exit(main())
