"""evaluation/report.py: the one mean ± standard error, markdown tables (empty cells stay empty), CSV
columns, and W&B logging chosen by the logger's class (a WandbLogger subclass logs; csv never is
instantiated)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf
from pytorch_lightning.loggers import WandbLogger

from diffusion_attribution.evaluation import report

CALLS: list[tuple[str, Any]] = []


class RecordingWandb(WandbLogger):
    """A WandbLogger that records instead of talking to wandb."""

    def __init__(self, group: str | None = None, **_: Any) -> None:
        CALLS.append(("init", group))

    def log_table(self, key: str, columns: list[str], data: list[list[Any]], **_: Any) -> None:
        CALLS.append(("table", (key, columns, data)))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        CALLS.append(("metrics", metrics))

    def log_image(self, key: str, images: list[Any], **_: Any) -> None:
        CALLS.append(("image", (key, images)))

    @property
    def experiment(self) -> Any:
        return type("Run", (), {"finish": lambda self: CALLS.append(("finish", None))})()


def test_mean_and_sem() -> None:
    values = [1.0, 2.0, None, 4.0, math.nan]
    mean, sem = report.mean_and_sem(values)
    assert mean == pytest.approx(7 / 3)
    assert sem == pytest.approx(np.std([1, 2, 4], ddof=1) / np.sqrt(3))
    assert report.mean_and_sem([3.0]) == (3.0, 0.0)
    assert all(math.isnan(v) for v in report.mean_and_sem([None, math.nan]))
    assert report.format_mean_sem(0.012, 0.003, ".2f", 1e-2) == "1.20 ± 0.30"
    assert report.format_mean_sem(math.nan, math.nan) == "–"


def test_markdown_table_and_csv(tmp_path: Path) -> None:
    table = report.markdown_table(["a", "b", "c"], [["x", "", 1], [2, 3, "y"]])
    assert table.splitlines() == ["| a | b | c |", "|---|---|---|", "| x | | 1 |", "| 2 | 3 | y |"]
    path = report.write_csv(tmp_path / "sub" / "rows.csv", [{"b": 1, "a": 2.5}, {"b": 3, "a": None}])
    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [["b", "a"], ["1", "2.5"], ["3", ""]]


def test_wandb_logging_is_chosen_by_logger_class(tmp_path: Path) -> None:
    # A csv logger whose save_dir only resolves inside a Hydra job: left alone, nothing instantiated.
    csv_cfg = OmegaConf.create(
        {"_target_": "pytorch_lightning.loggers.CSVLogger", "save_dir": "${hydra:runtime.output_dir}"}
    )
    assert report.log_to_wandb(csv_cfg, metrics={"m": 1.0}) is False
    assert report.log_to_wandb(None, metrics={"m": 1.0}) is False
    CALLS.clear()
    cfg = OmegaConf.create({"_target_": f"{__name__}.RecordingWandb", "group": None})
    logged = report.log_to_wandb(
        cfg,
        images={"x/plot": tmp_path / "a.png"},
        tables={"x/rows": [{"q": 0, "v": 1.5}, {"q": 1, "v": 2.5}], "x/pairs": (["c"], [[1], [2]])},
        metrics={"x/m": 0.5, "x/nan": math.nan},
        group="bench/run",
    )
    assert logged
    assert CALLS == [
        ("init", "bench/run"),
        ("table", ("x/rows", ["q", "v"], [[0, 1.5], [1, 2.5]])),
        ("table", ("x/pairs", ["c"], [[1], [2]])),
        ("metrics", {"x/m": 0.5}),
        ("image", ("x/plot", [str(tmp_path / "a.png")])),
        ("finish", None),
    ]


def test_evaluate_returns_the_summarys_headline() -> None:
    from diffusion_attribution.evaluation.report import with_headline
    from diffusion_attribution.jobs.evaluate import headline_metric

    assert headline_metric(with_headline({"rows": 3}, "map", 0.25)) == 0.25
    assert headline_metric({"rows": 3}) is None and headline_metric(None) is None
