"""How every benchmark reports: markdown tables, CSV and JSON files, mean ± standard error, the shared
plots (bar charts, lines with error bars) and W&B logging.

A benchmark computes its rows and summary; this module writes them. W&B is used when the run's logger
config instantiates a `WandbLogger` (`logger=wandb`): the class is checked, not the spelling of its
`_target_`, and any other logger (csv, tensorboard) is left alone.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- statistics
def mean_and_sem(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and standard error (sample std / √n) of the finite values; None and NaN are left out.
    (nan, nan) without values; the s.e. of a single value is 0."""
    array = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if len(array) == 0:
        return math.nan, math.nan
    sem = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else 0.0
    return float(array.mean()), sem


def format_mean_sem(mean: float, sem: float, fmt: str = ".3f", scale: float = 1.0, missing: str = "–") -> str:
    """`mean ± sem` divided by `scale` (a table's unit), or `missing` when the mean is NaN."""
    if mean is None or math.isnan(mean):
        return missing
    return f"{format(mean / scale, fmt)} ± {format(sem / scale, fmt)}"


def with_headline(summary: dict[str, Any], name: str, value: float | None) -> dict[str, Any]:
    """Add the benchmark's headline metric, `summary["headline"] = {"name", "value"}`: the one number
    evaluate.py returns to a sweeper."""
    summary["headline"] = {"name": name, "value": None if value is None else float(value)}
    return summary


# ---------------------------------------------------------------------------------------- tables
def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def variant_labels(rankings: Sequence[Mapping[str, Any]], most: int = 3) -> list[str]:
    """A table label per run: its ranking.json method name, plus, where runs of one name differ in
    their method settings, up to `most` of the settings that tell them apart (e.g. `dtrak
    (proj_dim=2048)` vs `dtrak (proj_dim=4096)`). Runs of equal settings get equal labels, so a
    benchmark that spans several runs per variant (one per concept) groups them."""
    names = [str(r.get("method", "?")) for r in rankings]
    labels = list(names)
    for name in set(names):
        same = [k for k, n in enumerate(names) if n == name]
        configs = [_flatten(rankings[k].get("method_config") or {}) for k in same]
        keys = sorted({key for c in configs for key in c})
        differ = [key for key in keys if len({json.dumps(c.get(key), default=str) for c in configs}) > 1]
        for k, config in zip(same, configs, strict=True):
            shown = dict.fromkeys(_present(key, config) for key in differ[:most])
            settings = ", ".join(f"{_short(key)}={_value(config.get(key))}" for key in shown)
            labels[k] = f"{name} ({settings})" if settings else name
    return labels


