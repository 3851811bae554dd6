"""Bad input gets a clear error naming the file, row or key (or is skipped and counted with on_bad_rows)."""

import json

import pytest
from ftcore.data import load_rows, prepare_sft_data
from ftcore.data.testing import data_config, stories_tokenizer
from ftcore.errors import ConfigError, DataError
from ftcore.testing import asset

ALPACA = asset("data/instructions/instructions_2000.jsonl")
CHATML = (
    "{% for m in messages %}{% if loop.index0 > 0 and m.role == messages[loop.index0 - 1].role %}"
    "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def alpaca_lines(count):
    with open(ALPACA, encoding="utf-8") as lines:
        return [next(lines).rstrip("\n") for _ in range(count)]


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def prepare(tmp_path, source, tokenizer=None, **train):
    config, plugins = data_config(tmp_path, [source], **train)
    return prepare_sft_data(config, plugins, tokenizer or stories_tokenizer(CHATML))


def test_malformed_line_names_file_and_line_or_is_skipped(tmp_path):
    lines = alpaca_lines(5)
    lines.insert(3, "")  # a blank line: rows are still named by their line
    lines[4] = lines[4][:-2]
    path = write(tmp_path / "broken.jsonl", lines)
    with pytest.raises(DataError, match=r"broken\.jsonl, row 5: malformed JSON .*on_bad_rows = \"skip\""):
        prepare(tmp_path, {"path": path, "format": "alpaca"})
    bundle = prepare(tmp_path, {"path": path, "format": "alpaca", "on_bad_rows": "skip"})
    assert bundle.stats["skipped"] == 1 and bundle.stats["sequences"] == 4


def test_missing_value_unknown_role_and_template_errors_name_the_row(tmp_path):
    rows = [json.loads(line) for line in alpaca_lines(4)]
    rows[2]["output"] = None
    path = write(tmp_path / "rows.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(DataError, match=r"rows\.jsonl, row 3: missing value for 'output'"):
        prepare(tmp_path, {"path": path, "format": "alpaca"})
    chats = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistent", "content": "Hello"}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Hello"},
        ],
    ]
    path = write(tmp_path / "chats.jsonl", [json.dumps({"messages": m}) for m in chats])
    with pytest.raises(
        DataError,
        match=r"chats\.jsonl, row 2: message 1: unknown role 'assistent' \(did you mean \"assistant\"\?\)",
    ):
        prepare(tmp_path, {"path": path})
    chats[1][1]["role"] = "assistant"
    write(tmp_path / "chats.jsonl", [json.dumps({"messages": m}) for m in chats])
    with pytest.raises(
        DataError, match=r"chats\.jsonl, row 3: the chat template cannot render .*roles must alternate"
    ):
        prepare(tmp_path, {"path": path})
    bundle = prepare(tmp_path, {"path": path, "on_bad_rows": "skip"})
    assert bundle.stats["skipped"] == 1 and bundle.stats["sequences"] == 2


def test_missing_column_suggests_a_field_mapping(tmp_path):
    path = write(tmp_path / "qa.jsonl", [json.dumps({"question": "Why?", "answer": "Because."})])
    with pytest.raises(
        DataError, match=r"no column 'prompt'.*columns: question, answer.*fields\.prompt = \"COLUMN\""
    ):
        prepare(tmp_path, {"path": path, "format": "prompt_completion"})
    bundle = prepare(
        tmp_path,
        {
            "path": path,
            "format": "prompt_completion",
            "fields": {"prompt": "question", "completion": "answer"},
        },
    )
    assert bundle.stats["sequences"] == 1


