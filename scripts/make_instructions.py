"""Write the generated instruction set shipped as a test asset (instruction / input / output rows).

The rows have the shape of Alpaca's (``input`` empty in about 40% of them, outputs from one word to
a few hundred characters) but are produced here from templates, so the file is ours to license
(Apache-2.0, as the repository). Deterministic: the same file on every run.

    python scripts/make_instructions.py core/ftcore/testdata/data/instructions/instructions_2000.jsonl
"""

from __future__ import annotations

import json
import random
import sys

NAMES = ["Lily", "Tom", "Sam", "Mia", "Ben", "Sue", "Max", "Anna", "Tim", "Lucy", "Jack", "Zoe"]
ANIMALS = ["cat", "dog", "bird", "frog", "bunny", "duck", "fox", "bear", "fish", "mouse"]
PLACES = ["park", "garden", "forest", "beach", "kitchen", "school", "farm", "river", "hill", "town"]
THINGS = ["ball", "kite", "box", "hat", "cake", "book", "toy car", "red balloon", "shell", "drum"]
FEELINGS = ["happy", "sad", "brave", "sleepy", "curious", "proud", "scared", "excited"]
WORDS = [
    "apple",
    "river",
    "cloud",
    "tiger",
    "piano",
    "lemon",
    "rocket",
    "garden",
    "window",
    "candle",
    "pencil",
    "orange",
    "bridge",
    "castle",
    "spoon",
    "button",
    "forest",
    "dragon",
    "mirror",
    "basket",
]
OPPOSITES = {
    "big": "small",
    "hot": "cold",
    "happy": "sad",
    "fast": "slow",
    "up": "down",
    "light": "dark",
    "open": "closed",
    "old": "new",
    "wet": "dry",
    "loud": "quiet",
    "early": "late",
    "full": "empty",
}
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white"]
FRUITS = ["apple", "banana", "cherry", "grape", "mango", "pear", "peach", "plum", "kiwi", "lemon"]
STEPS = {
    "plant a seed": [
        "Fill a small pot with soil.",
        "Make a hole as deep as your finger.",
        "Drop the seed in and cover it with soil.",
        "Water it gently.",
        "Put the pot in a sunny place.",
        "Water it again when the soil feels dry.",
    ],
    "make a sandwich": [
        "Take two slices of bread.",
        "Spread butter on one side of each slice.",
        "Put cheese and lettuce on one slice.",
        "Cover it with the other slice.",
        "Cut the sandwich in half.",
    ],
    "wash your hands": [
        "Wet your hands with clean water.",
        "Put soap on your hands.",
        "Rub them together for twenty seconds.",
        "Rinse the soap away.",
        "Dry your hands with a clean towel.",
    ],
    "tidy a room": [
        "Pick up the toys from the floor.",
        "Put the books back on the shelf.",
        "Fold the clothes and put them away.",
        "Make the bed.",
        "Open the window for fresh air.",
    ],
}


def story(rng: random.Random, sentences: int) -> str:
    name, animal, place = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(PLACES)
    lines = [
        f"Once upon a time, there was a little {animal} named {name}.",
        f"{name} lived near a {place} and loved to play there every day.",
    ]
    while len(lines) < sentences:
        friend, thing, feeling = rng.choice(NAMES), rng.choice(THINGS), rng.choice(FEELINGS)
        lines.append(
            rng.choice(
                [
                    f"One day, {name} found a {thing} under a tree.",
                    f"{name} felt {feeling} and ran to tell {friend}.",
                    f'{friend} said, "Let\'s share the {thing} and play together!"',
                    f"They played in the {place} until the sun went down.",
                    f"The {thing} rolled away, and {name} chased it all the way home.",
                    f"{name} learned that being kind to friends makes everyone {feeling}.",
                ]
            )
        )
    lines.append(f"From that day on, {name} and {rng.choice(NAMES)} were the best of friends.")
    return " ".join(lines)


def row(rng: random.Random) -> dict:
    kind = rng.randrange(12)
    if kind == 0:
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        return {
            "instruction": "Add the two numbers.",
            "input": f"{a} + {b}",
            "output": f"{a} + {b} = {a + b}.",
        }
    if kind == 1:
        words = rng.sample(WORDS, rng.randint(3, 8))
        return {
            "instruction": "Sort these words in alphabetical order.",
            "input": ", ".join(words),
            "output": ", ".join(sorted(words)),
        }
    if kind == 2:
        word = rng.choice(WORDS)
        return {"instruction": f'Spell the word "{word}" backwards.', "input": "", "output": word[::-1]}
    if kind == 3:
        sentences = rng.randint(3, 14)
        topic = rng.choice(ANIMALS)
        return {
            "instruction": f"Write a short story about a {topic}.",
            "input": "",
            "output": story(rng, sentences),
        }
    if kind == 4:
        word = rng.choice(list(OPPOSITES))
        return {"instruction": "Give the opposite of the word.", "input": word, "output": OPPOSITES[word]}
    if kind == 5:
        count = rng.randint(2, 6)
        group, items = rng.choice([("colors", COLORS), ("fruits", FRUITS), ("animals", ANIMALS)])
        return {
            "instruction": f"Name {count} {group}.",
            "input": "",
            "output": ", ".join(rng.sample(items, count)).capitalize() + ".",
        }
    if kind == 6:
        celsius = rng.randint(-20, 40)
        fahrenheit = celsius * 9 / 5 + 32
        return {
            "instruction": "Convert the temperature from Celsius to Fahrenheit.",
            "input": f"{celsius} °C",
            "output": f"{celsius} °C is {fahrenheit:g} °F.",
        }
    if kind == 7:
        text = story(rng, rng.randint(2, 4))
        vowels = sum(ch in "aeiouAEIOU" for ch in text)
        return {
            "instruction": "Count the vowels in the text.",
            "input": text,
            "output": f"The text has {vowels} vowels.",
        }
    if kind == 8:
        task = rng.choice(list(STEPS))
        steps = STEPS[task]
        return {
            "instruction": f"Explain how to {task}.",
            "input": "",
            "output": "\n".join(f"{i}. {step}" for i, step in enumerate(steps, 1)),
        }
    if kind == 9:
        text = story(rng, rng.randint(2, 5))
        return {"instruction": "Rewrite the text in capital letters.", "input": text, "output": text.upper()}
    if kind == 10:
        numbers = [rng.randint(1, 99) for _ in range(rng.randint(3, 7))]
        return {
            "instruction": "Find the largest number in the list.",
            "input": " ".join(map(str, numbers)),
            "output": str(max(numbers)),
        }
    name, animal, thing = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(THINGS)
    return {
        "instruction": f"Write one sentence about {name}, a {animal} and a {thing}.",
        "input": "",
        "output": f"{name} gave the {animal} a {thing}, and the {animal} was very {rng.choice(FEELINGS)}.",
    }


def main(path: str, count: int = 2000) -> None:
    rng = random.Random(2026)
    lines: dict[str, None] = {}  # no two rows alike, so held-out rows never repeat training rows
    while len(lines) < count:
        lines[json.dumps(row(rng), ensure_ascii=False) + "\n"] = None
    with open(path, "w", encoding="utf-8") as out:
        out.writelines(lines)


if __name__ == "__main__":
    main(sys.argv[1])
