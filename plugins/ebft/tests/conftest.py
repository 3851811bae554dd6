"""Shared pieces of the ebft tests: story prompts with reference continuations, story documents."""

import json

import pytest

ANIMALS = ["cat", "dog", "bird", "fish", "frog", "duck", "bear", "fox"]


@pytest.fixture
def story_rows() -> list[dict]:
    """{input, output} rows (the ebft_opencode format): a story opening and its reference continuation."""
    return [
        {
            "input": f"Once upon a time, there was a little {a}.",
            "output": f" The {a} liked to play in the park.",
        }
        for a in ANIMALS
    ]


@pytest.fixture
def story_texts() -> list[dict]:
    """{text} rows (the ebft_strided format)."""
    return [
        {"text": f"Once upon a time, there was a little {a}. The {a} liked to play in the park with a ball. "
         f"One day, the {a} saw a big tree. The {a} was happy."}
        for a in ANIMALS
    ]  # fmt: skip


@pytest.fixture
def stories_file(tmp_path):
    def write(rows, name="rows.jsonl"):
        path = tmp_path / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(path)

    return write
