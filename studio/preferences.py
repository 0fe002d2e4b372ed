"""Preference pairs: what a user preferred, per prompt, kept per user and imported from the Pick-a-Pic layout.

A pair is (prompt, preferred image, other image) of one user. The studio collects them (the UI shows two generations
and the user picks one, or skips for a tie) into a `PreferenceStore` under ``home.preferences``::

    preferences/<user>/pairs.jsonl         one JSON object per pair (id, prompt, image paths, source, created)
    preferences/<user>/images/<id>-0.png   the preferred image
    preferences/<user>/images/<id>-1.png   the other image

Every write is atomic (a temporary file in the same folder, fsync'ed, then renamed), so a crash never leaves an index
line that points at a half-written image, nor a half-written index.

Pick-a-Pic rows (parquet with image bytes, or JSONL with image paths relative to the JSONL file) are read by
`read_pick_a_pic`; ties (label 0.5) are dropped, and each bad row (a missing image, a label outside {0, 0.5, 1}, no
usable user column) is reported with its row number while the valid rows still import.

>>> store = PreferenceStore(StudioHome(Path(tempfile.mkdtemp())))
>>> red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
>>> _ = store.add("alice", "a circle", preferred=red, other=blue)
>>> store.users(), len(store.pairs("alice"))
(['alice'], 1)
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
import threading
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from studio.errors import InvalidInputError, NotAvailableError, NotFoundError
from studio.home import StudioHome

logger = logging.getLogger(__name__)

INDEX = "pairs.jsonl"
IMAGES = "images"
# Pick-a-Pic images are 512-1024 px; anything far past that in one row is a decompression bomb, not a picture.
MAX_IMAGE_PIXELS = 4096 * 4096
VALID_LABELS = (0.0, 0.5, 1.0)
USER_COLUMN = "user_id"
# The adapter library's name rule (`studio.library.sanitize_name`), repeated here because importing the library
# pulls in diffusers, and reading a JSONL file should not cost seconds.
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
# Columns people use for the user when the file was not written by Pick-a-Pic's own tools: a clear message beats
# silently filing every row under one user.
_OTHER_USER_COLUMNS = ("user", "uid", "userid", "user_name", "username")


@dataclass(frozen=True)
class PreferencePair:
    """One choice of one user: for ``prompt`` they preferred ``preferred`` over ``other``."""

    user_id: str
    prompt: str
    preferred: Image.Image
    other: Image.Image
    source: str = ""
    """Where the pair came from: ``studio``, a file and row, ``simulated:<user>``..."""


@dataclass(frozen=True)
class RowProblem:
    """A row that was not imported, and why (rows count from 1, as an editor shows them)."""

    row: int
    message: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.message}"


@dataclass
class ImportReport:
    """What an import did: pairs read, ties dropped, and one `RowProblem` per bad row."""

    source: str
    imported: int = 0
    ties: int = 0
    problems: list[RowProblem] = field(default_factory=list)
    users: dict[str, int] = field(default_factory=dict)
    """Pairs read per user."""

    def summary(self) -> str:
        """One line for a terminal: counts, then the bad rows."""
        text = f"{self.source}: {self.imported} pairs from {len(self.users)} users, {self.ties} ties dropped"
        if self.problems:
            text += f", {len(self.problems)} rows refused"
        return text


def sanitize_user(user_id: object) -> str:
    """A user id as a safe folder name; Pick-a-Pic's integer ids become their decimal text.

    >>> sanitize_user(1234)
    '1234'
    """
    if isinstance(user_id, bool) or not isinstance(user_id, str | int):
        raise InvalidInputError(f"expected a user id as text or a whole number, found {user_id!r}")
    text = str(user_id).strip()
    if not _SAFE_NAME.fullmatch(text) or text.startswith(".") or ".." in text:
        raise InvalidInputError(
            f"a user id needs 1-100 characters from A-Z a-z 0-9 . _ - without a leading dot or '..', got {text!r}"
        )
    return text


# -- the store ----------------------------------------------------------------------------------------------------


class PreferenceStore:
    """Preference pairs per user under ``home.preferences``; safe against crashes mid-write.

    One process writes at a time per store object (a lock); the index of a user is rewritten whole, atomically, on
    every add, which costs nothing at the sizes people click through (hundreds of pairs).
    """

    def __init__(self, home: StudioHome | Path) -> None:
        self.root = home.preferences if isinstance(home, StudioHome) else Path(home)
        self._lock = threading.Lock()

    def folder(self, user_id: str) -> Path:
        """The folder of one user (not created)."""
        return self.root / sanitize_user(user_id)

    def users(self) -> list[str]:
        """Users with at least one stored pair, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / INDEX).is_file() and not p.name.startswith("."))

    def count(self, user_id: str) -> int:
        """Number of stored pairs of ``user_id`` (0 for an unknown user)."""
        return len(self._rows(self.folder(user_id)))

    def add(
        self, user_id: str, prompt: str, *, preferred: Image.Image, other: Image.Image, source: str = "studio"
    ) -> str:
        """Store one pair and return its id."""
        if not isinstance(prompt, str):
            raise InvalidInputError(f"expected the prompt as text, found {type(prompt).__name__}")
        folder = self.folder(user_id)
        pair_id = uuid.uuid4().hex[:16]
        with self._lock:
            (folder / IMAGES).mkdir(parents=True, exist_ok=True)
            # 1. Images first: an index line never points at an image that is not fully on disk.
            names = []
            for slot, image in enumerate((preferred, other)):
                name = f"{IMAGES}/{pair_id}-{slot}.png"
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="PNG")
                atomic_write(folder / name, buffer.getvalue())
                names.append(name)
            # 2. Then the index, rewritten whole through a temporary file.
            row = {
                "id": pair_id,
                "prompt": prompt,
                "preferred": names[0],
                "other": names[1],
                "source": source,
                "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            }
            rows = [*self._rows(folder), row]
            atomic_write(folder / INDEX, "".join(json.dumps(r) + "\n" for r in rows).encode())
        return pair_id

    def add_choice(
        self, user_id: str, prompt: str, images: tuple[Image.Image, Image.Image], choice: int | None
    ) -> str | None:
        """Store what the user picked between two images: ``choice`` 0 or 1, or ``None`` for a tie (not stored)."""
        if choice is None:
            return None
        if choice not in (0, 1):
            raise InvalidInputError(f"expected the choice 0, 1 or none (a tie), found {choice!r}")
        return self.add(user_id, prompt, preferred=images[choice], other=images[1 - choice])

    def pairs(self, user_id: str) -> list[PreferencePair]:
        """Every stored pair of ``user_id``, oldest first; raises `NotFoundError` for a user with none."""
        folder = self.folder(user_id)
        rows = self._rows(folder)
        if not rows:
            known = ", ".join(self.users()) or "none"
            raise NotFoundError(f"expected stored preference pairs for user '{user_id}', found none (users: {known})")
        user = sanitize_user(user_id)
        return [
            PreferencePair(
                user,
                row["prompt"],
                _load_image(folder / row["preferred"]),
                _load_image(folder / row["other"]),
                source=str(row.get("source", "studio")),
            )
            for row in rows
        ]

    def add_pairs(self, pairs: Iterable[PreferencePair]) -> int:
        """Store pairs read elsewhere (an import); returns how many were stored."""
        stored = 0
        for pair in pairs:
            self.add(pair.user_id, pair.prompt, preferred=pair.preferred, other=pair.other, source=pair.source)
            stored += 1
        return stored

    def _rows(self, folder: Path) -> list[dict[str, Any]]:
        index = folder / INDEX
        if not index.is_file():
            return []
        rows = []
        for number, line in enumerate(index.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{index} line {number} is not JSON ({exc.msg})") from None
        return rows


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder: a reader sees the old file or the new
    one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


# -- reading images safely ----------------------------------------------------------------------------------------


def _decode(opener: Any, what: str) -> Image.Image:
    """Open an image with a pixel limit checked before decoding; raise `InvalidInputError` naming ``what``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(opener)
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidInputError(f"{what} is {width}x{height}, more than {MAX_IMAGE_PIXELS} pixels")
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidInputError(f"{what} is not a readable image ({type(exc).__name__})") from None


def _load_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise InvalidInputError(f"image {path} does not exist")
    return _decode(path, f"image {path}")


# -- Pick-a-Pic import --------------------------------------------------------------------------------------------


def read_pick_a_pic(path: str | Path, *, user: str | None = None) -> tuple[list[PreferencePair], ImportReport]:
    """Read Pick-a-Pic rows from a ``.parquet`` file (image bytes) or a ``.jsonl`` file (image paths relative to it).

    Returns the pairs (preferred first) and a report; ties are dropped and bad rows reported, never raised. With
    ``user`` only that user's rows are kept (a `NotFoundError` lists the users found when none match).
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"expected a preference file, found nothing at {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = _parquet_rows(path)
        images = _bytes_image
    elif suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path)
        images = _path_image(path.parent)
    else:
        raise InvalidInputError(f"expected a .parquet or .jsonl preference file, found {path.name}")
    report = ImportReport(source=path.name)
    pairs: list[PreferencePair] = []
    wanted = None if user is None else sanitize_user(user)
    seen_users: set[str] = set()
    for number, row in rows:
        if isinstance(row, RowProblem):
            report.problems.append(row)
            continue
        try:
            pair = _row_pair(row, images, f"{path.name}:{number}")
        except InvalidInputError as exc:
            report.problems.append(RowProblem(number, str(exc)))
            continue
        if pair is None:
            report.ties += 1
            continue
        seen_users.add(pair.user_id)
        if wanted is not None and pair.user_id != wanted:
            continue
        pairs.append(pair)
        report.users[pair.user_id] = report.users.get(pair.user_id, 0) + 1
    report.imported = len(pairs)
    for problem in report.problems:
        logger.warning("%s %s", path.name, problem)
    if wanted is not None and not pairs and seen_users:
        raise NotFoundError(
            f"expected pairs of user '{wanted}' in {path.name}, found users {', '.join(sorted(seen_users)[:10])}"
        )
    return pairs, report


def import_pick_a_pic(store: PreferenceStore, path: str | Path, *, user: str | None = None) -> ImportReport:
    """Read a Pick-a-Pic file (see `read_pick_a_pic`) and store its valid pairs per user."""
    pairs, report = read_pick_a_pic(path, user=user)
    store.add_pairs(pairs)
    return report


def load_pairs(source: str | Path, *, user: str | None = None) -> list[PreferencePair]:
    """Pairs from what ``studio train preference --pairs`` accepts: a Pick-a-Pic ``.parquet``/``.jsonl`` file, a
    store root (``home/preferences``, all users or ``user``) or one user's folder."""
    source = Path(source)
    if source.is_file():
        pairs, report = read_pick_a_pic(source, user=user)
        logger.info(report.summary())
        if not pairs:
            raise InvalidInputError(
                f"expected usable preference pairs in {source.name}, found none ({report.summary()})"
            )
        return pairs
    if (source / INDEX).is_file():
        return PreferenceStore(source.parent).pairs(user or source.name)
    if source.is_dir():
        store = PreferenceStore(source)
        users = [user] if user is not None else store.users()
        if not users:
            raise NotFoundError(f"expected preference pairs in {source}, found no user folders with {INDEX}")
        return [pair for name in users for pair in store.pairs(name)]
    raise NotFoundError(f"expected a preference file or folder, found nothing at {source}")


def _row_pair(row: Mapping[str, Any], images: Any, source: str) -> PreferencePair | None:
    """One row as a pair (preferred first), ``None`` for a tie; `InvalidInputError` says what is wrong with it."""
    # 1. The user.
    if USER_COLUMN not in row or row[USER_COLUMN] is None or row[USER_COLUMN] == "":
        other = [key for key in _OTHER_USER_COLUMNS if key in row]
        if other:
            raise InvalidInputError(f"expected the user in column '{USER_COLUMN}', found column '{other[0]}'")
        raise InvalidInputError(f"expected a '{USER_COLUMN}' column, found columns {sorted(row)}")
    user_id = sanitize_user(row[USER_COLUMN])
    # 2. The labels: 1 preferred, 0 not, 0.5 a tie; the two must agree.
    labels = []
    for key in ("label_0", "label_1"):
        value = row.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or float(value) not in VALID_LABELS:
            raise InvalidInputError(f"expected {key} to be 0, 0.5 or 1, found {value!r}")
        labels.append(float(value))
    if labels[0] + labels[1] != 1.0:
        raise InvalidInputError(f"expected label_0 and label_1 to sum to 1, found {labels[0]:g} and {labels[1]:g}")
    if labels[0] == 0.5:
        return None
    # 3. The caption and both images.
    caption = row.get("caption")
    if not isinstance(caption, str):
        raise InvalidInputError(f"expected a caption as text, found {caption!r}")
    pictures = [images(row.get(key), key) for key in ("jpg_0", "jpg_1")]
    preferred = 0 if labels[0] == 1.0 else 1
    return PreferencePair(user_id, caption, pictures[preferred], pictures[1 - preferred], source=source)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Mapping[str, Any] | RowProblem]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, RowProblem(number, f"expected a JSON object, found invalid JSON ({exc.msg})")
                continue
            if not isinstance(row, dict):
                yield number, RowProblem(number, f"expected a JSON object, found {type(row).__name__}")
                continue
            yield number, row


def _parquet_rows(path: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise NotAvailableError(
            f"reading {path.name} needs pyarrow (pip install pyarrow); JSONL with image files works without it"
        ) from None
    parquet = pq.ParquetFile(path)
    number = 0
    # Batches keep memory bounded: a Pick-a-Pic shard holds thousands of full-size images.
    for batch in parquet.iter_batches(batch_size=64):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _bytes_image(value: object, column: str) -> Image.Image:
    if isinstance(value, dict) and "bytes" in value:  # the Hugging Face datasets Image feature
        value = value["bytes"]
    if not isinstance(value, bytes | bytearray) or not value:
        raise InvalidInputError(f"expected image bytes in {column}, found {type(value).__name__}")
    return _decode(io.BytesIO(value), f"the image in {column}")


def _path_image(folder: Path) -> Any:
    def image(value: object, column: str) -> Image.Image:
        if not isinstance(value, str) or not value:
            raise InvalidInputError(f"expected an image path in {column}, found {value!r}")
        target = folder / value
        if not target.is_file():
            raise InvalidInputError(f"the image {value!r} in {column} does not exist (looked in {folder})")
        return _decode(target, f"the image {value!r} in {column}")

    return image
