"""Every built-in row format and source kind on real rows from the packaged test data; mixing, weights, eval split."""

import json
import textwrap

import datasets
import numpy as np
import pytest
from ftcore.data import load_rows, prepare_sft_data
from ftcore.data.formats import Synthetic
from ftcore.data.testing import data_config, stories_tokenizer
from ftcore.errors import DataError
from ftcore.testing import asset

ALPACA = str(asset("data/instructions/instructions_2000.jsonl"))
OASST = str(asset("data/oasst1_chat/oasst_en_threads.jsonl"))
GSM8K = str(asset("data/gsm8k/train_first300.jsonl"))
HH_RLHF = str(asset("data/hh_rlhf_harmless/harmless_base_test_subset.jsonl"))


def read_jsonl(path, count=None):
    with open(path, encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines]
    return rows[:count]


def rows_of(tmp_path, datasets_, schemas, **data):
    config, plugins = data_config(tmp_path, datasets_, data={"shuffle": False, **data})
    return load_rows(config, plugins, schemas)


def test_alpaca_rows_become_chats(tmp_path):
    train, evaluation = rows_of(
        tmp_path, [{"path": ALPACA, "format": "alpaca", "split": "train[:200]"}], ("messages",)
    )
    assert evaluation is None and len(train) == 200
    for raw, row in zip(read_jsonl(ALPACA, 200), train, strict=True):
        prompt = raw["instruction"] + (f"\n\n{raw['input']}" if raw["input"] else "")
        assert row["messages"] == [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": raw["output"]},
        ]
        assert row["tools"] is None


def test_messages_and_sharegpt_give_the_same_chats(tmp_path):
    threads = read_jsonl(OASST)
    sharegpt = tmp_path / "sharegpt.jsonl"
    names = {"user": "human", "assistant": "gpt"}
    sharegpt.write_text("".join(
        json.dumps({"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in t["messages"]]}) + "\n" for t in threads
    ))  # fmt: skip
    from_messages, _ = rows_of(tmp_path, [{"path": OASST, "format": "messages"}], ("messages",))
    from_sharegpt, _ = rows_of(tmp_path, [{"path": str(sharegpt), "format": "sharegpt"}], ("messages",))
    assert from_messages["messages"] == from_sharegpt["messages"] == [t["messages"] for t in threads]


def test_prompt_completion_with_a_field_mapping(tmp_path):
    source = {
        "path": GSM8K,
        "format": "prompt_completion",
        "fields": {"prompt": "question", "completion": "answer"},
        "split": "train[:100]",
    }
    train, _ = rows_of(tmp_path, [source], ("prompt_completion",))
    assert [(r["prompt"], r["completion"]) for r in train] == [
        (r["question"], r["answer"]) for r in read_jsonl(GSM8K, 100)
    ]


def test_prompt_rows_keep_their_reward_columns_for_online_rl(tmp_path):
    source = {
        "path": GSM8K,
        "format": "prompt",
        "fields": {"prompt": "question", "solution": "answer"},
        "options": {"columns": ["solution"]},
        "split": "train[:50]",
    }
    train, _ = rows_of(tmp_path, [source], ("prompt_only",))
    assert train.column_names == ["prompt", "solution"]
    assert [(r["prompt"], r["solution"]) for r in train] == [
        (r["question"], r["answer"]) for r in read_jsonl(GSM8K, 50)
    ]
    chats = tmp_path / "chats.jsonl"
    system = {"role": "system", "content": "Answer with a number."}
    lines = [{"prompt": [system, {"role": "user", "content": q["question"]}], "answer": q["answer"][-3:]}
             for q in read_jsonl(GSM8K, 3)]  # fmt: skip
    chats.write_text("".join(json.dumps(line) + "\n" for line in lines))
    train, _ = rows_of(
        tmp_path,
        [{"path": str(chats), "format": "prompt", "options": {"columns": ["answer"]}}],
        ("prompt_only",),
    )
    assert train["prompt"] == [line["prompt"] for line in lines] and train["answer"] == [
        line["answer"] for line in lines
    ]


def test_bad_prompt_rows_name_the_file_and_row(tmp_path):
    answered = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]
    cases = {
        "answered": ([{"prompt": [{"role": "user", "content": "1 + 1?"}]}, {"prompt": answered}],
                     r"answered\.jsonl, row 2: the chat prompt ends with an assistant message"),
        "mixed": ([{"prompt": "1 + 1?"}, {"prompt": [{"role": "user", "content": "2 + 2?"}]}],
                  r"mixed\.jsonl, row 2: prompt is chat, but earlier rows hold text prompts"),
    }  # fmt: skip
    for name, (rows, message) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        with pytest.raises(DataError, match=message):
            rows_of(tmp_path, [{"path": str(path), "format": "prompt"}], ("prompt_only",))
    with pytest.raises(DataError, match=r"no column 'score', which format 'prompt' reads as 'score'"):
        rows_of(tmp_path, [{"path": GSM8K, "format": "prompt", "fields": {"prompt": "question"},
                            "options": {"columns": ["score"]}}], ("prompt_only",))  # fmt: skip


def test_completion_splits_long_texts_into_windows(tmp_path):
    tokenizer = stories_tokenizer()
    source = {"path": GSM8K, "format": "completion", "fields": {"text": "answer"}, "split": "train[:20]"}
    config, plugins = data_config(tmp_path, [source], data={"shuffle": False}, sequence_len=64)
    bundle = prepare_sft_data(config, plugins, tokenizer)
    documents = [
        tokenizer(r["answer"])["input_ids"] + [tokenizer.eos_token_id] for r in read_jsonl(GSM8K, 20)
    ]
    windows = [doc[i : i + 64] for doc in documents for i in range(0, len(doc), 64)]
    assert bundle.train["input_ids"] == [
        w for w in windows if len(w) > 1
    ]  # a 1-token window has nothing to predict
    assert bundle.stats["untrained"] == sum(len(w) == 1 for w in windows) and max(map(len, windows)) == 64
    for ids, labels in zip(bundle.train["input_ids"], bundle.train["labels"], strict=True):
        assert labels == [-100] + ids[1:]  # every token trained but the first of each window


def test_pretokenized_rows_pass_through(tmp_path):
    tokenizer = stories_tokenizer()
    questions = [r["question"] for r in read_jsonl(GSM8K, 30)]
    ids = [tokenizer(q)["input_ids"] for q in questions]
    labels = [[-100] * 5 + row[5:] for row in ids]
    datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}).to_parquet(
        str(tmp_path / "tokens.parquet")
    )
    config, plugins = data_config(
        tmp_path,
        [{"path": str(tmp_path / "tokens.parquet"), "format": "pretokenized"}],
        data={"shuffle": False},
    )
    bundle = prepare_sft_data(config, plugins, tokenizer)
    assert bundle.train["input_ids"] == ids
    assert bundle.train["labels"] == labels


