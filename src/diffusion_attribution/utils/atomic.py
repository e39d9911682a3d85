"""Atomic writes: a file is written beside its target and renamed over it, so a run killed mid-write
never leaves a truncated cache file or shard that a later run would take for a finished one."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    tmp = _temporary(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
