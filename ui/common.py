"""What every page shares: the page context, turning user errors into messages, and upload checks.

Pages stay thin: a handler checks what the browser sent, builds a typed request and makes one call into `studio`,
`pipelines` or the job queue.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr

from studio.errors import InvalidInputError, StudioError
from studio.home import StudioHome

logger = logging.getLogger(__name__)

BASE_MODEL_ENV = "STUDIO_BASE_MODEL"
# Uploads bigger than this are refused by Gradio before any handler runs (photos, adapter files).
MAX_UPLOAD = "200mb"
# A decompression bomb is refused before it is decoded: 64 megapixels is far past any training photo.
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_TRAINING_IMAGES = 200
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# One device, one queue: every handler that runs the base model shares this concurrency id (limit 1).
DEVICE = "device"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class PageContext:
    """What a page needs: the studio home and the base model generation uses (``tiny``, a folder or a file)."""

    home: StudioHome
    base_model: str = "tiny"

    @classmethod
    def create(cls, home: StudioHome, base_model: str | None = None) -> PageContext:
        """The context for ``home``; the base model from the argument, else ``$STUDIO_BASE_MODEL``, else ``tiny``."""
        return cls(home=home.ensure(), base_model=base_model or os.environ.get(BASE_MODEL_ENV) or "tiny")

    def service(self) -> Any:
        """The process's warm pipeline service for this base model and home."""
        from pipelines import shared_service

        return shared_service(self.base_model, self.home)


def user_errors(handler: F) -> F:
    """Show a `StudioError` as a message in the page (`gr.Error`); anything else is a bug and keeps its traceback
    in the server log, while the page shows Gradio's generic error."""

    @functools.wraps(handler)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except StudioError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    return wrapped  # type: ignore[return-value]


def upload_path(item: Any) -> Path:
    """The local path of one uploaded file (Gradio gives a path string or an object with ``.name``/``.path``)."""
    if isinstance(item, str | os.PathLike):
        return Path(item)
    for attribute in ("path", "name"):
        value = getattr(item, attribute, None)
        if isinstance(value, str):
            return Path(value)
    if isinstance(item, dict) and isinstance(item.get("path"), str):
        return Path(item["path"])
    raise InvalidInputError(f"expected an uploaded file, found {type(item).__name__}")


def check_image(path: Path, label: str | None = None) -> tuple[int, int]:
    """Open an uploaded image with Pillow (size limit first, then a full decode); returns ``(width, height)``."""
    from PIL import Image, UnidentifiedImageError

    label = label or path.name
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidInputError(
                    f"expected an image of at most {MAX_IMAGE_PIXELS} pixels, found {width}x{height} in '{label}'"
                )
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidInputError(f"expected an image file, found '{label}' that Pillow cannot read ({exc})") from None
    return width, height


def save_training_uploads(files: Sequence[Any] | None, home: StudioHome) -> Path:
    """Check uploaded training images (and ``.txt`` captions with the same stem) and copy them into a fresh folder
    ``home/uploads/<id>``; returns the folder. Nothing is kept if one file is refused."""
    if not files:
        raise InvalidInputError("expected training images (PNG, JPEG, WebP), found no uploaded files")
    images: list[Path] = []
    captions: list[Path] = []
    for item in files:
        path = upload_path(item)
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            images.append(path)
        elif suffix == ".txt":
            captions.append(path)
        else:
            kinds = ", ".join(IMAGE_SUFFIXES)
            raise InvalidInputError(f"expected images ({kinds}) or .txt captions, found '{path.name}'")
    if not images:
        raise InvalidInputError("expected at least one training image, found only captions")
    if len(images) > MAX_TRAINING_IMAGES:
        raise InvalidInputError(f"expected at most {MAX_TRAINING_IMAGES} training images, found {len(images)}")
    for path in images:
        check_image(path)
    stems = {path.stem for path in images}
    for caption in captions:
        if caption.stem not in stems:
            raise InvalidInputError(f"expected caption '{caption.name}' to share its name with an image, found none")
        try:
            caption.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError(f"expected caption '{caption.name}' as UTF-8 text") from None

    folder = home.root / "uploads" / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True)
    for index, path in enumerate(images + captions):
        # Gradio keeps upload names; sanitise them anyway, keeping image/caption stems paired.
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem) or f"file{index}"
        shutil.copyfile(path, folder / f"{stem}{path.suffix.lower()}")
    return folder


def seconds_text(seconds: float | None) -> str:
    """``1:05`` / ``2:03:04`` for a duration, ``-`` for unknown."""
    if seconds is None:
        return "-"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
