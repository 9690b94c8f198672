"""Training data: rows -> examples (rendered segments, supervised or not) -> tokens with labels.

Knows nothing about models; it needs only a tokenizer. Local files are parsed here rather than through
`datasets.load_dataset` so that a malformed row is reported with its file and line number.
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import csv
import functools
import hashlib
import json
import os
import random
import re
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from sovtune.config import DEFAULT_MAX_ROW_BYTES, DataSection, DataSource, TrainSource, looks_like_local_path
from sovtune.core.hashing import file_entry, tree_entries
from sovtune.errors import DataError
from sovtune.scan import ScanReport, scan_rows

IGNORE_INDEX = -100
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
ROLES = {"system", "user", "assistant", "tool"}
# ShareGPT-style rows are common in the wild; map them to role/content on the way in.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
READ_CHUNK = 1 << 20  # how much of an over-long line is read at a time while skipping it


@dataclass
class Row:
    values: dict[str, Any]
    origin: str  # "file:line", "file#index" or "hub-id[split]#index"


@dataclass
class Example:
    """A row rendered to text: `segments` in order, each (text, supervised)."""

    origin: str
    segments: list[tuple[str, bool]]
    prompt: str  # text before the last supervised segment: where generation starts
    reference: str  # the expected completion (content only, no template terminator)
    row: dict[str, Any] = field(default_factory=dict)
    add_bos: bool = False  # prepend the tokenizer's BOS (plain-text formats; chat templates render their own)
    add_eos: bool = False  # append EOS as a supervised token (plain-text formats)
    # Tokenised as one text (chat: what an inference server gets for the rendered conversation), else segment by
    # segment (prompt_completion: the completion as generation produces it after the prompt; docs/evaluation.md).
    joined: bool = False
    empty_target: bool = False  # every answer is empty: only the turn terminator or EOS would be learned

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.segments)

    def key(self) -> str:
        """Identity used to find exact duplicates between train and eval."""
        return hashlib.sha256(json.dumps(self.segments, ensure_ascii=False).encode()).hexdigest()


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    origin: str
    truncated: bool = False
    exact: bool = True  # the tokenizer's own ids for the rendered text (False: split at a prompt/completion boundary)

    @property
    def supervised_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class SplitStats:
    rows: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    token_lengths: list[int] = field(default_factory=list)
    truncated: int = 0
    supervised_tokens: int = 0
    total_tokens: int = 0
    eos_supervised: int = 0
    empty_targets: int = 0  # kept examples whose every answer is empty

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def summary(self) -> dict[str, Any]:
        lengths = sorted(self.token_lengths)
        return {
            "rows": self.rows,
            "kept": len(lengths),
            "dropped": dict(self.dropped),
            "token_length_percentiles": {f"p{p}": _percentile(lengths, p) for p in (50, 90, 99, 100)},
            "truncation_rate": self.truncated / len(lengths) if lengths else 0.0,
            "supervised_token_fraction": self.supervised_tokens / self.total_tokens if self.total_tokens else 0.0,
            "supervised_tokens": self.supervised_tokens,
            "total_tokens": self.total_tokens,
            "eos_supervised_fraction": self.eos_supervised / len(lengths) if lengths else 0.0,
            "empty_targets": self.empty_targets,
        }


@dataclass
class PreparedData:
    train: list[Tokenized]
    eval: list[Tokenized]
    eval_examples: list[Example]
    stats: dict[str, Any]


@dataclass
class SourcePool:
    """One training source: its settings as it reads them, its examples (after the held-out split), their tokens."""

    index: int
    source: TrainSource
    view: DataSection
    stats: SplitStats = field(default_factory=SplitStats)
    examples: list[Example] = field(default_factory=list)
    tokenized: list[Tokenized] = field(default_factory=list)
    capped_from: int | None = None  # rows before max_examples took a sample
    held_out: int = 0

    @property
    def where(self) -> str:
        return f"data.train[{self.index}] ({self.source.describe()})"


def _percentile(values: list[int], pct: int) -> int:
    if not values:
        return 0
    index = min(len(values) - 1, max(0, round(pct / 100 * (len(values) - 1))))
    return values[index]


# ---------------------------------------------------------------------------------------------------------------
# Reading rows


def resolve(path: str, base_dir: Path) -> Path:
    """A data path made absolute: relative paths are relative to the recipe's folder."""
    expanded = Path(os.path.expanduser(path))
    return expanded if expanded.is_absolute() else Path(os.path.normpath(Path(base_dir) / expanded))


def read_rows(
    source: DataSource, data_format: str, base_dir: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES
) -> list[Row]:
    """Rows of one source: local file(s) with line numbers, or a hub dataset through `datasets`.

    A row longer than `max_row_bytes` (data.max_row_bytes) is a malformed row; JSONL and CSV are read line by line,
    so such a row is never held in memory whole.
    """
    path = resolve(source.path, base_dir)
    if os.path.exists(path):
        files = _local_files(path)
        return [row for file in files for row in _read_file(file, data_format, max_row_bytes)]
    if looks_like_local_path(source.path):
        raise DataError(f"{source.path}: data file not found (looked at {path}); check data.train / data.eval paths")
    return _read_hub(source, max_row_bytes)


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():  # a pipe or a device would be read forever
        raise DataError(f"{path}: not a file or folder (a pipe or a device); point data.train at the data")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
    if not files:
        raise DataError(f"{path}: folder has no {', '.join(LOCAL_SUFFIXES)} files; point data.train at the data")
    return files