def test_empty_files_raise_or_are_skipped(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a_empty.jsonl").write_text("\n")
    write(folder / "b.jsonl", alpaca_lines(3))
    with pytest.raises(DataError, match=r"a_empty\.jsonl: the file is empty"):
        prepare(tmp_path, {"path": str(folder), "format": "alpaca"})
    assert (
        prepare(tmp_path, {"path": str(folder), "format": "alpaca", "on_bad_rows": "skip"}).stats["sequences"]
        == 3
    )
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file or folder"):
        prepare(tmp_path, {"path": str(tmp_path / "missing.jsonl"), "format": "alpaca"})


def test_excess_length(tmp_path):
    path = write(tmp_path / "rows.jsonl", alpaca_lines(20))
    tokenizer = stories_tokenizer(CHATML, ("<|im_start|>", "<|im_end|>"))
    with pytest.raises(
        DataError, match=r"rows\.jsonl, row \d+: \d+ tokens, more than train\.sequence_len = 128"
    ):
        prepare(
            tmp_path,
            {"path": path, "format": "alpaca", "excess_length": "raise"},
            tokenizer,
            sequence_len=128,
        )
    dropped = prepare(tmp_path, {"path": path, "format": "alpaca"}, tokenizer, sequence_len=128)
    truncated = prepare(
        tmp_path, {"path": path, "format": "alpaca", "excess_length": "truncate"}, tokenizer, sequence_len=128
    )
    # rows cut before their answer keep no trained token: they are dropped and counted too
    assert dropped.stats["dropped"] == truncated.stats["truncated"] + truncated.stats["untrained"] == 5
    assert dropped.stats["sequences"] == 15 and truncated.stats["sequences"] == 18
    assert max(map(len, truncated.train["input_ids"])) == 128


def test_config_errors_before_reading_data(tmp_path):
    tokenizer = stories_tokenizer(CHATML)
    path = write(tmp_path / "rows.jsonl", alpaca_lines(2))
    with pytest.raises(
        ConfigError, match=r'datasets\.0\.format: unknown format "alpacca" \(did you mean "alpaca"\?\)'
    ):
        prepare(tmp_path, {"path": path, "format": "alpacca"}, tokenizer)
    with pytest.raises(
        ConfigError,
        match=r"datasets\.0\.options: unknown option 'sepparator' \(did you mean \"separator\"\?\)",
    ):
        prepare(tmp_path, {"path": path, "format": "alpaca", "options": {"sepparator": " "}}, tokenizer)
    with pytest.raises(
        ConfigError, match=r"datasets\.0\.fields\.instructions: .* \(did you mean \"instruction\"\?\)"
    ):
        prepare(tmp_path, {"path": path, "format": "alpaca", "fields": {"instructions": "q"}}, tokenizer)
    with pytest.raises(ConfigError, match=r"datasets\.0\.excess_length: .*split"):
        prepare(tmp_path, {"path": path, "format": "alpaca", "excess_length": "split"}, tokenizer)
    with pytest.raises(ConfigError, match=r"model\.chat_template: the tokenizer has no chat template"):
        prepare(tmp_path, {"path": path, "format": "alpaca"}, stories_tokenizer())
    config, plugins = data_config(tmp_path, [{"path": path, "format": "alpaca"}])
    with pytest.raises(
        ConfigError, match=r"datasets\.0\.format: format 'alpaca' produces 'messages' rows.*takes preference"
    ):
        load_rows(config, plugins, ("preference",))


def test_a_wrongly_typed_value_is_the_bad_row_even_in_a_worker_process(tmp_path):
    lines = alpaca_lines(2000) * 2
    lines[3500] = json.dumps({"instruction": "Say hi", "input": "", "output": 42})
    path = write(tmp_path / "big.jsonl", lines)
    with pytest.raises(DataError, match=r"big\.jsonl, row 3501: output must be a string, got int"):
        prepare(tmp_path, {"path": path, "format": "alpaca"}, data={"num_proc": 2})
    # the other rows keep their exact values, including strings that are valid JSON ("92", row 31)
    train, _ = load_rows(
        *data_config(
            tmp_path, [{"path": path, "format": "alpaca", "on_bad_rows": "skip"}], data={"shuffle": False}
        ),
        ("messages",),
    )
    assert len(train) == 3999 and train[30]["messages"][1]["content"] == "92"
