"""Data: rows -> examples -> tokens, with labels checked token by token against hand-built expectations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers import CORPUS, build_tokenizer, write_jsonl
from sovtune import model as models
from sovtune.config import DataSource, Recipe, validate_recipe
from sovtune.data import (
    IGNORE_INDEX,
    Row,
    read_rows,
    stop_token_ids,
    to_example,
    tokenize,
)
from sovtune.errors import DataError
from sovtune.inputs import prepare_recipe_data as prepare_data

SYSTEM_USER_ASSISTANT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How many?"},
    {"role": "assistant", "content": "Twelve."},
    {"role": "user", "content": "Names?"},
    {"role": "assistant", "content": "SELECT name"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def make(tmp_path: Path, model_dir: Path, **data: Any) -> Recipe:
    """A validated recipe whose relative data paths resolve against tmp_path."""
    data.setdefault("train", "train.jsonl")
    return validate_recipe(
        {"model": {"name_or_path": str(model_dir)}, "data": data, "source_path": str(tmp_path / "recipe.yaml")}
    )


def expected(tokenizer: Any, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """input_ids and labels for hand-written (text, supervised) pieces."""
    ids: list[int] = []
    labels: list[int] = []
    for text, supervised in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    return ids, labels


def supervised_text(tokenizer: Any, input_ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([t for t, label in zip(input_ids, labels) if label != IGNORE_INDEX])


def one(tmp_path: Path, model_dir: Path, tokenizer: Any, row: dict[str, Any], **data: Any) -> Any:
    recipe = make(tmp_path, model_dir, **data)
    example = to_example(Row(row, "test:1"), recipe.data, tokenizer)
    return example, tokenize(example, tokenizer, recipe.data.max_length)


# ---------------------------------------------------------------------------------------------------------------
# Masking per format


def test_messages_supervise_only_assistant_turns_and_their_terminator(tmp_path, tiny_model_dir, tokenizer) -> None:
    example, tokens = one(tmp_path, tiny_model_dir, tokenizer, {"messages": SYSTEM_USER_ASSISTANT})
    ids, labels = expected(
        tokenizer,
        [
            (
                "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHow many?<|im_end|>\n"
                "<|im_start|>assistant\n",
                False,
            ),
            ("Twelve.<|im_end|>", True),
            ("\n<|im_start|>user\nNames?<|im_end|>\n<|im_start|>assistant\n", False),
            ("SELECT name<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert tokens.input_ids == ids
    assert tokens.labels == labels
    # Independent checks: the rendered conversation re-tokenises to the same ids, exactly the assistant text plus
    # one <|im_end|> per assistant turn is trained, and BOS is a single special token.
    rendered = tokenizer.apply_chat_template(SYSTEM_USER_ASSISTANT, tokenize=False)
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == tokens.input_ids
    assert tokens.input_ids[0] == tokenizer.bos_token_id and tokens.input_ids.count(tokenizer.bos_token_id) == 1
    assert supervised_text(tokenizer, tokens.input_ids, tokens.labels) == "Twelve.<|im_end|>SELECT name<|im_end|>"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokens.input_ids.count(im_end) == 5
    assert [t for t, label in zip(tokens.input_ids, tokens.labels) if label == im_end] == [im_end, im_end]
    assert example.reference == "SELECT name"
    assert example.prompt.endswith("Names?<|im_end|>\n<|im_start|>assistant\n")
    assert not tokens.truncated


def test_messages_train_on_inputs_supervises_everything(tmp_path, tiny_model_dir, tokenizer) -> None:
    _, tokens = one(tmp_path, tiny_model_dir, tokenizer, {"messages": SYSTEM_USER_ASSISTANT}, train_on_inputs=True)
    assert tokens.labels == tokens.input_ids
    assert len(tokens.input_ids) > 20


def test_sharegpt_rows_are_read_as_messages(tmp_path, tiny_model_dir, tokenizer) -> None:
    sharegpt = [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "Twelve."}]
    chat = [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": "Twelve."}]
    _, from_sharegpt = one(
        tmp_path, tiny_model_dir, tokenizer, {"conversations": sharegpt}, columns={"messages": "conversations"}
    )
    _, from_chat = one(tmp_path, tiny_model_dir, tokenizer, {"messages": chat})
    assert from_sharegpt.input_ids == from_chat.input_ids and from_sharegpt.labels == from_chat.labels
    assert supervised_text(tokenizer, from_chat.input_ids, from_chat.labels) == "Twelve.<|im_end|>"


def test_recipe_chat_template_replaces_the_tokenizers(tmp_path, tiny_model_dir) -> None:
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n{% else %}A: {{ m['content'] }}"
        "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
    )
    recipe = make(tmp_path, tiny_model_dir, chat_template=template)
    tokenizer = models.load_tokenizer(recipe)
    rows = {"messages": [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": "Twelve."}]}
    tokens = tokenize(to_example(Row(rows, "t:1"), recipe.data, tokenizer), tokenizer, 64)
    # The tokens of the whole rendered text, as an inference server gets them: the BPE merges the template's space
    # with the answer (" Twelve"), and that token is trained, so the prompt ends at "A:" and the model says " Twelve".
    assert tokens.input_ids == tokenizer("Q: How many?\nA: Twelve.</s>", add_special_tokens=False)["input_ids"]
    assert tokens.exact
    assert supervised_text(tokenizer, tokens.input_ids, tokens.labels) == " Twelve.</s>"
    assert tokenizer.decode([t for t, label in zip(tokens.input_ids, tokens.labels) if label == IGNORE_INDEX]) == (
        "Q: How many?\nA:"
    )
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id]


@pytest.mark.parametrize(
    ("row", "user"),
    [
        (
            {"instruction": "Translate to English.", "input": "bonjour", "output": "hello"},
            "Translate to English.\n\nbonjour",
        ),
        ({"instruction": "Say hello.", "output": "hello"}, "Say hello."),
        ({"instruction": "Say hello.", "input": "  ", "output": "hello"}, "Say hello."),
    ],
    ids=["with-input", "without-input", "blank-input"],
)
def test_instruction_format(tmp_path, tiny_model_dir, tokenizer, row, user) -> None:
    example, tokens = one(tmp_path, tiny_model_dir, tokenizer, row, format="instruction")
    ids, labels = expected(
        tokenizer,
        [
            (f"<s><|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", False),
            ("hello<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert (tokens.input_ids, tokens.labels) == (ids, labels)
    assert example.reference == "hello"


def test_instruction_with_system_and_mapped_columns(tmp_path, tiny_model_dir, tokenizer) -> None:
    row = {"task": "Say hello.", "answer": "hello", "persona": "Be brief."}
    _, tokens = one(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        row,
        format="instruction",
        columns={"instruction": "task", "output": "answer", "system": "persona"},
    )
    ids, labels = expected(
        tokenizer,
        [
            (
                "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hello.<|im_end|>\n"
                "<|im_start|>assistant\n",
                False,
            ),
            ("hello<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert (tokens.input_ids, tokens.labels) == (ids, labels)


def test_prompt_completion_masks_bos_and_prompt_and_trains_completion_and_eos(
    tmp_path, tiny_model_dir, tokenizer
) -> None:
    row = {"question": "What is the capital of France?", "answer": " Paris is the capital of France."}
    example, tokens = one(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        row,
        format="prompt_completion",
        columns={"prompt": "question", "completion": "answer"},
    )
    prompt_ids = tokenizer("What is the capital of France?", add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(" Paris is the capital of France.", add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert tokens.input_ids == [bos, *prompt_ids, *completion_ids, eos]
    assert tokens.labels == [IGNORE_INDEX] * (1 + len(prompt_ids)) + completion_ids + [eos]
    assert (example.prompt, example.reference) == ("What is the capital of France?", " Paris is the capital of France.")


def test_prompt_completion_train_on_inputs(tmp_path, tiny_model_dir, tokenizer) -> None:
    _, tokens = one(
        tmp_path,
        tiny_model_dir,
        tokenizer,
        {"prompt": "Q?", "completion": "A."},
        format="prompt_completion",
        train_on_inputs=True,
    )
    assert tokens.labels == [IGNORE_INDEX] + tokens.input_ids[1:]  # BOS is never a target


def test_truncation_keeps_the_prefix_and_flags_it(tmp_path, tiny_model_dir, tokenizer) -> None:
    row = {"prompt": "Q?", "completion": " ".join(CORPUS[:6])}
    _, tokens = one(tmp_path, tiny_model_dir, tokenizer, row, format="prompt_completion", max_length=12)
    _, full = one(tmp_path, tiny_model_dir, tokenizer, row, format="prompt_completion", max_length=4096)
    assert tokens.truncated and not full.truncated
    assert tokens.input_ids == full.input_ids[:12] and tokens.labels == full.labels[:12]


def test_text_documents_become_fully_supervised_windows(tmp_path, tiny_model_dir, tokenizer) -> None:
    document = " ".join(CORPUS[:6])
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(document, encoding="utf-8")
    recipe = make(tmp_path, tiny_model_dir, train="docs", eval="docs/a.txt", format="text", max_length=16)
    prepared = prepare_data(recipe, tokenizer)
    whole = [
        tokenizer.bos_token_id,
        *tokenizer(document, add_special_tokens=False)["input_ids"],
        tokenizer.eos_token_id,
    ]
    windows = prepared.train
    assert len(whole) > 3 * 16  # the document really is split
    assert [len(w.input_ids) for w in windows[:-1]] == [16] * (len(windows) - 1)
    assert [t for w in windows for t in w.input_ids] == whole[: sum(len(w.input_ids) for w in windows)]
    assert len(whole) - sum(len(w.input_ids) for w in windows) <= 1  # only a one-token tail can be dropped
    assert all(w.labels == w.input_ids for w in windows)
    assert not any(w.truncated for w in windows)
    # The same document given as eval is an exact duplicate of the training row: removed and counted.
    assert prepared.stats["eval_duplicates_removed"] == 1 and prepared.eval == []


# ---------------------------------------------------------------------------------------------------------------
# Stop and pad tokens


def test_stop_token_ids_hold_eos_and_the_turn_terminator(tokenizer) -> None:
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_tokenizer_without_pad_gets_an_existing_distinct_token(tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    for pad in (None, "</s>"):  # no pad at all, and pad == eos
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        tokenizer.pad_token = pad
        size = len(tokenizer)
        assert models.ensure_pad_token(tokenizer) is False
        assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id
        assert len(tokenizer) == size


def test_pad_named_added_token_is_reused_before_adding_one(tmp_path: Path) -> None:
    """A GPT-NeoX/Pythia-style vocabulary: no <pad>/<unk>, but a <|padding|> token; pad == eos on arrival."""
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path, pad_token="<|padding|>", unk_token=None)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    tokenizer.pad_token = tokenizer.eos_token
    size = len(tokenizer)
    assert models.ensure_pad_token(tokenizer) is False
    assert tokenizer.pad_token == "<|padding|>" and len(tokenizer) == size


def test_no_spare_token_adds_a_pad_token(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path, pad_token=None, unk_token=None)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.pad_token is None
    assert models.ensure_pad_token(tokenizer) is True
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == 400 and len(tokenizer) == 401
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # EOS labels stay trained.
    data = validate_recipe(
        {"model": {"name_or_path": "./m"}, "data": {"train": "t.jsonl", "format": "prompt_completion"}}
    ).data
    tokens = tokenize(to_example(Row({"prompt": "Q?", "completion": "A."}, "t:1"), data, tokenizer), tokenizer, 64)
    assert tokens.labels[-1] == tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------------------------
# Readers


PC_ROWS = [
    {"prompt": "How many employees?", "completion": "Twelve, with a comma"},
    {"prompt": "Line one\nline two", "completion": 'He said "hi"'},
    {"prompt": "Unicode: caf\u00e9 \u2028 sep", "completion": "x\u0085y"},
]


def write_all_formats(folder: Path, rows: list[dict[str, str]]) -> dict[str, Path]:
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths = {suffix: folder / f"rows.{suffix}" for suffix in ("jsonl", "json", "csv", "parquet")}
    paths["jsonl"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    paths["json"].write_text(json.dumps({"data": rows}, ensure_ascii=False, indent=1), encoding="utf-8")
    with open(paths["csv"], "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    return paths


def test_every_reader_returns_the_same_rows(tmp_path, tiny_model_dir) -> None:
    paths = write_all_formats(tmp_path / "data", PC_ROWS)
    recipe = make(tmp_path, tiny_model_dir, format="prompt_completion")
    rows = {
        suffix: read_rows(DataSource(path=str(path)), recipe.data.format, recipe.base_dir)
        for suffix, path in paths.items()
    }
    for suffix, read in rows.items():
        assert [row.values for row in read] == PC_ROWS, suffix
    assert [row.origin for row in rows["jsonl"]] == [f"{paths['jsonl']}:{n}" for n in (1, 2, 3)]
    assert [row.origin for row in rows["csv"]] == [f"{paths['csv']}:{n}" for n in (2, 3, 5)]  # row 2 spans two lines
    assert [row.origin for row in rows["parquet"]] == [f"{paths['parquet']}#{n}" for n in (0, 1, 2)]


def test_folder_reads_every_data_file_in_order(tmp_path, tiny_model_dir) -> None:
    folder = tmp_path / "folder"
    (folder / "b").mkdir(parents=True)
    write_jsonl(folder / "b" / "second.jsonl", PC_ROWS[1:])
    write_jsonl(folder / "a.jsonl", PC_ROWS[:1])
    (folder / "README.md").write_text("not data")
    recipe = make(tmp_path, tiny_model_dir, train="folder", format="prompt_completion")
    rows = read_rows(recipe.data.train[0], recipe.data.format, recipe.base_dir)
    assert [row.values for row in rows] == PC_ROWS


def test_empty_folder_and_missing_file(tmp_path, tiny_model_dir) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("x")
    recipe = make(tmp_path, tiny_model_dir, train="empty")
    with pytest.raises(DataError) as info:
        read_rows(recipe.data.train[0], recipe.data.format, recipe.base_dir)
    assert str(info.value) == (
        f"{tmp_path / 'empty'}: folder has no .jsonl, .json, .csv, .parquet, .txt files; point data.train at the data"
    )
    recipe = make(tmp_path, tiny_model_dir, train="./missing.jsonl")
    with pytest.raises(DataError) as info:
        read_rows(recipe.data.train[0], recipe.data.format, recipe.base_dir)
    assert str(info.value) == (
        f"./missing.jsonl: data file not found (looked at {tmp_path / 'missing.jsonl'}); "
        "check data.train / data.eval paths"
    )


def test_txt_needs_format_text(tmp_path, tiny_model_dir) -> None:
    (tmp_path / "doc.txt").write_text("hello")
    recipe = make(tmp_path, tiny_model_dir, train="doc.txt")
    with pytest.raises(DataError) as info:
        read_rows(recipe.data.train[0], recipe.data.format, recipe.base_dir)
    assert str(info.value) == (
        f"{tmp_path / 'doc.txt'}: plain-text files need data.format: text (found 'messages'); in a mixture, give the "
        "source format: text"
    )


# ---------------------------------------------------------------------------------------------------------------
# Malformed rows


GOOD = {"messages": [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": "Twelve."}]}


def bad_file(path: Path) -> Path:
    lines = [
        json.dumps(GOOD).encode(),
        b'{"messages": [',  # line 2: bad JSON
        json.dumps({"conversation": GOOD["messages"]}).encode(),  # line 3: missing column
        json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(),  # line 4: wrong type
        b'{"messages": "caf\xe9"}',  # line 5: Latin-1 byte
        json.dumps(GOOD).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def data_error(recipe: Recipe, tokenizer: Any) -> str:
    with pytest.raises(DataError) as info:
        prepare_data(recipe, tokenizer)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_malformed_rows_stop_the_run_with_file_and_line(tmp_path, tiny_model_dir, tokenizer) -> None:
    path = bad_file(tmp_path / "train.jsonl")
    assert data_error(make(tmp_path, tiny_model_dir), tokenizer) == (
        f"{path}:2: invalid JSON (Expecting value at column 15) (and 3 more malformed rows); "
        "fix the rows or set data.on_bad_rows: skip"
    )


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"conversation": []}', "missing column 'messages' (row has ['conversation']); map it with data.columns"),
        (b'{"messages": [{"role": "user", "content": 5}]}', "message 0 content must be text, found int"),
        (
            b'{"messages": [{"role": "robot", "content": "x"}]}',
            "message 0 has role 'robot'; allowed: ['assistant', 'system', 'tool', 'user']",
        ),
        (
            b'{"messages": [{"role": "user", "content": "x"}]}',
            "conversation has no assistant message: nothing to learn from this row",
        ),
        (b'{"messages": "caf\xe9"}', "not valid UTF-8 (byte 17 of the line); re-encode the file as UTF-8"),
        (b'["a list"]', "expected a JSON object per line, found list"),
    ],
    ids=["missing-column", "wrong-type", "unknown-role", "no-assistant", "non-utf8", "not-an-object"],
)
def test_each_kind_of_malformed_row(tmp_path, tiny_model_dir, tokenizer, line, reason) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + line + b"\n")
    assert data_error(make(tmp_path, tiny_model_dir), tokenizer) == (
        f"{path}:2: {reason}; fix the rows or set data.on_bad_rows: skip"
    )


def test_wrong_type_in_a_text_column(tmp_path, tiny_model_dir, tokenizer) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Q?", "completion": ["A."]}])
    assert data_error(make(tmp_path, tiny_model_dir, format="prompt_completion"), tokenizer) == (
        f"{path}:1: column 'completion' must be text, found list; fix the rows or set data.on_bad_rows: skip"
    )


def test_csv_row_with_a_stray_comma(tmp_path, tiny_model_dir, tokenizer) -> None:
    path = tmp_path / "train.csv"
    path.write_text("prompt,completion\nQ?,A.\nQ2?,A, with comma\n", encoding="utf-8")
    assert data_error(make(tmp_path, tiny_model_dir, train="train.csv", format="prompt_completion"), tokenizer) == (
        f"{path}:3: row has 3 fields but the header has 2; quote fields that contain commas; "
        "fix the rows or set data.on_bad_rows: skip"
    )


def test_on_bad_rows_skip_drops_and_counts_them(tmp_path, tiny_model_dir, tokenizer) -> None:
    bad_file(tmp_path / "train.jsonl")
    write_jsonl(
        tmp_path / "eval.jsonl",
        [{"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}],
    )
    prepared = prepare_data(make(tmp_path, tiny_model_dir, eval="eval.jsonl", on_bad_rows="skip"), tokenizer)
    train = prepared.stats["train"]
    assert train["rows"] == 6 and train["kept"] == 2 and train["dropped"] == {"malformed row": 4}
    assert len(prepared.train) == 2 and len(prepared.eval) == 1


def test_non_utf8_csv_names_the_line(tmp_path, tiny_model_dir, tokenizer) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes(b"prompt,completion\nQ?,A.\nQ2?,caf\xe9\n")
    assert data_error(make(tmp_path, tiny_model_dir, train="train.csv", format="prompt_completion"), tokenizer) == (
        f"{path}:3: not valid UTF-8 (byte offset 31); re-encode the file as UTF-8"
    )


def test_invalid_json_file_names_the_line(tmp_path, tiny_model_dir, tokenizer) -> None:
    path = tmp_path / "train.json"
    path.write_text('[\n  {"prompt": "Q?", "completion": "A."},\n  {"prompt": \n]\n', encoding="utf-8")
    assert data_error(make(tmp_path, tiny_model_dir, train="train.json", format="prompt_completion"), tokenizer) == (
        f"{path}:4: invalid JSON (Expecting value); fix the file or convert it to JSONL"
    )


# ---------------------------------------------------------------------------------------------------------------
# Splits, duplicates and run-ruining data


def chat(question: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_exact_train_eval_duplicates_are_removed_from_eval_and_counted(tmp_path, tiny_model_dir, tokenizer) -> None:
    train = [chat(f"Question {i}?", f"Answer {i}.") for i in range(6)]
    evaluation = [train[1], chat("New question?", "New answer."), train[4], chat("Question 1?", "Different answer.")]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "eval.jsonl", evaluation)
    prepared = prepare_data(make(tmp_path, tiny_model_dir, eval="eval.jsonl"), tokenizer)
    assert prepared.stats["eval_duplicates_removed"] == 2
    assert prepared.stats["eval"]["dropped"] == {"exact duplicate of a training row": 2}
    assert [e.reference for e in prepared.eval_examples] == ["New answer.", "Different answer."]
    assert len(prepared.eval) == 2 and len(prepared.train) == 6


def test_seeded_split_is_reproducible_and_disjoint(tmp_path, tiny_model_dir, tokenizer) -> None:
    write_jsonl(tmp_path / "train.jsonl", [chat(f"Question {i}?", f"Answer {i}.") for i in range(20)])
    recipe = make(tmp_path, tiny_model_dir, eval_fraction=0.25)
    first, second = prepare_data(recipe, tokenizer), prepare_data(recipe, tokenizer)
    assert [t.origin for t in first.eval] == [t.origin for t in second.eval]
    assert len(first.eval) == 5 and len(first.train) == 15
    assert not {t.origin for t in first.eval} & {t.origin for t in first.train}
    assert first.stats["train"]["rows"] == 15 and first.stats["eval"]["rows"] == 5
    other = prepare_data(
        validate_recipe({**recipe.model_dump(), "train": {"seed": 1}, "source_path": recipe.source_path}), tokenizer
    )
    assert [t.origin for t in other.eval] != [t.origin for t in first.eval]


def test_statistics(tmp_path, tiny_model_dir, tokenizer) -> None:
    write_jsonl(tmp_path / "train.jsonl", [chat("How many?", "Twelve.")] * 4)
    write_jsonl(tmp_path / "eval.jsonl", [chat("Names?", "SELECT name")])
    prepared = prepare_data(make(tmp_path, tiny_model_dir, eval="eval.jsonl"), tokenizer)
    _, one_row = one(tmp_path, tiny_model_dir, tokenizer, chat("How many?", "Twelve."))
    train = prepared.stats["train"]
    assert train["total_tokens"] == 4 * len(one_row.input_ids)
    assert train["supervised_tokens"] == 4 * one_row.supervised_tokens
    assert train["supervised_token_fraction"] == one_row.supervised_tokens / len(one_row.input_ids)
    assert train["token_length_percentiles"]["p50"] == len(one_row.input_ids)
    assert train["eos_supervised_fraction"] == 1.0 and train["truncation_rate"] == 0.0


def test_every_row_truncated_is_refused(tmp_path, tiny_model_dir, tokenizer) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Q?", "completion": " ".join(CORPUS[:4])}] * 3)
    recipe = make(tmp_path, tiny_model_dir, format="prompt_completion", max_length=10, eval_fraction=0.3)
    assert data_error(recipe, tokenizer) == (
        "train.jsonl: every row is longer than data.max_length=10 and was truncated; raise data.max_length"
    )


def test_rows_with_nothing_supervised_after_truncation_are_refused(tmp_path, tiny_model_dir, tokenizer) -> None:
    write_jsonl(tmp_path / "train.jsonl", [chat(" ".join(CORPUS[:4]), "A.")] * 3)
    recipe = make(tmp_path, tiny_model_dir, max_length=12, eval_fraction=0.3)
    assert data_error(recipe, tokenizer) == (
        "train.jsonl: no usable training rows (2 no supervised tokens left after truncation to max_length); "
        "check data.format, data.columns, max_length"
    )


def test_empty_training_file_is_refused(tmp_path, tiny_model_dir, tokenizer) -> None:
    (tmp_path / "train.jsonl").write_text("\n\n")
    write_jsonl(tmp_path / "eval.jsonl", [chat("Q?", "A.")])
    assert data_error(make(tmp_path, tiny_model_dir, eval="eval.jsonl"), tokenizer) == (
        "train.jsonl: the training data is empty; point data.train at rows in format 'messages'"
    )
