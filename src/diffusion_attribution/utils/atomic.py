"""Atomic writes: a file is written beside its target and renamed over it, so a run killed mid-write
never leaves a truncated cache file or shard that a later run would take for a finished one.

Tensor files also carry a checksum of their contents in their own safetensors header
(`CHECKSUM_KEY`), so a file damaged after it was written (truncated by a full disk, overwritten in
place, a bad copy) is told apart from a finished one by `load_checked_tensors`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CHECKSUM_KEY = "diffusion_attribution.sha256"

log = logging.getLogger(__name__)


class CorruptFileError(ValueError):
    """A tensor file that cannot be read back as written: truncated, overwritten or not safetensors."""

    def __init__(self, path: Path | str, reason: str, fix: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path} is corrupt: {reason}. {fix}")


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(value.dtype), list(value.shape)]).encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def atomic_save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors` as safetensors at `path` (atomically), with their checksum in the header."""
    tmp = _temporary(path)
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(cpu, str(tmp), metadata={**(metadata or {}), CHECKSUM_KEY: tensors_checksum(cpu)})
    os.replace(tmp, path)


def is_safetensors_file(path: Path | str) -> bool:
    """Whether the file starts like safetensors: an 8-byte little-endian header length, then a JSON
    object that fits in the file (told by content, whatever the file's name)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
            size = os.fstat(handle.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + length <= size


def load_checked_tensors(
    path: Path | str, fix: str, device: str = "cpu", require_checksum: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file written by `atomic_save_tensors`, after checking
    its checksum. Raises CorruptFileError (naming the file, the problem and `fix`) for a truncated or
    unreadable file, or one whose contents do not match its checksum. A file without a checksum (written
    before checksums were recorded) is refused with `require_checksum`, else used with a warning."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open API)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CorruptFileError(
            path, f"not a readable safetensors file ({reason}; truncated?)", fix
        ) from error
    expected = metadata.get(CHECKSUM_KEY)
    if expected is None:
        if require_checksum:
            raise CorruptFileError(path, "it carries no checksum, so its contents cannot be verified", fix)
        log.warning("%s carries no checksum (written by an older version): using it unverified.", path)
    elif tensors_checksum(tensors) != expected:
        raise CorruptFileError(path, "its contents do not match the checksum written with it", fix)
    if device != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, metadata
