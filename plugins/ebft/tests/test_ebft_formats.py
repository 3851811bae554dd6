"""The ebft row formats, on their own and through the registry and loader (real oasst1 threads, gsm8k)."""

import json

import pytest
from ftcore.config import validate_config
from ftcore.data import load_rows
from ftcore.errors import DataError
from ftcore.testing import asset
from ftcore_ebft.formats import Chat, OpenCode, Reasoning, Strided

THREAD = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": [{"type": "text", "text": "Blue"}, {"type": "text", "text": "."}]},
]


def test_opencode_makes_a_prompt_and_its_ground_truth():
    assert OpenCode().convert({"input": "def f():", "output": "    return 1"}) == {
        "prompt": "def f():",
        "ground_truth": "    return 1",
    }
    chat = OpenCode({"chat": True}).convert({"input": "q", "output": "a"})
    assert chat["prompt"] == [{"role": "user", "content": "q"}]
    with pytest.raises(ValueError, match="output must be a non-empty string"):
        OpenCode().convert({"input": "q", "output": ""})


def test_chat_targets_the_first_or_the_last_assistant_turn():
    last = Chat().convert({"messages": THREAD})
    assert [m["role"] for m in last["prompt"]] == ["system", "user", "assistant", "user"]
    assert last["ground_truth"] == "Blue."
    first = Chat({"target": "first"}).convert({"messages": THREAD})
    assert [m["role"] for m in first["prompt"]] == ["system", "user"] and first["ground_truth"] == "Hello!"
    with pytest.raises(ValueError, match="no assistant turn"):
        Chat().convert({"messages": THREAD[:2]})
    with pytest.raises(ValueError, match="no messages before it"):
        Chat().convert({"messages": THREAD[2:3]})


def test_chat_makes_one_row_per_assistant_turn_with_target_every():
    rows = Chat({"target": "every"}).convert({"messages": THREAD})
    assert rows == [
        {"prompt": THREAD[:2], "ground_truth": "Hello!"},
        {"prompt": THREAD[:4], "ground_truth": "Blue."},
    ]
    opening = [{"role": "assistant", "content": "Hi!"}, *THREAD[1:3]]  # a greeting with no prompt is no row
    assert Chat({"target": "every"}).convert({"messages": opening}) == [
        {"prompt": opening[:2], "ground_truth": "Hello!"}
    ]
    with pytest.raises(ValueError, match="no messages before it"):
        Chat({"target": "every"}).convert({"messages": THREAD[2:3]})


def test_chat_multi_turn_keeps_the_later_turns():
    thread = [*THREAD, {"role": "user", "content": "Thanks"}]  # nothing to generate after the last answer
    row = Chat({"target": "first", "multi_turn": True}).convert({"messages": thread})
    assert row == {
        "prompt": THREAD[:2],
        "ground_truth": "Hello!",
        "remaining_turns": [
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Blue."},
        ],
    }
    one = Chat({"target": "first", "multi_turn": True}).convert({"messages": THREAD[:3]})
    assert one["remaining_turns"] == []
    with pytest.raises(ValueError, match='set target = "first"'):
        Chat({"multi_turn": True})


def test_reasoning_keeps_one_think_trace_in_the_ground_truth():
    joined = Reasoning().convert({"prompt": "2+2?", "response": "4", "thinking": " two and two "})
    assert joined == {"prompt": "2+2?", "ground_truth": "<think>\ntwo and two\n</think>\n\n4"}
    inline = Reasoning().convert({"prompt": "q", "response": "<think>hm</think> a"})
    assert inline["ground_truth"] == "<think>hm</think> a"
    for bad, words in [
        ({"prompt": "q", "response": "a"}, "one <think>...</think> trace"),
        ({"prompt": "q", "response": "</think>x<think>"}, "comes before"),
        ({"prompt": "q", "response": "<think>x</think>a", "thinking": "y"}, "give one"),
    ]:
        with pytest.raises(ValueError, match=words):
            Reasoning().convert(bad)


def test_strided_takes_text_input_output_or_messages():
    assert Strided().convert({"text": "Once."}) == {"prompt": "", "completion": "Once."}
    assert Strided().convert({"input": "Q", "output": "A"}) == {"prompt": "Q", "completion": "A"}
    assert Strided().convert({"messages": THREAD[1:3]}) == {
        "prompt": "user: Hi\nassistant:",
        "completion": " Hello!",
    }
    with pytest.raises(ValueError, match="end with an assistant turn"):
        Strided().convert({"messages": THREAD[:2]})
    with pytest.raises(ValueError, match="needs text, messages, or input and output"):
        Strided().convert({"other": 1})


def load(tmp_path, dataset, mode="structured"):
    raw = {
        "plugins": ["grpo", "ebft"] if mode == "structured" else ["ebft"],
        "model": {"base": "m"},
        "datasets": [dataset],
        "data": {"cache_dir": str(tmp_path / "cache"), "shuffle": False},
        "train": {"method": "ebft", "output_dir": str(tmp_path / "out"), "micro_batch_size": 8},
        "grpo": {"max_completion_length": 64},
        "ebft": {"mode": mode},
    }
    if mode == "strided":
        del raw["grpo"]
    config, plugins = validate_config(raw)
    return load_rows(config, plugins, ("prompt_only",) if mode == "structured" else ("prompt_completion",))[0]


def test_real_chat_threads_load_through_the_registry(tmp_path):
    path = str(asset("data/oasst1_chat/oasst_en_threads.jsonl"))
    rows = load(tmp_path, {"path": path, "format": "ebft_chat", "options": {"target": "first"}})
    threads = [json.loads(line) for line in open(path)]
    assert len(rows) == len(threads)
    first_answer = next(m["content"] for m in threads[0]["messages"] if m["role"] == "assistant")
    assert rows[0]["ground_truth"] == first_answer and rows[0]["prompt"][-1]["role"] == "user"


def test_every_assistant_turn_of_real_threads_is_a_row(tmp_path):
    path = str(asset("data/oasst1_chat/oasst_en_threads.jsonl"))
    rows = load(tmp_path, {"path": path, "format": "ebft_chat", "options": {"target": "every"}})
    threads = [json.loads(line)["messages"] for line in open(path)]
    answers = [m["content"] for t in threads for i, m in enumerate(t) if m["role"] == "assistant" and i]
    assert rows["ground_truth"] == answers and len(answers) > len(threads)
    assert all(row["prompt"][-1]["role"] != "assistant" for row in rows)


def test_gsm8k_rows_map_to_opencode_and_strided(tmp_path):
    path = str(asset("data/gsm8k/train_first300.jsonl"))
    fields = {"input": "question", "output": "answer"}
    rows = load(tmp_path, {"path": path, "format": "ebft_opencode", "fields": fields, "split": "train[:5]"})
    assert rows[0]["prompt"].startswith("Natalia sold clips") and "#### 72" in rows[0]["ground_truth"]
    docs = load(
        tmp_path, {"path": path, "format": "ebft_strided", "fields": fields, "split": "train[:5]"}, "strided"
    )
    assert docs[0]["prompt"].startswith("Natalia") and docs[0]["completion"].endswith("72")


def test_a_bad_row_is_an_error_naming_the_file_and_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"input": "a", "output": "b"}) + "\n" + json.dumps({"input": "a", "output": 3}) + "\n"
    )
    with pytest.raises(DataError) as info:
        load(tmp_path, {"path": str(path), "format": "ebft_opencode"})
    assert "bad.jsonl" in str(info.value) and "row 2" in str(info.value) and "output" in str(info.value)
