"""`data=folder`: an image folder in the common convention (as Hugging Face `datasets` imagefolder).

Images live under `root`; a metadata file there, `metadata.jsonl` (one JSON object per line) or
`metadata.csv`, has one row per image with `file_name` (path relative to root) and `text` (a caption,
or a list of captions; a CSV cell holds a list as a JSON list string such as `["a", "b"]`). Other
columns are kept as the example's metadata. Canonical order is the row order: ids are row positions.

Everything but image decoding is validated when the source is built, so a bad file fails at start-up
rather than hours into training; a corrupt image is reported (naming the file) when it is loaded.
Images are decoded to 8-bit RGB by `base.to_rgb` (16-bit scaled, transparency composited onto white).

A `file_name` must stay inside `root` (no absolute path, no `..` leading out of it): one that does not
is refused unless `data.allow_outside_root=true`. Symbolic links under `root` are followed as they are.

Content key: caches keyed by the data (Fisher, loss sweeps, TRAK features) must change when an image's
pixels change under the same name, so `content_key()` hashes every image's bytes. The per-file digests
(size, mtime_ns, SHA-1 of the bytes) are remembered in a small JSON per data folder under
`$XDG_CACHE_HOME/diffusion_attribution/file-digests/` (default `~/.cache/...`; nothing is written into
the data folder), and a file is re-hashed only when its size or mtime changed, so a large folder is
read in full once. A digest taken within `RACY_SECONDS` of the file's mtime is not remembered (the
file may still be changing within the file system's timestamp resolution). Deleting the JSON files
is always safe.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from diffusion_attribution.data.base import CaptionedImageDataModule, CaptionedImageSource, DataError, to_rgb
from diffusion_attribution.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
REQUIRED_COLUMNS = ("file_name", "text")
MAX_LISTED = 10  # how many offending names an error message lists
DIGEST_CACHE_VERSION = 1
RACY_SECONDS = 2.0  # a digest of a file modified this recently is not remembered


def open_rgb(path: Path) -> Image.Image:
    """Decode an image file fully as 8-bit RGB (`to_rgb`: 16-bit scaled, transparency onto white); any
    decoding failure becomes a DataError naming the file."""
    try:
        with Image.open(path) as image:  # closed on exit: large sets must not leak file handles
            image.load()  # the full decode happens inside the try
            return to_rgb(image)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for corrupt files
        raise DataError(
            f"Cannot read image {path}: {error}. Replace the file with a valid image, or exclude "
            "its id with data.exclude."
        ) from error


def digest_cache_dir() -> Path:
    """Where per-file content digests are remembered (see the module docstring)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffusion_attribution" / "file-digests"