def test_synthetic_rows_are_deterministic_and_learnable():
    rows = Synthetic(
        {"rows": 200, "min_words": 3, "max_words": 9, "lengths": "lognormal", "seed": 7}
    ).generate()
    assert (
        rows
        == Synthetic(
            {"rows": 200, "min_words": 3, "max_words": 9, "lengths": "lognormal", "seed": 7}
        ).generate()
    )
    lengths = [len(r["prompt"].split()) - 1 for r in rows]
    assert min(lengths) >= 3 and max(lengths) <= 9 and len(set(lengths)) > 3
    for row in rows:
        assert row["completion"].split() == row["prompt"].split()[1:][::-1]


def test_synthetic_needs_no_path_and_packs(tmp_path):
    config, plugins = data_config(
        tmp_path, [{"format": "synthetic", "options": {"rows": 300}}], sequence_len=256, packing=True
    )
    bundle = prepare_sft_data(config, plugins, stories_tokenizer())
    assert bundle.stats["sequences"] == 300 and bundle.stats["packing_efficiency"] > 0.9


def test_sources_folder_csv_parquet_and_saved_dataset(tmp_path):
    rows = read_jsonl(ALPACA, 30)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    datasets.Dataset.from_list(rows[10:20]).to_parquet(str(folder / "b.parquet"))
    datasets.Dataset.from_list(rows[20:]).to_csv(str(tmp_path / "c.csv"))
    datasets.Dataset.from_list(rows[:5]).save_to_disk(str(tmp_path / "saved"))
    sources = [{"path": str(p), "format": "alpaca"} for p in (folder, tmp_path / "c.csv", tmp_path / "saved")]
    train, _ = rows_of(tmp_path, sources, ("messages",))
    outputs = [m[1]["content"] for m in train["messages"]]
    assert outputs == [r["output"] for r in rows + rows[:5]]


