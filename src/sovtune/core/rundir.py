"""The run directory contract: every run-file name and every reader of a run's files, in one place.

Each stage reads what the previous one wrote through a `RunDir`, so any command can pick up from a run directory.
The readers check shape, not trust: a run directory received from elsewhere is data, and nothing read here decides
to run code.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import yaml

from sovtune.core.files import atomic_write_json, atomic_write_text
from sovtune.errors import SovtuneError

REPORT_KIND = "sovtune.eval-report"
RECIPE_SECTIONS = ("model", "quantization", "adapter", "data", "train", "eval", "output", "hub", "sovereignty")
REPORT_SCHEMA_VERSION = 1


class RunFileError(SovtuneError):
    """A run file is missing where it is needed, damaged, or not what sovtune writes."""


class ManifestError(RunFileError):
    """The manifest is missing, unreadable, or would be rewritten."""


class ReportError(RunFileError):
    """A report cannot be read, or runs cannot be compared."""


class RunDir:
    """A run directory (`runs/<name>`) and the names of everything sovtune writes into it."""

    MARKER = ".sovtune-run"  # written when sovtune creates the run directory: what `--overwrite` may delete
    RECIPE = "recipe.yaml"  # the resolved recipe (secrets redacted)
    FINGERPRINT = "run_fingerprint.json"  # what --resume compares
    DATA_STATS = "data_stats.json"
    HELDOUT = "heldout.json"  # the held-out examples' origins, in evaluation order
    TRAIN_METRICS = "train_metrics.json"
    MANIFEST = "manifest.json"
    MANIFEST_LOCK = ".manifest.lock"
    REPORT = "report.json"
    REPORT_MD = "report.md"
    REPORT_PNG = "report.png"
    PREDICTIONS = "eval_predictions.jsonl"
    REPORT_FILES = (REPORT, REPORT_MD, REPORT_PNG, PREDICTIONS)
    CARD = "README.md"
    CHECKSUMS = "SHA256SUMS"  # an exported bundle's checksum list
    PUBLISH_MANIFEST = "publish_manifest.json"  # a published repository's (and a pulled folder's) list of files
    SIGNATURE = "model.sig"  # OpenSSF model signature (Sigstore bundle) over the published files
    ADAPTER = "adapter"
    ADAPTER_CONFIG = "adapter_config.json"
    CHECKPOINTS = "checkpoints"
    TRAINING_ARGS = "training_args.json"  # in each checkpoint, instead of the trainer's pickled training_args.bin
    LOGS = "logs"
    TRAIN_LOG = "train_log.jsonl"  # inside logs/

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # ---------------------------------------------------------------------------------------------------------------
    # Places

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def adapter_dir(self) -> Path:
        return self.path / self.ADAPTER

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def logs_dir(self) -> Path:
        return self.path / self.LOGS

    @property
    def train_log(self) -> Path:
        return self.logs_dir / self.TRAIN_LOG

    @property
    def lock_file(self) -> Path:
        """Beside the run directory, not inside it: `--overwrite` deletes the directory while the lock is held."""
        absolute = Path(os.path.abspath(self.path))
        return absolute.parent / f".{absolute.name}.lock"

    def is_run(self) -> bool:
        """Created by sovtune (it holds the marker): the only kind of folder `--overwrite` may delete."""
        return (self.path / self.MARKER).is_file() and not self.path.is_symlink()

    def mark(self) -> None:
        """Record that sovtune created this run directory (once; the folder must exist)."""
        if not (self.path / self.MARKER).is_file():
            atomic_write_text(
                self.path / self.MARKER, "a run directory written by sovtune; --overwrite may replace it\n"
            )

    def has_adapter(self) -> bool:
        return (self.adapter_dir / self.ADAPTER_CONFIG).is_file()

    def adapter_files(self) -> list[Path]:
        """The adapter folder's files (recursively, hidden ones left out), sorted."""
        return [
            path for path in sorted(self.adapter_dir.rglob("*")) if path.is_file() and not path.name.startswith(".")
        ]

    # ---------------------------------------------------------------------------------------------------------------
    # Readers

    def read_json(self, name: str, what: str) -> dict[str, Any] | None:
        """A JSON object the run recorded; None when absent. A damaged file is an error, never silently skipped."""
        path = self.path / name
        try:
            value = json.loads(read_run_file(path))
        except FileNotFoundError:
            return None
        except RecursionError:
            raise RunFileError(f"{path}: {what} nested too deeply to be one sovtune wrote; restore it") from None
        except (OSError, ValueError) as exc:  # ValueError: bad UTF-8 or JSON, 5,000-digit numbers
            raise RunFileError(
                f"{path}: unreadable {what} ({str(exc).split(';')[0][:200] or type(exc).__name__}); "
                "it was damaged after it was written, restore it"
            ) from None
        if not isinstance(value, dict):
            raise RunFileError(f"{path}: {what} must be a JSON object, found {type(value).__name__}; restore it")
        return value

    def recipe_data(self) -> dict[str, Any]:
        """The resolved recipe the run recorded, as plain data (no interpolation, no validation: display only).

        `config.load_run_recipe` validates it into a Recipe.
        """
        path = self.path / self.RECIPE
        try:
            value = _plain_yaml(read_run_file(path))
        except FileNotFoundError:
            raise RunFileError(f"{path}: missing; is {self.path} a run directory written by `sovtune train`?") from None
        except RecursionError:
            raise RunFileError(f"{path}: nested too deeply to be a recorded recipe; restore it from the run") from None
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise RunFileError(
                f"{path}: unreadable recorded recipe ({str(exc).splitlines()[0]}); restore it from the run"
            ) from None
        if not isinstance(value, dict):
            raise RunFileError(f"{path}: not a recipe mapping; restore it from the run")
        # Readers take each section as a mapping: a run folder from elsewhere may hold anything.
        shapeless = sorted(key for key in RECIPE_SECTIONS if not isinstance(value.get(key) or {}, dict))
        if shapeless:
            raise RunFileError(f"{path}: {', '.join(shapeless)} must be a mapping of settings; restore it from the run")
        return value

    def manifest(self) -> dict[str, Any]:
        """manifest.json, which must exist."""
        try:
            value = self.read_json(self.MANIFEST, "manifest")
        except RunFileError as exc:
            raise ManifestError(str(exc)) from None
        if value is None:
            raise ManifestError(
                f"{self.path / self.MANIFEST}: no manifest; is {self.path} a run directory written by `sovtune train`?"
            )
        return value

    def report(self) -> dict[str, Any] | None:
        """report.json when the run was evaluated (None otherwise), checked to be a report of this schema."""
        if not (self.path / self.REPORT).exists():
            return None
        return read_report(self.path / self.REPORT)

    def data_stats(self) -> dict[str, Any] | None:
        return self.read_json(self.DATA_STATS, "data statistics")

    def train_metrics(self) -> dict[str, Any] | None:
        return self.read_json(self.TRAIN_METRICS, "training metrics")

    def fingerprint(self) -> dict[str, Any] | None:
        return self.read_json(self.FINGERPRINT, "run fingerprint")

    def predictions(self) -> list[dict[str, Any]] | None:
        """eval_predictions.jsonl: one JSON object per evaluated example, each naming its `dataset` and `origin`; None
        when absent. A damaged line is an error naming its line."""
        path = self.path / self.PREDICTIONS
        try:
            # Split on "\n" only: predictions are written with ensure_ascii=False, so a string may hold a raw U+2028.
            lines = path.read_text(encoding="utf-8").split("\n")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise RunFileError(f"{path}: unreadable predictions ({exc}); re-run sovtune eval") from None
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RunFileError(f"{path}:{number}: not JSON ({exc.msg}); re-run sovtune eval") from None
            if not (
                isinstance(record, dict)
                and isinstance(record.get("dataset"), str)
                and isinstance(record.get("origin"), str)
            ):
                raise RunFileError(f"{path}:{number}: not a prediction record (dataset, origin); re-run sovtune eval")
            records.append(record)
        return records

    def heldout(self) -> list[str] | None:
        """Origins of the held-out examples (file:line), in the order evaluation uses them; None if not recorded."""
        value = self.read_json(self.HELDOUT, "held-out example list")
        if value is None:
            return None
        origins = value.get("origins")
        if not isinstance(origins, list) or not all(isinstance(origin, str) for origin in origins):
            raise RunFileError(f"{self.path / self.HELDOUT}: `origins` must be a list of strings; restore it")
        return origins

    # ---------------------------------------------------------------------------------------------------------------
    # Writers (atomic)

    def write_json(self, name: str, value: Any) -> Path:
        path = self.path / name
        atomic_write_json(path, value)
        return path

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        atomic_write_text(path, text)
        return path