def _sha1_of_file(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_content_digests(root: Path, file_names: Sequence[str]) -> list[str]:
    """A content digest per file ("<size>:<sha1 of the bytes>"), re-hashing only the files whose size or
    mtime changed since they were last hashed (the digests are remembered under digest_cache_dir())."""
    root_key = str(root.resolve())
    cache_path = digest_cache_dir() / f"{hashlib.sha1(root_key.encode()).hexdigest()[:20]}.json"
    remembered: dict[str, Any] = {}
    if cache_path.is_file():
        try:
            stored = json.loads(cache_path.read_text())
            if stored.get("version") == DIGEST_CACHE_VERSION and stored.get("root") == root_key:
                remembered = dict(stored["files"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            log.warning("Ignoring the unreadable digest cache %s (it is rebuilt).", cache_path)
    digests, changed = [], False
    now_ns = time.time_ns()
    for name in file_names:
        path = root / name
        try:
            stat = path.stat()
        except OSError as error:
            raise DataError(
                f"Cannot read image {path}: {error}. Put the file back or remove its entry."
            ) from None
        entry = remembered.get(name)
        if not (
            isinstance(entry, dict)
            and entry.get("size") == stat.st_size
            and entry.get("mtime_ns") == stat.st_mtime_ns
            and isinstance(entry.get("sha1"), str)
        ):
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha1": _sha1_of_file(path)}
            if now_ns - stat.st_mtime_ns > RACY_SECONDS * 1e9:
                remembered[name] = entry
                changed = True
            else:
                remembered.pop(name, None)  # too fresh to trust size + mtime next time: hash again
        digests.append(f"{entry['size']}:{entry['sha1']}")
    if changed:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            document = {"version": DIGEST_CACHE_VERSION, "root": root_key, "files": remembered}
            atomic_write_text(cache_path, json.dumps(document))
        except OSError as error:  # a read-only home only costs re-hashing next time
            log.warning(
                "Cannot write the digest cache %s (%s); images are re-hashed next run.", cache_path, error
            )
    return digests


def content_key_of_files(root: Path, file_names: Sequence[str]) -> str:
    """One hash of every file's content digest, in the given order."""
    digest = hashlib.sha1()
    for name, file_digest in zip(file_names, file_content_digests(root, file_names), strict=True):
        digest.update(f"{name}\x1f{file_digest}\x1e".encode())
    return digest.hexdigest()


def is_outside_root(name: str) -> bool:
    """An absolute path, or a relative one whose `..` parts lead out of the root (checked lexically)."""
    normalised = os.path.normpath(name)
    return os.path.isabs(name) or normalised == ".." or normalised.startswith(".." + os.sep)


def check_files_exist(root: Path, file_names: Sequence[str], listed_in: Path) -> None:
    """Fail early, naming the files, when images listed in `listed_in` are not under `root`."""
    missing = [name for name in file_names if not (root / name).is_file()]
    if missing:
        shown = ", ".join(missing[:MAX_LISTED]) + (" ..." if len(missing) > MAX_LISTED else "")
        raise DataError(
            f"{len(missing)} image(s) listed in {listed_in} do not exist under {root}: {shown}. "
            f"Put the files there (paths are relative to {root}) or remove their entries."
        )


def parse_captions(value: Any, where: str) -> list[str]:
    """A `text` value (string, list of strings, or a JSON list string) -> non-empty stripped captions."""
    if isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]"):
        try:
            value = json.loads(value)  # CSV cells carry caption lists as JSON
        except json.JSONDecodeError:
            pass  # a caption that merely looks bracketed
    captions = [value] if isinstance(value, str) else value
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise DataError(
            f"{where}: 'text' is {value!r}; it must be a caption string or a list of caption strings."
        )
    captions = [c.strip() for c in captions]
    if not captions or not all(captions):
        raise DataError(
            f"{where} has an empty caption (text={value!r}). Give every image at least one "
            "non-empty caption, or remove its row."
        )
    return captions


def read_metadata_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for every record of a .jsonl or .csv metadata file, in file order."""
    if path.suffix == ".csv":
        # utf-8-sig: spreadsheet programs often start CSV files with a byte-order mark.
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            # line_num is read after each row is parsed, so it is that row's (last) line in the file.
            # Short rows give None for missing cells; the None key collects surplus cells (dropped).
            return [(reader.line_num, {k: v for k, v in row.items() if k is not None}) for row in reader]
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing one) are not rows
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                row, detail = None, f"is not valid JSON ({error})"
            else:
                detail = f"is {type(row).__name__}, not a JSON object"
            if not isinstance(row, dict):
                raise DataError(
                    f"{path} line {line_no} {detail}. Each line must be one JSON object such as "
                    '{"file_name": "0001.png", "text": "a caption"}.'
                )
            rows.append((line_no, row))
    return rows


class ImageFolderSource(CaptionedImageSource):
    """Images under `root` described by a metadata file; ids are metadata row positions.

    `root_key` and `metadata_key` are the config keys that set `root` and `metadata` (data=abc reads
    its pool folder through data.pool and data.pool_metadata), so error messages name the right key.
    """

    def __init__(
        self,
        root: str | Path,
        metadata: str | None = None,
        allow_outside_root: bool = False,
        root_key: str = "data.root",
        metadata_key: str = "data.metadata",
    ) -> None:
        self.root = Path(root).expanduser()
        self.root_key, self.metadata_key = root_key, metadata_key
        if not self.root.is_dir():
            raise DataError(
                f"Image folder {self.root} does not exist. Pass the folder that holds the images and "
                f"their metadata.jsonl or metadata.csv with {root_key}=<folder>."
            )
        self.metadata_path = self._find_metadata(metadata)
        self.file_names: list[str] = []
        self._captions: list[list[str]] = []
        self._extra: list[dict[str, Any]] = []
        rows_of: dict[str, list[int]] = defaultdict(list)  # normalised file name -> lines, for duplicates
        for line_no, row in read_metadata_rows(self.metadata_path):
            where = f"{self.metadata_path} line {line_no}"
            missing = [c for c in REQUIRED_COLUMNS if c not in row]
            if missing:
                raise DataError(
                    f"{where} has no {' or '.join(map(repr, missing))} column (columns found: "
                    f"{sorted(row)}). Every row needs 'file_name' (the image path relative to "
                    f"{self.root}) and 'text' (its caption or a list of captions)."
                )
            name = row["file_name"]
            if not isinstance(name, str) or not name.strip():
                raise DataError(
                    f"{where}: 'file_name' is {name!r}; give the image path relative to {self.root}."
                )
            if not allow_outside_root and is_outside_root(name):
                raise DataError(
                    f"{where}: 'file_name' {name!r} points outside the image folder {self.root}. Move the "
                    f"image under {self.root} and give its path relative to it, or set "
                    "data.allow_outside_root=true if reading files outside the folder is intended."
                )
            rows_of[os.path.normpath(name)].append(line_no)
            self.file_names.append(name)
            self._captions.append(parse_captions(row["text"], where))
            self._extra.append({k: v for k, v in row.items() if k not in REQUIRED_COLUMNS})
        if not self.file_names:
            raise DataError(f"{self.metadata_path} has no rows: list one image per row.")
        duplicates = [f"{name} (lines {lines})" for name, lines in rows_of.items() if len(lines) > 1]
        if duplicates:
            raise DataError(
                f"{self.metadata_path} lists images more than once: {'; '.join(duplicates[:MAX_LISTED])}. "
                "Ids must name one image each: merge the rows, putting all captions in one list "
                '(text: ["caption 1", "caption 2"]).'
            )
        check_files_exist(self.root, self.file_names, self.metadata_path)

    def _find_metadata(self, metadata: str | None) -> Path:
        if metadata is None:
            found = [self.root / n for n in METADATA_NAMES if (self.root / n).is_file()]
            if not found:
                raise DataError(
                    f"No metadata file in {self.root}: expected {' or '.join(METADATA_NAMES)} with a "
                    f"'file_name' and a 'text' column (or name another file with {self.metadata_key}=<name>)."
                )
            return found[0]
        path = self.root / metadata  # an absolute `metadata` stays as it is
        if not path.is_file():
            raise DataError(
                f"Metadata file {path} ({self.metadata_key}={metadata}) does not exist. Give the name of a "
                f".jsonl or .csv file in {self.root}, or {self.metadata_key}=null for metadata.jsonl/.csv."
            )
        if path.suffix not in (".jsonl", ".csv"):
            raise DataError(
                f"Metadata file {path} ({self.metadata_key}={metadata}) must be .jsonl (JSON lines) or .csv."
            )
        return path

    def __len__(self) -> int:
        return len(self.file_names)

    def captions(self, idx: int) -> list[str]:
        return self._captions[idx]

    def load_image(self, idx: int) -> Image.Image:
        return open_rgb(self.root / self.file_names[idx])

    def file_name(self, idx: int) -> str:
        return self.file_names[idx]

    def metadata(self, idx: int) -> dict[str, Any]:
        return dict(self._extra[idx])  # a copy: callers must not edit the source's records

    def content_key(self) -> str:
        """The images' bytes (see the module docstring: digests are remembered, re-hashed on change)."""
        return content_key_of_files(self.root, self.file_names)


class FolderDataModule(CaptionedImageDataModule):
    """`data=folder`: an image folder with metadata.jsonl / metadata.csv."""

    def __init__(
        self, root: str, metadata: str | None = None, allow_outside_root: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.metadata = metadata
        self.allow_outside_root = bool(allow_outside_root)

    def build_source(self) -> ImageFolderSource:
        return ImageFolderSource(self.root, self.metadata, self.allow_outside_root)
