"""Loss masking on real chat templates (a Qwen-style and a Llama-3-style one written here) and real rows."""

import json

import pytest
from ftcore.data import prepare_sft_data
from ftcore.data.testing import data_config, stories_tokenizer
from ftcore.testing import asset

# Qwen3-style ChatML: tools in the system turn, reasoning in <think>, tool calls and tool responses.
QWEN_STYLE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}
{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- if message.reasoning_content %}{{- '<think>\\n' + message.reasoning_content.strip() + '\\n</think>\\n\\n' }}{%- endif %}
{%- if message.content %}{{- message.content }}{%- endif %}
{%- for call in message.tool_calls or [] %}{{- '<tool_call>\\n' + (call.function | tojson) + '\\n</tool_call>' }}{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
QWEN_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>")

LLAMA3_STYLE = """\
{{- bos_token }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""
LLAMA3_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# The same ChatML with the assistant text in {% generation %} blocks: masked from the tracked blocks.
CHATML_GENERATION = """\
{%- for message in messages %}
{{- '<|im_start|>' + message.role + '\\n' }}
{%- if message.role == 'assistant' %}{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}
{%- else %}{{- message.content + '<|im_end|>\\n' }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


def oasst_threads():
    with open(asset("data/oasst1_chat/oasst_en_threads.jsonl"), encoding="utf-8") as lines:
        return [json.loads(line)["messages"] for line in lines]


def prepare(tmp_path, rows, tokenizer, **data):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    config, plugins = data_config(
        tmp_path, [{"path": str(path)}], data={"shuffle": False, **data}, sequence_len=8192
    )
    return prepare_sft_data(config, plugins, tokenizer)


def trained_runs(tokenizer, text, labels):
    """The trained text of a rendered conversation, as contiguous runs (through the tokenizer's offsets)."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    runs, current, last_end = [], "", None
    for (start, end), label in zip(encoding["offset_mapping"], labels, strict=True):
        if label == -100:
            continue
        if current and start > last_end:
            runs.append(current)
            current = ""
        current += text[
            max(start, last_end or 0) : end
        ]  # byte-fallback tokens of one character share offsets
        last_end = max(end, last_end or 0)
    return runs + ([current] if current else [])


@pytest.mark.parametrize(
    ("template", "tokens", "turn_end", "trim"),
    [(QWEN_STYLE, QWEN_TOKENS, "<|im_end|>\n", False), (LLAMA3_STYLE, LLAMA3_TOKENS, "<|eot_id|>", True)],
    ids=["qwen-style", "llama3-style"],
)
def test_oasst_threads_train_exactly_the_assistant_turns(tmp_path, template, tokens, turn_end, trim):
    tokenizer = stories_tokenizer(template, tokens)
    threads = oasst_threads()
    bundle = prepare(tmp_path, threads, tokenizer)
    assert len(bundle.train) == len(threads) == bundle.stats["sequences"]
    for messages, row in zip(threads, bundle.train, strict=True):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert row["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
        expected = [
            (m["content"].strip() if trim else m["content"]) + turn_end
            for m in messages
            if m["role"] == "assistant"
        ]
        assert trained_runs(tokenizer, text, row["labels"]) == expected


def test_generation_blocks_mark_the_assistant_text(tmp_path):
    tokenizer = stories_tokenizer(CHATML_GENERATION, QWEN_TOKENS)
    threads = oasst_threads()[:20]
    bundle = prepare(tmp_path, threads, tokenizer)
    for messages, row in zip(threads, bundle.train, strict=True):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        expected = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert trained_runs(tokenizer, text, row["labels"]) == expected


def test_train_on_roles_and_per_message_flags(tmp_path):
    tokenizer = stories_tokenizer(QWEN_STYLE, QWEN_TOKENS)
    thread = next(t for t in oasst_threads() if len(t) == 4)
    flagged = [dict(thread[0]), {**thread[1], "train": False}, {**thread[2], "train": True}, dict(thread[3])]
    bundle = prepare(tmp_path, [thread, flagged], tokenizer, train_on=["user", "assistant"])
    text = tokenizer.apply_chat_template(thread, tokenize=False)
    turns = [f"<|im_start|>user\n{thread[0]['content']}<|im_end|>\n", thread[1]["content"] + "<|im_end|>\n",
             f"<|im_start|>user\n{thread[2]['content']}<|im_end|>\n", thread[3]["content"] + "<|im_end|>\n"]  # fmt: skip
    first = turns[0][len("<|im_start|>") :]  # the first token of a row is never trained
    # user turns are trained whole (an answer runs into the next user turn); the assistant headers are not
    assert trained_runs(tokenizer, text, bundle.train[0]["labels"]) == [first, turns[1] + turns[2], turns[3]]
    # the flags win over train_on: the first answer is not trained
    assert trained_runs(tokenizer, text, bundle.train[1]["labels"]) == [first, turns[2], turns[3]]


def test_content_part_flags_mask_straddling_tokens(tmp_path):
    tokenizer = stories_tokenizer(QWEN_STYLE, QWEN_TOKENS)
    parts = [
        {"type": "text", "text": "The cat sat on the ma", "train": False},
        {"type": "text", "text": "t and slept."},
    ]
    messages = [
        {"role": "user", "content": "Where did the cat sit?"},
        {"role": "assistant", "content": parts},
    ]
    bundle = prepare(tmp_path, [messages], tokenizer)
    text = tokenizer.apply_chat_template(
        [messages[0], {"role": "assistant", "content": "The cat sat on the mat and slept."}], tokenize=False
    )
    trained_from = text.index("t and slept.")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    straddling = [(s, e) for s, e in encoding["offset_mapping"] if s < trained_from < e]
    assert straddling, "the test needs a token across the part boundary"
    for (start, end), label in zip(encoding["offset_mapping"], bundle.train[0]["labels"], strict=True):
        inside = start >= trained_from and end > start
        assert (label != -100) == inside, text[start:end]


@pytest.mark.parametrize("train_reasoning", [None, False])
def test_reasoning_content_flag(tmp_path, train_reasoning):
    tokenizer = stories_tokenizer(QWEN_STYLE, QWEN_TOKENS)
    answer = {"role": "assistant", "content": "It is four.", "reasoning_content": "Two and two make four."}
    if train_reasoning is not None:
        answer["train_reasoning"] = train_reasoning
    messages = [{"role": "user", "content": "What is two and two?"}, answer]
    bundle = prepare(tmp_path, [messages], tokenizer)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    runs = trained_runs(tokenizer, text, bundle.train[0]["labels"])
    if train_reasoning is False:
        assert runs == ["<think>\n", "\n</think>\n\nIt is four.<|im_end|>\n"]
    else:
        assert runs == ["<think>\nTwo and two make four.\n</think>\n\nIt is four.<|im_end|>\n"]


def test_tools_tool_calls_and_tool_messages(tmp_path):
    tokenizer = stories_tokenizer(QWEN_STYLE, QWEN_TOKENS)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"messages": messages, "tools": json.dumps(tools)}) + "\n")
    config, plugins = data_config(tmp_path, [{"path": str(path)}], sequence_len=4096)
    row = prepare_sft_data(config, plugins, tokenizer).train[0]
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    assert row["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    tool_call = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
    )
    assert trained_runs(tokenizer, text, row["labels"]) == [
        tool_call,
        "It is 21 degrees in Paris.<|im_end|>\n",
    ]


def test_prompt_completion_masks_the_prompt_and_adds_eos(tmp_path):
    tokenizer = stories_tokenizer()
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "Once upon a ti", "completion": "me there was a cat."}) + "\n")
    config, plugins = data_config(tmp_path, [{"path": str(path), "format": "prompt_completion"}])
    row = prepare_sft_data(config, plugins, tokenizer).train[0]
    encoding = tokenizer("Once upon a time there was a cat.", return_offsets_mapping=True)
    assert row["input_ids"] == encoding["input_ids"] + [tokenizer.eos_token_id]
    split = len("Once upon a ti")
    expected = [
        i if s >= split and e > s else -100
        for i, (s, e) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
    ]
    assert row["labels"] == expected + [tokenizer.eos_token_id]
    assert any(s < split < e for s, e in encoding["offset_mapping"]), (
        "the token across 'ti|me' is not trained"
    )
