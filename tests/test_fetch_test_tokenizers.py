"""scripts/fetch_test_tokenizers.py against a package index on 127.0.0.1: pip fetches the pinned source distribution
and checks its sha256, only the vocabulary files come out of it, a second run fetches nothing, and a failed fetch
leaves the cache as it was.

The index serves a small source distribution laid out as llama-cpp-python's is (the real one is 76 MB); the
pinned hash is the script's parameter, set to that archive's for the run that must succeed."""

from __future__ import annotations

import functools
import hashlib
import http.server
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts/fetch_test_tokenizers.py"
TOP = "llama_cpp_python-0.3.36"
VOCAB = b"GGUF\x03\x00\x00\x00 a vocabulary"


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("fetch_test_tokenizers_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sdist(path: Path) -> str:
    """A source distribution with what the real one has around its vocabularies: other model files, a nested
    folder, a symbolic link, a path that climbs out, and an in-tree build backend (pip prepares its metadata)."""

    def add(tar: tarfile.TarFile, name: str, data: bytes = b"", link: str | None = None) -> None:
        info = tarfile.TarInfo(f"{TOP}/{name}")
        if link is not None:
            info.type, info.linkname = tarfile.SYMTYPE, link
        else:
            info.size = len(data)
        tar.addfile(info, io.BytesIO(data) if link is None else None)

    backend = (
        "def _meta():\n"
        "    return 'Metadata-Version: 2.1\\nName: llama_cpp_python\\nVersion: 0.3.36\\n'\n"
        "def get_requires_for_build_wheel(config_settings=None):\n    return []\n"
        "def prepare_metadata_for_build_wheel(directory, config_settings=None):\n"
        "    import os\n"
        "    info = os.path.join(directory, 'llama_cpp_python-0.3.36.dist-info')\n"
        "    os.makedirs(info)\n"
        "    open(os.path.join(info, 'METADATA'), 'w').write(_meta())\n"
        "    return 'llama_cpp_python-0.3.36.dist-info'\n"
        "def build_wheel(directory, config_settings=None, metadata_directory=None):\n"
        "    raise RuntimeError('not built here')\n"
    )
    with tarfile.open(path, "w:gz") as tar:
        add(tar, "pyproject.toml", b'[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n')
        add(tar, "backend.py", backend.encode())
        add(tar, "PKG-INFO", b"Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: 0.3.36\n")
        add(tar, "vendor/llama.cpp/models/ggml-vocab-tiny.gguf", VOCAB)
        add(tar, "vendor/llama.cpp/models/ggml-vocab-tiny.gguf.inp", b"test inputs")
        add(tar, "vendor/llama.cpp/models/ggml-vocab-link.gguf", link="ggml-vocab-tiny.gguf")
        add(tar, "vendor/llama.cpp/models/sub/ggml-vocab-nested.gguf", VOCAB)
        add(tar, "vendor/llama.cpp/models/../../../ggml-vocab-escape.gguf", VOCAB)
        add(tar, "vendor/llama.cpp/models/templates/chat.jinja", b"{{ messages }}")
        add(tar, "llama_cpp/__init__.py", b"")
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(index URL, sha256 of the archive it serves): a PEP 503 simple index on 127.0.0.1."""
    root = tmp_path_factory.mktemp("index")
    project = root / "simple" / "llama-cpp-python"
    project.mkdir(parents=True)
    digest = _sdist(project / f"{TOP}.tar.gz")
    (project / "index.html").write_text(f'<html><body><a href="{TOP}.tar.gz">{TOP}.tar.gz</a></body></html>\n')
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple/", digest
    finally:
        server.shutdown()
        server.server_close()


def _pip_env(index_url: str, cache: Path) -> dict[str, str]:
    """Only the index under test: no configuration files, no other index, no local wheels, no pip cache."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env.update(
        PIP_CONFIG_FILE=os.devnull,
        PIP_INDEX_URL=index_url,
        PIP_NO_CACHE_DIR="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_DEFAULT_TIMEOUT="20",
        SOVTUNE_TEST_TOKENIZERS=str(cache),
        PYTHONPATH=str(REPO / "src"),
    )
    return env


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_only_regular_vocabulary_files_directly_in_models_are_extracted(tmp_path: Path) -> None:
    archive = tmp_path / f"{TOP}.tar.gz"
    _sdist(archive)
    staged = tmp_path / "staged"
    files = _script().extract_vocabularies(archive, staged)
    assert files == {"ggml-vocab-tiny.gguf": hashlib.sha256(VOCAB).hexdigest()}
    assert sorted(p.name for p in staged.rglob("*")) == ["ggml-vocab-tiny.gguf"]
    assert not (tmp_path / "ggml-vocab-escape.gguf").exists()


def test_fetch_through_pip_then_a_second_run_fetches_nothing(
    tmp_path: Path, index: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, digest = index
    cache = tmp_path / "cache"
    for key, value in _pip_env(url, cache).items():
        monkeypatch.setenv(key, value)
    for key in [k for k in os.environ if k.startswith("PIP_") and k not in _pip_env(url, cache)]:
        monkeypatch.delenv(key)
    script = _script()
    monkeypatch.setattr(script, "SDIST_SHA256", digest)
    folder = script.fetch(script.cache_root())
    assert folder == cache / "llama-cpp-python-0.3.36"
    assert sorted(p.name for p in folder.iterdir()) == ["ggml-vocab-tiny.gguf", "manifest.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["sdist_sha256"] == digest
    assert manifest["files"] == {"ggml-vocab-tiny.gguf": hashlib.sha256(VOCAB).hexdigest()}
    assert sorted(p.name for p in cache.iterdir()) == ["llama-cpp-python-0.3.36"]  # no download or staging left
    assert script.main(["--check"]) == 0

    before = _snapshot(cache)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")  # a second fetch would fail: none is made
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], env={**os.environ}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"already there: {folder}"
    assert _snapshot(cache) == before


def test_an_archive_that_is_not_the_pinned_one_is_refused_and_the_cache_kept(
    tmp_path: Path, index: tuple[str, str]
) -> None:
    """The index serves an archive whose sha256 is not the pinned one (the script's real pin): pip refuses it, the
    script stops with one line, and the incomplete cache that was there stays as it was."""
    url, digest = index
    cache = tmp_path / "cache"
    folder = cache / "llama-cpp-python-0.3.36"
    folder.mkdir(parents=True)
    (folder / "ggml-vocab-tiny.gguf").write_bytes(b"tampered")
    (folder / "manifest.json").write_text(json.dumps({"files": {"ggml-vocab-tiny.gguf": "0" * 64}}))
    before = _snapshot(cache)

    env = _pip_env(url, cache)
    check = subprocess.run([sys.executable, str(SCRIPT), "--check"], env=env, capture_output=True, text=True)
    assert check.returncode == 1 and check.stdout.strip() == f"incomplete: {folder}"

    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pip download llama-cpp-python==0.3.36 failed:"), result.stderr
    assert f"not the pinned {_script().SDIST_SHA256}" in lines[0] and digest in lines[0], lines[0]
    assert _snapshot(cache) == before
    assert sorted(p.name for p in cache.iterdir()) == ["llama-cpp-python-0.3.36"]