def test_weights_val_fraction_and_shuffle(tmp_path):
    sources = [
        {"path": ALPACA, "format": "alpaca", "split": "train[:100]", "weight": 2},
        {"path": OASST, "format": "messages", "weight": 0.5},
    ]
    config, plugins = data_config(tmp_path, sources, data={"val_fraction": 0.1})
    train, evaluation = load_rows(config, plugins, ("messages",))
    # 90 alpaca rows twice + half of 85 oasst rows; the eval rows are held out before weighting
    assert len(evaluation) == 10 + 10 and len(train) == 180 + 42
    held_out = {json.dumps(m) for m in evaluation["messages"]}
    assert not held_out & {json.dumps(m) for m in train["messages"]}
    again, _ = load_rows(config, plugins, ("messages",))
    assert again["messages"] == train["messages"]  # shuffled with train.seed: the same order every time
    in_order, _ = rows_of(tmp_path, sources, ("messages",), val_fraction=0.1)
    assert in_order["messages"] != train["messages"]
    assert sorted(map(json.dumps, in_order["messages"])) == sorted(map(json.dumps, train["messages"]))


PREFERENCE_PLUGIN = textwrap.dedent("""
    from ftcore.data.formats import RowFormat
    from ftcore.hookspecs import hookimpl


    class HHRLHF(RowFormat):
        schema = "preference"
        fields = ("chosen", "rejected")

        def convert(self, row):
            cut = row["chosen"].rfind("\\n\\nAssistant:") + len("\\n\\nAssistant:")
            if not row["rejected"].startswith(row["chosen"][:cut]):
                raise ValueError("chosen and rejected do not share the prompt")
            return {"prompt": row["chosen"][:cut], "chosen": row["chosen"][cut:], "rejected": row["rejected"][cut:]}


    @hookimpl
    def register_formats(register):
        register("hh_rlhf_test", HHRLHF)
""")


def test_an_external_preference_format_through_load_rows(tmp_path, monkeypatch):
    (tmp_path / "hh_plugin").mkdir()
    (tmp_path / "hh_plugin" / "__init__.py").write_text("")
    (tmp_path / "hh_plugin" / "formats.py").write_text(PREFERENCE_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    from ftcore.config import validate_config

    raw = {
        "plugins": ["hh_plugin.formats"],
        "model": {"base": str(tmp_path)},
        "datasets": [{"path": HH_RLHF, "format": "hh_rlhf_test", "on_bad_rows": "skip"}],
        "data": {"shuffle": False},
        "train": {"output_dir": str(tmp_path / "out")},
    }
    config, plugins = validate_config(raw)
    train, _ = load_rows(config, plugins, ("preference",))
    assert len(train) == 600  # the 3 pairs whose rejected text does not start with the prompt are skipped
    first = read_jsonl(HH_RLHF, 1)[0]
    assert train[0]["prompt"] + train[0]["chosen"] == first["chosen"]
    assert train[0]["prompt"].endswith("\n\nAssistant:") and np.all(
        [p.startswith("\n\nHuman:") for p in train["prompt"]]
    )


SPLIT_PLUGIN = textwrap.dedent("""
    from ftcore.data.formats import RowFormat
    from ftcore.hookspecs import hookimpl


    class Lines(RowFormat):
        schema = "text"
        fields = ("text",)

        def convert(self, row):
            return [{"text": line} for line in row["text"].split("|") if line]


    @hookimpl
    def register_formats(register):
        register("lines_test", Lines)
""")


def test_a_format_may_make_several_rows_of_one(tmp_path, monkeypatch):
    """``convert`` returning a list: each item is a row; a row giving none is a bad row (skipped, counted)."""
    (tmp_path / "lines_plugin").mkdir()
    (tmp_path / "lines_plugin" / "__init__.py").write_text("")
    (tmp_path / "lines_plugin" / "formats.py").write_text(SPLIT_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    from ftcore.config import validate_config
    from ftcore.data.prepare import dataset_specs
    from ftcore.data.sources import read_dataset

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a|b|c", "|", "d"]))
    raw = {
        "plugins": ["lines_plugin.formats"],
        "model": {"base": str(tmp_path)},
        "datasets": [{"path": str(path), "format": "lines_test", "on_bad_rows": "skip"}],
        "data": {"shuffle": False},
        "train": {"output_dir": str(tmp_path / "out")},
    }
    config, plugins = validate_config(raw)
    train, _ = load_rows(config, plugins, ("text",))
    assert train["text"] == ["a", "b", "c", "d"]
    (part,) = read_dataset(dataset_specs(config, plugins, ("text",))[0])
    assert part.skipped == 1 and part.rows["_row"] == [1, 1, 1, 3]  # the record each row came from