def _read_file(path: Path, data_format: str, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterable[Row]:
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix == ".txt":
        if data_format != "text":
            raise DataError(
                f"{path}: plain-text files need data.format: text (found {data_format!r}); in a mixture, give the "
                "source format: text"
            )
        return _read_txt(path, max_row_bytes)
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")
    try:
        return list(readers[suffix](path, max_row_bytes))
    except OSError as exc:  # unreadable (permissions), or it went away while read
        raise DataError(f"{path}: cannot read the data file ({exc.strerror or exc}); check its permissions") from None


def _too_long(limit: int, size: int | None = None) -> str:
    """The error of a row above the limit (`size` None: read past without counting)."""
    return (
        f"row {f'of {size:,} bytes ' if size is not None else ''}longer than data.max_row_bytes={limit:,}; "
        "split it, or raise data.max_row_bytes if it is meant to be one row"
    )


def _bounded_lines(handle: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """The lines of a binary file (without the newline), each at most `limit` bytes; a longer line is read past in
    chunks and stands as None, so memory never holds more than `limit` bytes of it."""
    while True:
        line = handle.readline(limit + 1)
        if not line:
            return
        if line.endswith(b"\n"):
            yield line[:-1]
        elif len(line) <= limit:
            yield line  # the last line, without a newline
        else:
            while line and not line.endswith(b"\n"):
                line = handle.readline(READ_CHUNK)
            yield None


def _json_problem(exc: ValueError | RecursionError, column: bool = True) -> str:
    """Why json.loads failed, in a row's or a file's error line."""
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON ({exc.msg} at column {exc.colno})" if column else f"invalid JSON ({exc.msg})"
    if isinstance(exc, RecursionError):
        return "invalid JSON: nested too deeply (more levels than Python's recursion limit)"
    return f"invalid JSON: {str(exc).split(';')[0][:120]}"  # e.g. an integer of more than 4,300 digits


def _read_jsonl(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[Row]:
    # Split on b"\n" only: str.splitlines() also splits on U+2028, U+0085, ... which JSON strings may hold raw.
    # Decoding line by line makes bad bytes one malformed row (skippable), not a failed file.
    with open(path, "rb") as handle:
        for number, line_bytes in enumerate(_bounded_lines(handle, max_row_bytes), start=1):
            origin = f"{path}:{number}"
            if line_bytes is None:
                yield Row({"__error__": _too_long(max_row_bytes)}, origin)
                continue
            if number == 1:
                line_bytes = line_bytes.removeprefix(b"\xef\xbb\xbf")
            try:
                line = line_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                error = f"not valid UTF-8 (byte {exc.start} of the line); re-encode the file as UTF-8"
                yield Row({"__error__": error}, origin)
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except (ValueError, RecursionError) as exc:
                yield Row({"__error__": _json_problem(exc)}, origin)
                continue
            if not isinstance(value, dict):
                value = {"__error__": f"expected a JSON object per line, found {type(value).__name__}"}
            yield Row(value, origin)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte offset {exc.start}); re-encode the file as UTF-8"
        ) from None


def _read_json(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[Row]:
    """A JSON list of rows (or an object holding one), parsed whole: large data belongs in JSONL, read by line."""
    try:
        value = json.loads(_read_text(path))
    except (ValueError, RecursionError) as exc:
        line = f":{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise DataError(
            f"{path}{line}: {_json_problem(exc, column=False)}; fix the file or convert it to JSONL"
        ) from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of rows (or an object holding one list), found an object")
        value = lists[0]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a list of rows, found {type(value).__name__}")
    for index, item in enumerate(value):
        yield _sized_row(
            item if isinstance(item, dict) else {"__error__": "row is not an object"}, f"{path}#{index}", max_row_bytes
        )


def _sized_row(values: dict[str, Any], origin: str, max_row_bytes: int) -> Row:
    """A row read whole (JSON, parquet, hub): above the byte limit it is a malformed row before anything renders it."""
    size = _value_bytes(values, max_row_bytes)
    return Row(values if size <= max_row_bytes else {"__error__": _too_long(max_row_bytes)}, origin)


def _value_bytes(value: Any, limit: int) -> int:
    """About how many bytes `value` holds as text (its strings, plus 8 per other leaf); counting stops above `limit`."""
    total, pending = 0, [value]
    while pending and total <= limit:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, (str, bytes)):
            total += len(item)
        else:
            total += 8
    return total


class _RecordTooLong(Exception):
    """A CSV record passed data.max_row_bytes while the csv module was reading it (internal)."""


class _CsvLines:
    """Decoded lines for `csv.reader`, at most `limit` bytes per record: the lines of a longer record are not held,
    `_RecordTooLong` stands for them. An iterator class (not a generator): it goes on after raising."""

    def __init__(self, path: Path, handle: BinaryIO, limit: int) -> None:
        self.path, self.limit, self.handle = path, limit, handle
        self.lines = _bounded_lines(handle, limit)
        self.number = 0  # physical lines read so far
        self.record_bytes = 0

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        offset = self.handle.tell()
        line = next(self.lines)
        self.number += 1
        if self.number == 1 and line is not None:
            line = line.removeprefix(b"\xef\xbb\xbf")
        if line is None or self.record_bytes + len(line) > self.limit:
            self.record_bytes = 0
            raise _RecordTooLong()
        self.record_bytes += len(line) + 1
        try:
            return line.decode("utf-8") + "\n"
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{self.path}:{self.number}: not valid UTF-8 (byte offset {offset + exc.start}); "
                "re-encode the file as UTF-8"
            ) from None


