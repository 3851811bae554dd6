"""Wall time of the light ftcore commands (median of N runs, each a fresh process).

    python benchmarks/cli_startup.py [--runs 7]

`--help`, `validate`, `plugins` and `schema` must not import torch or transformers (the tests check
that); this prints how long they take, beside a bare Python start and `import torch` for scale.
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = """
[model]
base = "org/model"

[train]
output_dir = "out"
max_steps = 10
"""


def median_seconds(command: list[str], runs: int) -> tuple[float, int]:
    times, code = [], 0
    for _ in range(runs):
        start = time.perf_counter()
        code = subprocess.run(command, capture_output=True).returncode
        times.append(time.perf_counter() - start)
    return statistics.median(times), code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs
    ftcore = shutil.which("ftcore") or str(Path(sys.executable).with_name("ftcore"))
    with tempfile.TemporaryDirectory() as folder:
        good = Path(folder, "config.toml")
        good.write_text(CONFIG)
        misspelt = Path(folder, "misspelt.toml")
        misspelt.write_text(CONFIG.replace("max_steps", "max_stepz"))
        cases = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "ftcore --help": [ftcore, "--help"],
            "ftcore validate config.toml": [ftcore, "validate", str(good)],
            "ftcore validate misspelt.toml (exit 2)": [ftcore, "validate", str(misspelt)],
            "ftcore plugins": [ftcore, "plugins"],
            "ftcore plugins --json": [ftcore, "plugins", "--json"],
            "ftcore schema": [ftcore, "schema"],
            "python -c 'import torch, transformers'": [sys.executable, "-c", "import torch, transformers"],
        }
        print(f"median of {runs} runs, fresh process each")
        for name, command in cases.items():
            seconds, code = median_seconds(command, runs)
            print(f"{name:42s} {seconds * 1000:7.0f} ms   exit {code}")


if __name__ == "__main__":
    main()
