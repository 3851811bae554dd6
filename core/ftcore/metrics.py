"""Metrics, progress and report callbacks (usable by any HF-Trainer-based method).

``metrics.jsonl`` gets one JSON object per logged step (``step``, ``loss``, ``learning_rate``,
``tokens_per_second``, ...; eval rows carry ``eval_*`` keys; plugins add theirs with
``Run.log_metrics``). ``report.html`` draws the loss and learning-rate curves and one chart per
other numeric metric; it is rewritten at every checkpoint and at the end. Only rank 0 writes.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.html"


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsCallback(TrainerCallback):
    """Appends every log to metrics.jsonl with throughput; on resume, drops the rows past the resumed
    step and the summary row of the interrupted run."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / METRICS_FILE
        self._last_time = None
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.path.is_file():
            kept = [
                row
                for row in read_metrics(self.path.parent)
                if row.get("step", 0) <= state.global_step and "train_loss" not in row
            ]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, **{k: _plain(v) for k, v in logs.items()}}
        if "loss" in logs:
            now = time.perf_counter()
            elapsed = max(now - self._last_time, 1e-9)
            row["tokens_per_second"] = round((state.num_input_tokens_seen - self._last_tokens) / elapsed, 2)
            row["tokens_seen"] = state.num_input_tokens_seen
            self._last_time, self._last_tokens = now, state.num_input_tokens_seen
            logs["tokens_per_second"] = row["tokens_per_second"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


class LoggedMetricsCallback(TrainerCallback):
    """Adds the values of ``Run.log_metrics`` to each row the trainer logs.

    The core puts it first among the trainer's callbacks, so the row holds them before any other
    callback (the trackers of ``report_to``, metrics.jsonl, the report, plugins) sees it.
    """

    def __init__(self, run):
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        pending = self.run.pop_metrics()
        if logs is not None and pending:
            logs.update(pending)
            if state.log_history:  # the trainer recorded the row before calling the callbacks
                state.log_history[-1].update(pending)

    def on_train_end(self, args, state, control, **kwargs):
        self.run._training_done = True


def _plain(value):
    return value.item() if hasattr(value, "item") else value


class ReportCallback(TrainerCallback):
    """Writes report.html at every checkpoint and at the end of training."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_report(self.output_dir)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_report(self.output_dir)


def write_report(output_dir: str | Path) -> Path:
    """report.html: loss (train and eval) and learning-rate curves, then one chart per other logged metric
    (a method's rewards, KL, grad norm, ...), as inline SVG."""
    rows = read_metrics(output_dir)
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), int | float)]
    evals = [(r["step"], r["eval_loss"]) for r in rows if isinstance(r.get("eval_loss"), int | float)]
    lrs = [(r["step"], r["learning_rate"]) for r in rows if isinstance(r.get("learning_rate"), int | float)]
    charts = [
        _svg_chart("loss", [("train loss", train, "#1f77b4"), ("eval loss", evals, "#d62728")]),
        _svg_chart("learning rate", [("learning rate", lrs, "#2ca02c")]),
    ]
    for name in _other_metrics(rows):
        points = [(r["step"], r[name]) for r in rows if _is_number(r.get(name))]
        charts.append(_svg_chart(name, [(name, points, "#9467bd")]))
    summary = (
        f"<p>{len(train)} logged steps; last step {train[-1][0]}; last loss {train[-1][1]:.4f}</p>"
        if train
        else ""
    )
    title = html.escape(str(Path(output_dir).resolve()))
    page = (
        "<!doctype html><meta charset='utf-8'><title>ftcore report</title>"
        "<style>body{font-family:sans-serif;margin:2em}svg{border:1px solid #ddd;margin:1em 0}</style>"
        f"<h1>ftcore run: {title}</h1>{summary}{''.join(charts)}"
    )
    path = Path(output_dir) / REPORT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path


REPORT_SKIPS = {
    "step", "loss", "eval_loss", "learning_rate", "epoch", "tokens_seen", "num_input_tokens_seen",
    "train_runtime", "train_tokens_per_second", "eval_runtime", "eval_samples_per_second",
    "eval_steps_per_second",
}  # fmt: skip
"""Keys drawn elsewhere in the report, or counters and timings not worth a chart."""


def _other_metrics(rows: list[dict]) -> list[str]:
    """Numeric keys beside loss and learning rate (plugins' metrics included); the end-of-training
    summary row (``train_loss``, ``total_flos``, ...) is left out."""
    names = {k for r in rows if "train_loss" not in r for k, v in r.items() if _is_number(v)}
    return sorted(names - REPORT_SKIPS)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _svg_chart(title: str, series, width: int = 720, height: int = 260) -> str:
    points = [p for _, data, _ in series for p in data if math.isfinite(p[1])]
    if not points:
        return f"<h2>{html.escape(title)}</h2><p>no data yet</p>"
    pad = 40
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x):
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y):
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    lines = []
    for name, data, color in series:
        if data:
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in data if math.isfinite(y))
            lines.append(
                f"<polyline fill='none' stroke='{color}' stroke-width='2' points='{coords}'><title>{name}</title></polyline>"
            )
    legend = " ".join(f"<span style='color:{c}'>&#9632; {html.escape(n)}</span>" for n, d, c in series if d)
    axes = (
        f"<text x='{pad}' y='{height - 10}' font-size='11'>step {x0}</text>"
        f"<text x='{width - pad - 60}' y='{height - 10}' font-size='11'>step {x1}</text>"
        f"<text x='2' y='{pad - 5}' font-size='11'>{y1:.4g}</text>"
        f"<text x='2' y='{height - pad + 12}' font-size='11'>{y0:.4g}</text>"
    )
    return (
        f"<h2>{html.escape(title)}</h2><div>{legend}</div>"
        f"<svg width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg'>{axes}{''.join(lines)}</svg>"
    )


class RichProgressCallback(TrainerCallback):
    """A rich progress bar with loss, learning rate, tokens/s and ETA (rank 0 only)."""

    def __init__(self):
        self.progress = None
        self.task = None
        self.fields = {"loss": "-", "lr": "-", "tps": "-"}

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  tok/s {task.fields[tps]}"),
            TimeRemainingColumn(),
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=state.max_steps, completed=state.global_step, **self.fields
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.progress or not logs:
            return
        if "loss" in logs:
            self.fields = {
                "loss": f"{logs['loss']:.4f}",
                "lr": f"{logs.get('learning_rate', 0):.2e}",
                "tps": f"{logs.get('tokens_per_second', 0):,.0f}",
            }
            self.progress.update(self.task, **self.fields)
            if not self.progress.console.is_terminal:
                self.progress.console.print(
                    f"step {state.global_step}/{state.max_steps} loss {self.fields['loss']} "
                    f"lr {self.fields['lr']} tok/s {self.fields['tps']}"
                )
        elif "eval_loss" in logs:
            self.progress.console.print(f"step {state.global_step} eval_loss {logs['eval_loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.stop()
            self.progress = None
