"""report.html charts every logged metric, so a method's own metrics (rewards, KL) show there too."""

import json

from ftcore.metrics import write_report


def test_the_report_charts_every_numeric_metric(tmp_path):
    rows = [
        {
            "step": 1,
            "loss": 2.0,
            "learning_rate": 1e-4,
            "reward": 0.1,
            "rewards/acc/mean": 0.2,
            "note": "x",
            "epoch": 0.1,
        },
        {"step": 2, "loss": 1.5, "learning_rate": 5e-5, "reward": 0.4, "rewards/acc/mean": 0.5, "epoch": 0.2},
        {"step": 2, "train_runtime": 3.0, "train_loss": 1.7},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    page = write_report(tmp_path).read_text()
    titles = [part.split("</h2>")[0] for part in page.split("<h2>")[1:]]
    assert titles == ["loss", "learning rate", "reward", "rewards/acc/mean"]