def _read_csv(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[Row]:
    # A field may be as long as a row may be (the csv module's own limit is 128 KiB, process-wide).
    csv.field_size_limit(max(csv.field_size_limit(), max_row_bytes))
    with open(path, "rb") as handle:
        lines = _CsvLines(path, handle, max_row_bytes)
        reader = csv.reader(lines)
        try:
            header = next(reader, None)
        except (_RecordTooLong, csv.Error) as exc:
            reason = "longer than data.max_row_bytes" if isinstance(exc, _RecordTooLong) else str(exc)
            raise DataError(f"{path}:1: cannot read the CSV header ({reason}); fix the first line") from None
        if header is None:
            return
        start = lines.number + 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except _RecordTooLong:
                fields = None
                error = _too_long(max_row_bytes)
            except csv.Error as exc:
                fields, error = None, f"not a CSV record ({exc}); quote fields that contain commas or quotes"
            lines.record_bytes = 0
            if fields is None:
                yield Row({"__error__": error}, f"{path}:{start}")
            elif fields:  # a blank line is no row
                values: dict[str, Any] = dict(zip(header, fields))
                if len(fields) != len(header):
                    error = (
                        f"row has {len(fields)} fields but the header has {len(header)}; "
                        "quote fields that contain commas"
                    )
                    values = {"__error__": error}
                yield Row(values, f"{path}:{start}")
            start = lines.number + 1


def _read_parquet(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[Row]:
    import pyarrow.parquet as pq

    index = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for item in batch.to_pylist():
                yield _sized_row(item, f"{path}#{index}", max_row_bytes)
                index += 1
    except OSError:
        raise
    except Exception as exc:  # pyarrow raises many types for a corrupt file
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise DataError(f"{path}: cannot read parquet ({type(exc).__name__}: {first})") from None


def _read_txt(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterable[Row]:
    """A plain-text file is one document (one row), so its size is the row's."""
    try:
        size = path.stat().st_size
        if size > max_row_bytes:
            return [Row({"__error__": _too_long(max_row_bytes, size)}, f"{path}:1")]
        text = _read_text(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the data file ({exc.strerror or exc}); check its permissions") from None
    return [Row({"text": text}, f"{path}:1")] if text.strip() else []


def _read_hub(source: DataSource, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> list[Row]:
    import datasets

    try:
        dataset = datasets.load_dataset(source.path, source.subset, split=source.split, revision=source.revision)
    except Exception as exc:  # datasets wraps hub/network failures in many types
        raise DataError(
            f"{source.path}: cannot load hub dataset ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "check the id, split and revision, or use a local file when offline"
        ) from None
    return [
        _sized_row(dict(item), f"{source.path}[{source.split}]#{i}", max_row_bytes) for i, item in enumerate(dataset)
    ]


# ---------------------------------------------------------------------------------------------------------------
# Rows -> examples


class RowError(ValueError):
    """A row that does not fit the format; reported with its origin."""


def to_example(row: Row, data: DataSection, tokenizer: Any) -> Example:
    values = row.values
    if "__error__" in values:
        raise RowError(values["__error__"])
    builders = {
        "messages": _messages_example,
        "instruction": _instruction_example,
        "prompt_completion": _prompt_completion_example,
        "text": _text_example,
    }
    example = builders[data.format](values, data, tokenizer)
    for text, _ in example.segments:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON may escape half a UTF-16 pair ("\ud800"); no tokenizer encodes it
            raise RowError(
                f"text holds an unpaired surrogate {text[exc.start]!r}; fix the escape in the source"
            ) from None
    example.origin, example.row = row.origin, values
    return example


def _get_string(values: dict[str, Any], column: str, required: bool = True) -> str:
    value = values.get(column)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN from pandas/CSV
        if required:
            raise RowError(f"missing column {column!r} (row has {sorted(values)}); map it with data.columns")
        return ""
    if not isinstance(value, str):
        raise RowError(f"column {column!r} must be text, found {type(value).__name__}")
    return value


def normalise_messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise RowError("messages must be a non-empty list of {role, content}")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise RowError(f"message {i} is not an object")
        if "from" in message and "value" in message:  # ShareGPT
            role, content = SHAREGPT_ROLES.get(message["from"]), message["value"]
        else:
            role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError(f"message {i} has role {role!r}; allowed: {sorted(ROLES)}")
        if not isinstance(content, str):
            raise RowError(f"message {i} content must be text, found {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


def _messages_example(values: dict[str, Any], data: DataSection, tokenizer: Any) -> Example:
    column = data.column("messages")
    if column not in values:
        raise RowError(f"missing column {column!r} (row has {sorted(values)}); map it with data.columns")
    return render_chat(normalise_messages(values[column]), tokenizer, data.train_on_inputs, data.system_message)


def _instruction_example(values: dict[str, Any], data: DataSection, tokenizer: Any) -> Example:
    instruction = _get_string(values, data.column("instruction"))
    extra_input = _get_string(values, data.column("input"), required=False)
    output = _get_string(values, data.column("output"))
    system = _get_string(values, data.column("system"), required=False)
    user = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": output},
    ]
    return render_chat(messages, tokenizer, data.train_on_inputs, data.system_message)


def _prompt_completion_example(values: dict[str, Any], data: DataSection, tokenizer: Any) -> Example:
    # data.separator belongs to the prompt: generation starts after it, and it is never scored.
    prompt = _get_string(values, data.column("prompt")) + data.separator
    completion = _get_string(values, data.column("completion"))
    if not completion.strip():
        raise RowError("completion is empty: nothing to learn from this row")
    return Example(
        origin="",
        segments=[(prompt, data.train_on_inputs), (completion, True)],
        prompt=prompt,
        reference=completion,
        add_bos=True,
        add_eos=True,
    )


def _text_example(values: dict[str, Any], data: DataSection, tokenizer: Any) -> Example:
    text = _get_string(values, data.column("text"))
    if not text.strip():
        raise RowError("text is empty")
    return Example(origin="", segments=[(text, True)], prompt="", reference=text, add_bos=True, add_eos=True)


class TemplateError(DataError):
    """The chat template cannot be used to find the assistant tokens."""


# Stands in for each assistant message when the template is rendered to find where assistant contents go: letters,
# digits and '@' only, so trim/strip and the think-tag handling of templates leave it as it is.
_PLACEHOLDER = "@@sovtune-assistant-{}@@"
_SYSTEM_PROBE = "sovtune-system-probe"


def render_chat(
    messages: list[dict[str, str]], tokenizer: Any, train_on_inputs: bool = False, system_message: str = "keep"
) -> Example:
    """Render the conversation with the chat template once and supervise each assistant content plus the template's
    turn terminator after it; everything else (system text, user turns, role headers, think-block scaffolding, the
    newline after a terminator) is context.

    Where each assistant content sits is found by rendering the same conversation with placeholders for the assistant
    contents: the template's text around them is the same in both renders. This needs no `{% generation %}` markers,
    no response-template token matching and no prefix-stable template (Qwen3 renders the last assistant turn with an
    empty think block that earlier turns lose; Gemma 4 adds a thought channel only to the generation prompt). A
    template that puts no special token after the assistant content (Falcon's) gets the tokenizer's EOS appended to
    each assistant turn, so the model learns to stop.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise TemplateError(
            "the tokenizer has no chat template; set data.chat_template (a built-in name such as llama3, inline "
            "Jinja or a .jinja file) or use data.format: prompt_completion"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("conversation has no assistant message: nothing to learn from this row")
    if messages[0]["role"] == "assistant":
        raise RowError("conversation starts with an assistant message; it needs a user (or system) turn first")
    messages = place_system_text(messages, tokenizer, system_message)
    with _within_budget():  # the template renders the conversation twice: the whole row shares one budget
        example = _render_turns(messages, tokenizer, train_on_inputs)
    example.empty_target = all(not m["content"].strip() for m in messages if m["role"] == "assistant")
    return example


def _render_turns(messages: list[dict[str, str]], tokenizer: Any, train_on_inputs: bool) -> Example:
    full = _apply_template(tokenizer, messages, add_generation_prompt=False)
    spans = _assistant_spans(messages, tokenizer, full)
    terminator = _terminator_text(tokenizer, tokenizer.chat_template)
    segments: list[tuple[str, bool]] = []
    cursor = 0
    prompt = ""
    for start, end in spans:
        if start > cursor:
            segments.append((full[cursor:start], train_on_inputs))
        prompt = "".join(text for text, _ in segments)
        after = full[end:]
        cut = after.find(terminator) if terminator else -1
        if cut >= 0 and not after[:cut].strip():  # only whitespace between the content and the terminator
            cursor = end + cut + len(terminator)
            segments.append((full[start:cursor], True))
        else:  # no turn terminator: train EOS after the content so the model learns to stop
            cursor = end
            segments.append((full[start:end] + (tokenizer.eos_token or ""), True))
    if len(full) > cursor:
        segments.append((full[cursor:], train_on_inputs))
    reference = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
    return Example(origin="", segments=segments, prompt=prompt, reference=reference, joined=True)


def _assistant_spans(messages: list[dict[str, str]], tokenizer: Any, full: str) -> list[tuple[int, int]]:
    """(start, end) in `full` of each assistant content as the template rendered it (it may trim it)."""
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    marked = list(messages)
    for n, index in enumerate(assistants):
        marked[index] = {**messages[index], "content": _PLACEHOLDER.format(n)}
    skeleton = _apply_template(tokenizer, marked, add_generation_prompt=False)
    pieces = re.split(r"@@sovtune-assistant-(\d+)@@", skeleton)
    texts, order = pieces[0::2], [int(n) for n in pieces[1::2]]
    if order != list(range(len(assistants))):
        raise TemplateError(
            "the chat template does not render every assistant message once and in order, so assistant tokens "
            "cannot be located; set data.chat_template to a template that does"
        )
    spans = []
    position = 0
    for n, index in enumerate(assistants):
        if not full.startswith(texts[n], position):
            raise _unlocatable(n)
        position += len(texts[n])
        following = texts[n + 1]
        if n + 1 == len(assistants):
            end = len(full) - len(following) if full.endswith(following) else -1
        else:
            end = full.find(following, position) if following else -1
        if end < position or full[position:end].strip() != messages[index]["content"].strip():
            raise _unlocatable(n)
        spans.append((position, end))
        position = end
    return spans


def _unlocatable(turn: int) -> TemplateError:
    return TemplateError(
        f"the chat template renders assistant turn {turn + 1} differently depending on its content (e.g. reasoning "
        "tags it moves elsewhere), so its tokens cannot be located; remove them from the data or set "
        "data.chat_template"
    )


def place_system_text(messages: list[dict[str, str]], tokenizer: Any, mode: str = "keep") -> list[dict[str, str]]:
    """System messages as data.system_message says: kept for the template, or merged into the next user turn (its text,
    a blank line, then the user's), which is what templates without a system role need (Gemma 2, Mistral)."""
    if not any(m["role"] == "system" for m in messages):
        return messages
    if mode == "merge":
        merged: list[dict[str, str]] = []
        pending: list[str] = []
        for message in messages:
            if message["role"] == "system":
                pending.append(message["content"])
            elif message["role"] == "user" and pending:
                merged.append({**message, "content": "\n\n".join([*pending, message["content"]])})
                pending = []
            else:
                merged.append(message)
        if pending:
            raise RowError("a system message has no user message after it to merge into (data.system_message: merge)")
        return merged
    problem = _system_support(tokenizer, tokenizer.chat_template)
    if problem:
        raise TemplateError(
            f"data.chat_template: the chat template {problem}; set data.system_message: merge to put the system "
            "text at the start of the first user turn"
        )
    return messages


@functools.lru_cache(maxsize=16)
def _system_support(tokenizer: Any, chat_template: str) -> str:
    """Why the template cannot take a system message ('' when it can): it raises, or renders without its text."""
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    try:
        render_template(tokenizer, conversation, add_generation_prompt=False)
    except TemplateError:
        raise  # over the time budget
    except Exception:  # the template fails without a system message too: not this check's business
        return ""
    probe = [{"role": "system", "content": _SYSTEM_PROBE}, *conversation]
    try:
        text = render_template(tokenizer, probe, add_generation_prompt=False)
    except TemplateError:
        raise
    except Exception as exc:  # jinja2 raise_exception
        return f"rejects system messages ({str(exc).splitlines()[0][:120]})"
    return "" if _SYSTEM_PROBE in text else "drops system messages (their text is not in what it renders)"


def generation_prompt(messages: list[dict[str, str]], tokenizer: Any, system_message: str = "keep") -> str:
    """The text generation starts from, as training saw it: the conversation with an assistant turn, cut where the
    assistant content begins, without the spaces the template puts before it (the model learnt to produce those)."""
    messages = place_system_text(messages, tokenizer, system_message)
    marked = [*messages, {"role": "assistant", "content": _PLACEHOLDER.format(0)}]
    skeleton = _apply_template(tokenizer, marked, add_generation_prompt=False)
    cut = skeleton.rfind(_PLACEHOLDER.format(0))
    if cut < 0:
        return _apply_template(tokenizer, messages, add_generation_prompt=True)
    return skeleton[:cut].rstrip(" \t")


@functools.lru_cache(maxsize=16)
def _terminator_text(tokenizer: Any, chat_template: str) -> str | None:
    """The turn terminator as text (cached: finding it renders the template, once per tokenizer and template)."""
    token_id = chat_turn_terminator(tokenizer)
    return None if token_id is None else tokenizer.decode([token_id], skip_special_tokens=False)


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        return render_template(tokenizer, messages, add_generation_prompt)
    except TemplateError:
        raise
    except Exception as exc:  # jinja2 raises TemplateError/UndefinedError/raise_exception from templates
        raise RowError(f"chat template failed: {str(exc).splitlines()[0][:200]}") from None


# The time one render of a conversation may take (data.chat_template_timeout_s) and the template's name for the
# error line; `template_budget` sets both for a recipe's data, the schema's default holds elsewhere.
_RENDER_BUDGET: contextvars.ContextVar[tuple[float, str]] = contextvars.ContextVar(
    "render_budget", default=(DataSection.model_fields["chat_template_timeout_s"].default, "the chat template")
)


@contextlib.contextmanager
def template_budget(data: DataSection) -> Iterator[None]:
    """Renders inside the block stop after data.chat_template_timeout_s seconds each."""
    token = _RENDER_BUDGET.set((data.chat_template_timeout_s, _template_name(data)))
    try:
        yield
    finally:
        _RENDER_BUDGET.reset(token)


def _template_name(data: DataSection) -> str:
    template = data.chat_template
    if not template:
        return "the tokenizer's chat template"
    return "data.chat_template (inline)" if "{" in template else f"data.chat_template {template}"


def check_template(tokenizer: Any, data: DataSection) -> None:
    """Render a probe conversation once: a template that does not compile, or does not finish, is one line naming
    it before any row is rendered (not one malformed row per row)."""
    import jinja2

    if data.format not in ("messages", "instruction") or not isinstance(getattr(tokenizer, "chat_template", None), str):
        return
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    try:
        with template_budget(data):
            render_template(tokenizer, probe, add_generation_prompt=False)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"{_template_name(data)}: not a valid Jinja template (line {exc.lineno}: {exc.message}); fix its syntax"
        ) from None
    except TemplateError:
        raise
    except Exception:  # a template may refuse this probe (raise_exception); the rows themselves will say
        return


class _RenderTimeout(BaseException):
    """Raised by the alarm inside a template render (a BaseException: no `except Exception` on the way swallows it)."""


def render_template(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The conversation rendered as text by the tokenizer's chat template, within the time budget: a template is
    code from the model or the recipe, and a runaway loop in it must stop with one line, not hang the command."""
    with _within_budget():
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt))


@contextlib.contextmanager
def _within_budget() -> Iterator[None]:
    """The block (rendering one conversation) stops with one line after the budget; nested blocks share the outer
    one's clock."""
    seconds, name = _RENDER_BUDGET.get()
    try:
        with _alarm(seconds):
            yield
    except _RenderTimeout:
        raise TemplateError(
            f"{name}: rendering one conversation took longer than data.chat_template_timeout_s={seconds:g} s "
            "(a loop in the template that does not end, or a conversation of very many turns?); fix the template "
            "or the row, or raise data.chat_template_timeout_s"
        ) from None


_alarm_set = False  # an outer block's timer runs (only the main thread gets here)


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise _RenderTimeout in this thread after `seconds` (a real-time timer; only the main thread gets signals, so
    elsewhere the block runs unbounded)."""
    global _alarm_set
    if _alarm_set or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise _RenderTimeout()

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    _alarm_set = True
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _alarm_set = False
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------------------------
# Examples -> tokens


@dataclass
class Encoded:
    """Token ids of an example's text with the character span each one covers."""

    ids: list[int]
    spans: list[tuple[int, int]]
    exact: bool  # the tokenizer's own ids of the whole text, what an inference server gets for it


def encode(text: str, cuts: list[int], tokenizer: Any) -> Encoded:
    """Tokenise `text` as one string, so every token is the one an inference server produces for the same text
    (SentencePiece adds no word-start mark at a segment boundary, BPE merges across it as it does at inference).

    `cuts` are the prompt/completion boundaries. A token across one is fine when the prompt side of it is only
    whitespace (" SELECT": the template's space before the answer); it then belongs to the completion. A token with
    text on both sides cannot be split between prompt and completion, so the two sides are tokenised apart there.
    """
    try:
        found = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # slow (Python) tokenizers give no offsets: one segment at a time
        return _encode_apart(text, cuts, tokenizer)
    ids, spans = list(found["input_ids"]), [(int(s), int(e)) for s, e in found["offset_mapping"]]
    for start, end in spans:
        inside = cuts[bisect.bisect_right(cuts, start) : bisect.bisect_left(cuts, end)]
        glued = next((cut for cut in inside if text[start:cut].strip()), None)
        if glued is not None:
            left = encode(text[:glued], [c for c in cuts if c < glued], tokenizer)
            right = encode(text[glued:], [c - glued for c in cuts if c > glued], tokenizer)
            moved = [(s + glued, e + glued) for s, e in right.spans]
            return Encoded(left.ids + right.ids, left.spans + moved, False)
    return Encoded(ids, spans, True)


def _encode_apart(text: str, cuts: list[int], tokenizer: Any) -> Encoded:
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for start, end in zip([0, *cuts], [*cuts, len(text)]):
        piece = tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
        ids += piece
        spans += [(start, end)] * len(piece)
    return Encoded(ids, spans, len(cuts) == 0)


def _anchor(text: str, span: tuple[int, int]) -> int:
    """Where a token belongs: its first non-whitespace character (its start when it is all whitespace)."""
    start, end = span
    stripped = len(text[start:end]) - len(text[start:end].lstrip())
    return start + stripped if stripped < end - start else start


def encode_example(example: Example, tokenizer: Any) -> tuple[Encoded, list[bool]]:
    """The example's tokens and, for each, whether it is supervised (the segment its anchor falls in)."""
    text = example.text
    starts, position = [], 0
    for segment, _ in example.segments:
        starts.append(position)
        position += len(segment)
    if example.joined:
        cuts = sorted(
            {starts[i] for i in range(1, len(starts)) if example.segments[i][1] != example.segments[i - 1][1]}
            | ({len(example.prompt)} if 0 < len(example.prompt) < len(text) else set())
        )
        encoded = encode(text, cuts, tokenizer)
    else:
        encoded = _encode_apart(text, starts[1:], tokenizer)
    supervised = [
        example.segments[max(0, bisect.bisect_right(starts, _anchor(text, span)) - 1)][1] for span in encoded.spans
    ]
    return encoded, supervised


@functools.lru_cache(maxsize=16)
def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS before text itself (Llama, Mistral, Gemma do; GPT-NeoX, Falcon, Qwen do not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def tokenize(example: Example, tokenizer: Any, max_length: int) -> Tokenized:
    """Tokens with labels: a chat example as the tokenizer tokenises its whole rendered text, other formats segment by
    segment (Example.joined); each token labelled by the segment it belongs to.

    BOS is added for plain-text formats only where the tokenizer adds it itself (chat templates render their own).
    """
    encoded, supervised = encode_example(example, tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    if example.add_bos and adds_bos(tokenizer):
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    input_ids += encoded.ids
    labels += [token if trained else IGNORE_INDEX for token, trained in zip(encoded.ids, supervised)]
    if example.add_eos:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    truncated = len(input_ids) > max_length
    return Tokenized(input_ids[:max_length], labels[:max_length], example.origin, truncated, encoded.exact)


def prompt_token_ids(example: Example, tokenizer: Any) -> list[int]:
    """The tokens generation starts from: exactly training's tokens before the completion (the last assistant turn,
    or the completion), so evaluation asks the model to continue where training taught it to."""
    encoded, _ = encode_example(example, tokenizer)
    ids = [bos for bos in [tokenizer.bos_token_id] if example.add_bos and adds_bos(tokenizer)]
    return ids + [
        token for token, span in zip(encoded.ids, encoded.spans) if _anchor(example.text, span) < len(example.prompt)
    ]


def boundary_mismatches(examples: Iterable[Example], tokenizer: Any) -> tuple[int, list[str]]:
    """prompt_completion rows whose prompt and completion tokenise differently joined than apart: how many rows were
    checked, and for each mismatch `origin: 'A' + 'B' apart, 'AB' joined` (the tokens at the boundary).

    sovtune tokenises them apart (the completion as generation produces it); tools that tokenise the joined text,
    such as lm-evaluation-harness, then score other tokens.
    """
    checked, found = 0, []
    for example in examples:
        if len(example.segments) != 2:
            continue
        (prompt, _), (completion, _) = example.segments
        checked += 1
        before = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        after = tokenizer(completion, add_special_tokens=False)["input_ids"]
        joined = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
        if before + after == joined:
            continue
        edge = max(len(before) - 1, 0)
        apart = f"{tokenizer.decode(before[edge:])!r} + {tokenizer.decode(after[:1])!r}"
        together = " ".join(repr(tokenizer.decode([token])) for token in joined[edge : edge + 2])
        found.append(f"{example.origin}: {apart} apart, {together} joined")
    return checked, found


def split_text_example(example: Example, tokenizer: Any, max_length: int) -> list[Tokenized]:
    """Continued pre-training: long documents become consecutive windows, not one truncated row; every token is a
    label (a window's first token is never a target)."""
    ids = tokenize(example, tokenizer, max_length=10**9).input_ids
    return split_windows(Tokenized(ids, list(ids), example.origin), max_length)


def split_windows(whole: Tokenized, size: int) -> list[Tokenized]:
    """Consecutive windows of `size` tokens of one tokenised document, each named `document@start`; a window of
    one token predicts nothing and is left out."""
    return [
        Tokenized(whole.input_ids[start : start + size], whole.labels[start : start + size], f"{whole.origin}@{start}")
        for start in range(0, len(whole.input_ids), size)
        if len(whole.input_ids[start : start + size]) > 1
    ]


def document_of(origin: str) -> str:
    """The document a window came from: `file:3@512` -> `file:3`; other origins are their own document."""
    head, separator, start = origin.rpartition("@")
    return head if separator and start.isdigit() else origin


# ---------------------------------------------------------------------------------------------------------------
# The whole data stage


def load_examples(
    sources: list[DataSource],
    data: DataSection,
    tokenizer: Any,
    stats: SplitStats,
    base_dir: Path,
    scanned: ScanReport | None = None,
    origins: set[str] | None = None,
) -> list[Example]:
    """Rows of `sources` rendered to examples (only the rows whose origin is in `origins`, when given).

    A training source of a mixture reads its rows in its own format and columns (`data.source_view`).
    """
    check_template(tokenizer, data)
    examples, bad = [], []
    for source in sources:
        view = data.source_view(source) if isinstance(source, TrainSource) else data
        rows = read_rows(source, view.format, base_dir, data.max_row_bytes)
        if origins is not None:
            rows = [row for row in rows if row.origin in origins]
        if scanned is not None:
            # Secrets/PII are counted, and redacted or refused per sovereignty.data_scan, before anything is tokenised.
            rows, _ = scan_rows(rows, scanned.policy, scanned)
        for row in rows:
            stats.rows += 1
            try:
                with template_budget(data):
                    examples.append(to_example(row, view, tokenizer))
            except TemplateError as exc:  # the template, not the row, is at fault: stop at the first row it meets
                raise TemplateError(f"{row.origin}: {exc}") from None
            except RowError as exc:
                bad.append(f"{row.origin}: {exc}")
                stats.drop("malformed row")
    if bad and data.on_bad_rows == "error":
        more = f" (and {len(bad) - 1} more malformed rows)" if len(bad) > 1 else ""
        raise DataError(f"{bad[0]}{more}; fix the rows or set data.on_bad_rows: skip")
    return examples


def tokenize_split(examples: list[Example], data: DataSection, tokenizer: Any, stats: SplitStats) -> list[Tokenized]:
    max_length = data.max_length
    stop_ids = set(stop_token_ids(tokenizer))
    out: list[Tokenized] = []
    for example in examples:
        if data.format == "text":
            pieces = split_text_example(example, tokenizer, max_length)
        else:
            pieces = [tokenize(example, tokenizer, max_length)]
        kept = 0
        for piece in pieces:
            if piece.supervised_tokens == 0:
                stats.drop("no supervised tokens left after truncation to max_length")
                continue
            kept += 1
            _count_tokens(stats, piece, stop_ids)
            out.append(piece)
        stats.empty_targets += example.empty_target and kept > 0
    return out


def _count_tokens(stats: SplitStats, piece: Tokenized, stop_ids: set[int]) -> None:
    stats.token_lengths.append(len(piece.input_ids))
    stats.truncated += piece.truncated
    stats.supervised_tokens += piece.supervised_tokens
    stats.total_tokens += len(piece.input_ids)
    stats.eos_supervised += any(label in stop_ids for label in piece.labels)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS plus the chat template's turn terminator (e.g. <|im_end|>, <|eot_id|>): where generation must stop."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    terminator = chat_turn_terminator(tokenizer)
    if terminator is not None and terminator not in ids:
        ids.append(terminator)
    return ids


def chat_turn_terminator(tokenizer: Any) -> int | None:
    """The first special token after the assistant's content in the rendered template, if any."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    probe = "sovtune-probe"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}]
    try:
        text = render_template(tokenizer, messages, add_generation_prompt=False)
    except TemplateError:
        raise
    except Exception:
        return None
    tail = text[text.rfind(probe) + len(probe) :]
    special = set(tokenizer.all_special_ids)
    for token_id in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if token_id in special or token_id in getattr(tokenizer, "added_tokens_decoder", {}):
            return token_id
    return None


def split_train_eval(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_eval = max(1, round(len(shuffled) * eval_fraction))
    if len(shuffled) - n_eval < 1:
        raise DataError(
            f"only {len(shuffled)} usable rows: too few to hold out eval_fraction; add data or give data.eval"
        )
    return shuffled[n_eval:], shuffled[:n_eval]


def prepare_data(
    data: DataSection, tokenizer: Any, *, base_dir: Path, seed: int, scan_policy: str = "warn"
) -> PreparedData:
    """Read, render, split, de-duplicate, tokenise and mix the data; raise on what would ruin a run.

    `base_dir` is the recipe's folder (relative paths), `seed` the split and mixture seed (train.seed), `scan_policy`
    sovereignty.data_scan.
    """
    scanned = ScanReport(policy=scan_policy)
    pools = [SourcePool(index, source, data.source_view(source)) for index, source in enumerate(data.train)]
    for pool in pools:
        pool.examples = load_examples([pool.source], data, tokenizer, pool.stats, base_dir, scanned)
        _cap(pool, seed)
    if sum(pool.stats.rows for pool in pools) == 0:  # before any split, so the message names the empty source
        _refuse_ruinous([], pools, data)
    eval_stats = SplitStats()
    if data.eval is not None:
        eval_examples = load_examples([data.eval], data, tokenizer, eval_stats, base_dir, scanned)
    else:
        eval_examples = _hold_out(pools, data, seed)
        eval_stats.rows = len(eval_examples)
    train_keys = {example.key() for pool in pools for example in pool.examples}
    duplicates = sum(1 for example in eval_examples if example.key() in train_keys)
    eval_examples = [example for example in eval_examples if example.key() not in train_keys]
    if duplicates:
        eval_stats.dropped["exact duplicate of a training row"] = duplicates
    for pool in pools:
        pool.tokenized = tokenize_split(pool.examples, pool.view, tokenizer, pool.stats)
    evaluation = tokenize_split(eval_examples, data, tokenizer, eval_stats)
    kept_origins = {document_of(item.origin) for item in evaluation}
    eval_examples = [example for example in eval_examples if example.origin in kept_origins]
    _refuse_ruinous([item for pool in pools for item in pool.tokenized], pools, data)
    train, train_stats = mix_sources(pools, tokenizer, seed)
    stats = {
        "train": train_stats,
        "eval": eval_stats.summary(),
        "eval_duplicates_removed": duplicates,
        "data_scan": scanned.summary(),
    }
    return PreparedData(train=train, eval=evaluation, eval_examples=eval_examples, stats=stats)


def _cap(pool: SourcePool, seed: int) -> None:
    """`max_examples`: a seeded sample of the source's rows, kept in file order."""
    cap = pool.source.max_examples
    if cap is None or len(pool.examples) <= cap:
        return
    keep = sorted(random.Random(f"{seed}:max_examples:{pool.index}").sample(range(len(pool.examples)), cap))
    pool.capped_from = len(pool.examples)
    pool.examples = [pool.examples[index] for index in keep]


def _hold_out(pools: list[SourcePool], data: DataSection, seed: int) -> list[Example]:
    """The eval_fraction split, drawn from the task's sources (data.format, no general-text replay).

    The kept examples stay in the split's shuffled order, so a single source trains exactly as before mixtures.
    """
    eligible = [pool for pool in pools if pool.source in data.held_out_sources()]
    owner = {id(example): pool for pool in eligible for example in pool.examples}
    combined = [example for pool in eligible for example in pool.examples]
    if not combined:
        raise DataError(
            "data.eval_fraction: no training source in data.format "
            f"{data.format!r} to hold examples out from; give data.eval or a source in that format"
        )
    kept, held = split_train_eval(combined, data.eval_fraction, seed)
    for pool in eligible:
        pool.held_out = sum(owner[id(example)] is pool for example in held)
        pool.examples = [example for example in kept if owner[id(example)] is pool]
        pool.stats.rows -= pool.held_out
    return held


def mix_sources(pools: list[SourcePool], tokenizer: Any, seed: int) -> tuple[list[Tokenized], dict[str, Any]]:
    """The training examples of one epoch, by each source's share, and their statistics (overall and per source).

    Sources without a weight give each of their examples once. A weighted source gives round(weight x epoch)
    examples, where the epoch holds the unweighted sources' examples / (1 - sum of weights), or, when every source
    is weighted, as many examples as all sources hold: a seeded sample without replacement when the source has more,
    all of them repeated (and a seeded sample for the remainder) when it has fewer. The mixture is drawn once per
    run from train.seed, so a resumed run trains on the same examples; the trainer shuffles them each epoch, and
    epochs and max_steps count passes over this mixture as for a single source.
    """
    unweighted = sum(len(pool.tokenized) for pool in pools if pool.source.weight is None)
    weights = sum(pool.source.weight for pool in pools if pool.source.weight is not None)
    epoch = unweighted / (1 - weights) if unweighted else sum(len(pool.tokenized) for pool in pools)
    picked: list[list[Tokenized]] = []
    for pool in pools:
        if pool.source.weight is None:
            picked.append(pool.tokenized)
        else:
            rng = random.Random(f"{seed}:mixture:{pool.index}")
            picked.append(_draw(pool.tokenized, round(pool.source.weight * epoch), rng))
    train = [item for items in picked for item in items]
    return train, _mixture_stats(pools, picked, train, tokenizer)


def _draw(items: list[Tokenized], count: int, rng: random.Random) -> list[Tokenized]:
    repeats, rest = divmod(count, len(items))
    return items * repeats + [items[index] for index in sorted(rng.sample(range(len(items)), rest))]


def _mixture_stats(
    pools: list[SourcePool], picked: list[list[Tokenized]], train: list[Tokenized], tokenizer: Any
) -> dict[str, Any]:
    """The training split's statistics over the examples trained on, plus one line per source."""
    overall = SplitStats(rows=sum(pool.stats.rows for pool in pools))
    for pool in pools:
        for reason, count in pool.stats.dropped.items():
            overall.dropped[reason] = overall.dropped.get(reason, 0) + count
    stop_ids = set(stop_token_ids(tokenizer))
    for item in train:
        _count_tokens(overall, item, stop_ids)
    # Examples with only empty answers, in the proportion each source's drawn examples hold them.
    overall.empty_targets = sum(
        round(pool.stats.empty_targets * len(items) / len(pool.tokenized))
        for pool, items in zip(pools, picked)
        if pool.tokenized
    )
    summary = overall.summary()
    chats = [item for pool, items in zip(pools, picked) if pool.view.format != "text" for item in items]
    if chats and len(chats) < len(train):
        # Text windows end without a stop token unless they end their document: count the rows that should.
        summary["eos_supervised_fraction"] = sum(
            any(label in stop_ids for label in item.labels) for item in chats
        ) / len(chats)
    total_tokens = sum(len(item.input_ids) for item in train)
    summary["sources"] = [
        {
            "source": pool.source.describe(),
            "format": pool.view.format,
            "weight": pool.source.weight,
            "general": pool.source.general,
            "rows": pool.stats.rows,
            "held_out": pool.held_out,
            "sampled_from": pool.capped_from,
            "examples": len(pool.tokenized),
            "per_epoch": len(items),
            "share": len(items) / len(train) if train else 0.0,
            "tokens": sum(len(item.input_ids) for item in items),
            "token_share": sum(len(item.input_ids) for item in items) / total_tokens if total_tokens else 0.0,
            "supervised_tokens": sum(item.supervised_tokens for item in items),
            "repeats": len(items) / len(pool.tokenized) if pool.tokenized else 0.0,
        }
        for pool, items in zip(pools, picked)
    ]
    return summary


def load_held_out(
    data: DataSection, tokenizer: Any, origins: list[str], *, base_dir: Path, scan_policy: str = "warn"
) -> tuple[list[Example], list[Tokenized], SplitStats]:
    """The held-out examples a training run recorded (their origins, in order), without re-reading the training set
    into tokens: only those rows are rendered and tokenised."""
    stats = SplitStats()
    sources: list[DataSource] = [data.eval] if data.eval is not None else list(data.held_out_sources())
    wanted = set(origins)
    scanned = ScanReport(policy=scan_policy)
    found = {
        example.origin: example for example in load_examples(sources, data, tokenizer, stats, base_dir, scanned, wanted)
    }
    missing = [origin for origin in origins if origin not in found]
    if missing:
        raise DataError(
            f"{missing[0]}: a held-out row recorded at training time is no longer in the data"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
            "evaluate with the data the run trained on"
        )
    examples = [found[origin] for origin in origins]
    return examples, tokenize_split(examples, data, tokenizer, stats), stats


def _refuse_ruinous(train: list[Tokenized], pools: list[SourcePool], data: DataSection) -> None:
    sources = ", ".join(source.describe() for source in data.train)
    if sum(pool.stats.rows for pool in pools) + sum(pool.held_out for pool in pools) == 0:
        raise DataError(f"{sources}: the training data is empty; point data.train at rows in format {data.format!r}")
    for pool in pools:
        where, stats = (pool.where if len(pools) > 1 else pool.source.describe()), pool.stats
        if stats.rows == 0 and pool.held_out == 0:
            raise DataError(f"{where}: no rows; point it at rows in format {pool.view.format!r}")
        if not pool.tokenized and (train or len(pools) > 1):
            reasons = ", ".join(f"{count} {reason}" for reason, count in stats.dropped.items()) or "none left"
            raise DataError(f"{where}: no usable training rows ({reasons}); check its format, columns, max_length")
        if pool.tokenized and stats.truncated == len(pool.tokenized) and pool.view.format != "text":
            raise DataError(
                f"{where}: every row is longer than data.max_length={data.max_length} and was truncated; "
                "raise data.max_length"
            )
    if not train:
        reasons = ", ".join(f"{count} {reason}" for pool in pools for reason, count in pool.stats.dropped.items())
        raise DataError(f"{sources}: no usable training rows ({reasons}); check data.format, data.columns, max_length")
    if train and sum(pool.stats.empty_targets for pool in pools) == len(train):
        answer = {"messages": "assistant message", "instruction": "output"}.get(data.format, "answer")
        raise DataError(
            f"{sources}: every {answer} is empty, so only the end-of-turn token would be trained; fill in the "
            f"answers, or map the column that holds them with data.columns"
        )


# ---------------------------------------------------------------------------------------------------------------
# Replay text must not hold the passages the forgetting check scores

MIN_SHARED_PARAGRAPH = 60  # characters: shorter paragraphs ("Returns the value.") are common to unrelated texts


def paragraphs(text: str) -> set[str]:
    """Normalised paragraphs (blank-line separated, whitespace collapsed, lower case) of at least 60 characters."""
    found = (" ".join(part.split()).lower() for part in text.replace("\r\n", "\n").split("\n\n"))
    return {paragraph for paragraph in found if len(paragraph) >= MIN_SHARED_PARAGRAPH}


def row_text(row: Row, data: DataSection) -> str:
    """The text a row contributes: the text column for format text, every string value otherwise."""
    if data.format == "text":
        value = row.values.get(data.column("text"))
        return value if isinstance(value, str) else ""
    return "\n\n".join(value for value in row.values.values() if isinstance(value, str))


def rows_sharing_text(
    sources: list[TrainSource], data: DataSection, evaluated: DataSource, evaluated_view: DataSection, base_dir: Path
) -> list[str]:
    """Origins of the training rows of `sources` that share a paragraph with a row of `evaluated`."""
    evaluated_rows = read_rows(evaluated, evaluated_view.format, base_dir, data.max_row_bytes)
    held = set().union(*(paragraphs(row_text(row, evaluated_view)) for row in evaluated_rows))
    shared = []
    for source in sources:
        view = data.source_view(source)
        for row in read_rows(source, view.format, base_dir, data.max_row_bytes):
            if held & paragraphs(row_text(row, view)):
                shared.append(row.origin)
    return shared


# ---------------------------------------------------------------------------------------------------------------
# Provenance of the data: what each source holds, by content hash


def hub_snapshot(repo_id: str, revision: str | None, repo_type: str) -> Path | None:
    """The locally cached snapshot folder of a hub repo (its name is the resolved commit), without network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, repo_type=repo_type, local_files_only=True))
    except Exception:  # not cached (yet): the commit stays unknown rather than failing the run
        return None


def data_records(data: DataSection, base_dir: Path) -> list[dict[str, Any]]:
    """Each source: its local files with SHA-256 (absolute paths), or the hub dataset id, revision and cached commit."""
    sources = [("train", source) for source in data.train]
    if data.eval is not None:
        sources.append(("eval", data.eval))
    records = []
    for split, source in sources:
        path = resolve(source.path, base_dir)
        record: dict[str, Any] = {"split": split, "source": source.path}
        if path.exists():
            record["files"] = [file_entry(path)] if path.is_file() else tree_entries(path)
        else:
            snapshot = hub_snapshot(source.path, source.revision, "dataset")
            record["hub"] = {
                "id": source.path,
                "revision": source.revision,
                "commit": snapshot.name if snapshot is not None else None,
                "subset": source.subset,
                "split": source.split,
            }
            record["files"] = []
        records.append(record)
    return records


def data_file_hashes(data: DataSection, base_dir: Path) -> list[dict[str, str | None]]:
    """sha256 of each local data file (hub datasets as id@revision), e.g. for the audit log and the fingerprint."""
    hashes: list[dict[str, str | None]] = []
    for record in data_records(data, base_dir):
        hashes.extend({"path": entry["path"], "sha256": entry["sha256"]} for entry in record["files"])
        if "hub" in record:
            hub = record["hub"]
            hashes.append({"path": f"{hub['id']}@{hub['commit'] or hub['revision']}", "sha256": None})
    return hashes