def _present(key: str, config: Mapping[str, Any]) -> str:
    """`key`, or the ancestor this config holds instead (`candidates: null` where others hold
    `candidates.k`)."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in config:
            return ".".join(parts[:end])
    return key


def _short(key: str) -> str:
    """The last part of a dotted key, with its parent where the last part alone says little."""
    parts = key.split(".")
    return ".".join(parts[-2:]) if len(parts) > 1 and parts[-1] in {"k", "name", "count"} else parts[-1]


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _cell(value: Any) -> str:
    return f" {value} " if str(value) != "" else " "


def markdown_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (cells already formatted; an empty cell stays empty), no final newline."""
    lines = ["|" + "|".join(_cell(h) for h in headers) + "|", "|" + "---|" * len(headers)]
    lines += ["|" + "|".join(_cell(c) for c in row) + "|" for row in rows]
    return "\n".join(lines)


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_csv(
    path: str | Path, rows: Sequence[Mapping[str, Any]], fieldnames: Sequence[str] | None = None
) -> Path:
    """Rows of dicts as CSV, columns in the first row's order (or `fieldnames`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames or rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2))


# ---------------------------------------------------------------------------------------- plots
def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(
    path: str | Path,
    labels: Sequence[str],
    panels: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    ylabel: str,
    suptitle: str | None = None,
    ylim: tuple[float, float] | None = None,
    annotate: bool = False,
    zero_line: bool = False,
    figsize: tuple[float, float] | None = None,
    dpi: int = 120,
) -> Path:
    """Bar charts side by side, one per panel (title -> (means, standard errors), a bar per label),
    sharing the y axis; `annotate` writes each mean above its error bar."""
    plt = pyplot()
    x = np.arange(len(labels))
    size = figsize or (max(4.5, 1.6 + 1.3 * len(labels)), 3.8)
    fig, axes = plt.subplots(1, len(panels), figsize=size, sharey=True, squeeze=False)
    for n, (ax, (title, (means, sems))) in enumerate(zip(axes[0], panels.items(), strict=True)):
        ax.bar(x, means, yerr=sems, capsize=4, color=f"C{n}")
        if annotate:
            for xi, m, e in zip(x, means, sems, strict=True):  # above the error bar
                ax.text(xi, m + e + 0.02, f"{m:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9 if len(panels) == 1 else None)
        if ylim is not None:
            ax.set_ylim(*ylim)
        if zero_line:
            ax.axhline(0, color="grey", lw=0.5)
    axes[0][0].set_ylabel(ylabel)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def line_plot(
    path: str | Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    ylim: tuple[float, float] | None = None,
    zero_line: bool = False,
    grid: bool = False,
    figsize: tuple[float, float] = (5, 3.5),
    legend_size: float | None = 7,
    dpi: int = 120,
) -> Path:
    """Lines with markers, one per series (label -> (x, y, standard errors or None))."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    for label, (xs, ys, errs) in series.items():
        if errs is None:
            ax.plot(xs, ys, marker="o", label=label)
        else:
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if zero_line:
        ax.axhline(0, color="grey", lw=0.5)
    if grid:
        ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------- W&B
def wandb_logger(logger_cfg: Any, **overrides: Any) -> Any | None:
    """The run's `WandbLogger` (instantiated from `logger_cfg` with `overrides`), or None when the
    logger is anything else or absent. The target class is resolved and checked before anything is
    instantiated, so other loggers (whose save_dir may only resolve inside a Hydra job) are untouched."""
    if not logger_cfg or not logger_cfg.get("_target_"):
        return None
    import hydra
    from pytorch_lightning.loggers import WandbLogger

    try:
        target = hydra.utils.get_class(str(logger_cfg["_target_"]))
    except Exception:  # not a class (a factory function): decide on the instance
        target = None
    if target is not None and not (isinstance(target, type) and issubclass(target, WandbLogger)):
        return None
    logger = hydra.utils.instantiate(logger_cfg, **overrides)
    return logger if isinstance(logger, WandbLogger) else None


def log_to_wandb(
    logger_cfg: Any,
    images: Mapping[str, str | Path | Sequence[str | Path]] | None = None,
    tables: Mapping[str, Sequence[Mapping[str, Any]] | tuple[Sequence[str], Sequence[Sequence[Any]]]]
    | None = None,
    metrics: Mapping[str, float] | None = None,
    **overrides: Any,
) -> bool:
    """Log `images` (key -> image file(s)), `tables` (key -> rows of dicts, or (columns, rows)) and
    `metrics` (key -> number; NaN left out) to W&B when `logger_cfg` is a WandbLogger, then finish the
    W&B run. `overrides` go to the logger's constructor (e.g. group=...). Returns whether it logged."""
    logger = wandb_logger(logger_cfg, **overrides)
    if logger is None:
        return False
    for key, table in (tables or {}).items():
        if isinstance(table, tuple):
            columns, data = list(table[0]), [list(row) for row in table[1]]
        else:
            columns = list(table[0]) if table else []
            data = [[row.get(c) for c in columns] for row in table]
        logger.log_table(key, columns=columns, data=data)
    finite = {k: float(v) for k, v in (metrics or {}).items() if v is not None and not math.isnan(float(v))}
    if finite:
        logger.log_metrics(finite)
    for key, files in (images or {}).items():
        files = [files] if isinstance(files, (str, Path)) else list(files)
        logger.log_image(key, [str(f) for f in files])
    logger.experiment.finish()
    return True