def read_run_file(path: Path) -> str:
    """The text of a file inside a run, never through a symbolic link: a run folder may come from elsewhere, and a
    link in it could point at any file on this machine (FileNotFoundError when absent)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunFileError(
                f"{path}: a symbolic link; sovtune reads a run's files only as regular files inside it, "
                "replace the link with the file"
            ) from None
        raise
    with os.fdopen(fd, "rb") as handle:
        return handle.read().decode("utf-8")


MAX_YAML_NODES = 100_000  # a resolved recipe has a few hundred values


def _plain_yaml(text: str) -> Any:
    """yaml.safe_load of a received file, refusing aliases that multiply into millions of values (a "billion
    laughs" recipe.yaml in a run folder someone sent). libyaml's parser where PyYAML has it: a recorded recipe holds
    every resolved setting, and the pure-Python parser took ~50 ms per read (a push reads it several times)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        node = loader.get_single_node()
        pending, seen = [node], 0
        while pending:
            current = pending.pop()
            seen += 1
            if seen > MAX_YAML_NODES:
                raise yaml.YAMLError("too many values (aliases that expand?)")
            if isinstance(current, yaml.SequenceNode):
                pending.extend(current.value)
            elif isinstance(current, yaml.MappingNode):
                pending.extend(item for pair in current.value for item in pair)
        return None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()


def read_report(path: Path) -> dict[str, Any]:
    """A report.json (of a run, or given directly), checked to be a sovtune evaluation report of this schema."""
    try:
        report = json.loads(read_run_file(Path(path)))
    except FileNotFoundError:
        raise ReportError(
            f"{path}: no report.json; evaluate the run first (sovtune eval {Path(path).parent})"
        ) from None
    except RecursionError:
        raise ReportError(f"{path}: nested too deeply to be a sovtune report; re-run sovtune eval") from None
    except (OSError, ValueError) as exc:  # ValueError: bad UTF-8 or JSON, 5,000-digit numbers
        raise ReportError(
            f"{path}: not a valid report ({str(exc).split(';')[0][:200] or type(exc).__name__}); re-run sovtune eval"
        ) from None
    if not isinstance(report, dict) or report.get("kind") != REPORT_KIND:
        raise ReportError(f"{path}: not a sovtune evaluation report")
    if report.get("schema_version") != REPORT_SCHEMA_VERSION:
        raise ReportError(
            f"{path}: report schema {report.get('schema_version')} is not {REPORT_SCHEMA_VERSION} (this sovtune); "
            "re-run sovtune eval"
        )
    return report
