"""The adapter library: one ``<name>.safetensors`` per adapter in the studio home's ``adapters/`` folder.

Names are sanitised (``[A-Za-z0-9._-]``, no leading dot, no ``..``) so a name can never point outside the library, and
a taken name is an error, never an overwrite. Imports are checked in full (format, NaN/Inf, family and shapes against
the base model) before anything is written, and the write itself is atomic.

>>> import tempfile, pathlib
>>> from studio.home import StudioHome
>>> library = AdapterLibrary(StudioHome(pathlib.Path(tempfile.mkdtemp())))
>>> library.list()
[]
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.adapter_files import (
    AdapterFile,
    AdapterMetadata,
    load_adapter,
    read_header,
    save_adapter,
)
from studio.errors import (
    AlreadyExistsError,
    FamilyMismatchError,
    InvalidInputError,
    NotFoundError,
    StudioError,
)
from studio.families import family_by_name
from studio.formats import export_adapter, import_adapter
from studio.home import StudioHome

if TYPE_CHECKING:
    from studio.base_models import BaseModel

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
_MAX_NAME = 100


def sanitize_name(name: str) -> str:
    """Return ``name`` if it is a safe adapter name, else raise `InvalidInputError`.

    Allowed: 1-100 characters from ``A-Z a-z 0-9 . _ -``, not starting with a dot, without ``..``.

    >>> sanitize_name("my-dog_v1.2")
    'my-dog_v1.2'
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.startswith(".") or ".." in name:
        raise InvalidInputError(
            f"an adapter name needs 1-{_MAX_NAME} characters from A-Z a-z 0-9 . _ - without a leading dot or '..', "
            f"got {name!r}"
        )
    return name


def name_from_file(path: Path) -> str:
    """A safe adapter name derived from a file name (``My Style (v2).pt`` -> ``My-Style-v2``)."""
    stem = path.name.removesuffix(path.suffix) if path.suffix else path.name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem)
    name = re.sub(r"\.{2,}", ".", name).strip("-.")[:_MAX_NAME].rstrip("-.")
    return name or "adapter"


@dataclass
class AdapterInfo:
    """What ``studio adapters list/show`` prints about one adapter (plain values, JSON-ready via `to_dict`)."""

    name: str
    kind: str
    family: str
    base_model: str
    base_fingerprint: str
    placeholder_tokens: list[str]
    path: str
    size_bytes: int
    created: str
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)


def check_compatible(adapter: AdapterFile, base: BaseModel, source: str = "the adapter") -> None:
    """Raise unless ``adapter`` fits ``base``: same family, LoRA modules present with matching shapes, embedding widths.

    The family check comes first so that the message names both families rather than a shape.
    """
    meta = adapter.metadata
    family = family_by_name(meta.family)
    if family.name != base.family.name:
        # Every family label starts with "S" ("an SDXL", "an SD1.x").
        raise FamilyMismatchError(
            f"{source} is an {family.label} adapter but the base model '{base.name}' is {base.family.label}"
        )
    if meta.kind == "lora":
        _check_lora_shapes(adapter, base, source)
    elif meta.kind == "textual_inversion":
        _check_embedding_widths(adapter, base, source)


def _check_lora_shapes(adapter: AdapterFile, base: BaseModel, source: str) -> None:
    table = base.shape_table()
    tensors = adapter.tensors
    for key, down in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        module = key.removesuffix(".lora_down.weight")
        if module not in table:
            raise InvalidInputError(
                f"{source} adapts '{module}', which the base model '{base.name}' ({base.family.label}) does not have"
            )
        up = tensors[f"{module}.lora_up.weight"]
        expected = table[module]
        found_out, found_in = int(up.shape[0]), int(down.shape[1])
        kernel_ok = tuple(down.shape[2:]) == tuple(expected[2:]) and down.dim() == len(expected)
        if (found_out, found_in) != tuple(expected[:2]) or not kernel_ok:
            found = [found_out, found_in, *(int(size) for size in down.shape[2:])]
            raise InvalidInputError(
                f"{source}: LoRA module '{module}' makes a {found} update but the base model "
                f"'{base.name}' has a {list(expected)} weight there"
            )


def _check_embedding_widths(adapter: AdapterFile, base: BaseModel, source: str) -> None:
    keys = base.family.embedding_keys
    for key, width in zip(keys, base.embedding_widths, strict=True):
        if key not in adapter.tensors:
            raise InvalidInputError(f"{source} has no '{key}' embedding, which {base.family.label} needs")
        found = int(adapter.tensors[key].shape[-1])
        if found != width:
            raise InvalidInputError(
                f"{source}: embedding '{key}' is {found} wide but the base model '{base.name}' expects {width}"
            )


class AdapterLibrary:
    """The adapters in a studio home: add, import, list, show, load, export, remove.

    >>> import tempfile, pathlib, torch
    >>> from studio.adapter_files import AdapterFile, AdapterMetadata
    >>> from studio.home import StudioHome
    >>> library = AdapterLibrary(StudioHome(pathlib.Path(tempfile.mkdtemp())))
    >>> meta = AdapterMetadata(kind="textual_inversion", family="sd1", placeholder_tokens=["<cat>"])
    >>> library.add(AdapterFile({"emb_params": torch.zeros(1, 32)}, meta), "cat").placeholder_tokens
    ['<cat>']
    >>> [info.name for info in library.list()]
    ['cat']
    """

    def __init__(self, home: StudioHome) -> None:
        self.home = home

    @property
    def folder(self) -> Path:
        """The library folder (``<home>/adapters``)."""
        return self.home.adapters

    def path(self, name: str) -> Path:
        """The file of adapter ``name``; `NotFoundError` if there is none."""
        path = self.folder / f"{sanitize_name(name)}{SUFFIX}"
        if not path.is_file():
            raise NotFoundError(f"no adapter named '{name}' in {self.folder}; see `studio adapters list`")
        return path

    def exists(self, name: str) -> bool:
        """Whether an adapter called ``name`` exists."""
        return (self.folder / f"{sanitize_name(name)}{SUFFIX}").is_file()

    def add(self, adapter: AdapterFile, name: str) -> AdapterInfo:
        """Store ``adapter`` under ``name`` (atomic; `AlreadyExistsError` if the name is taken)."""
        name = sanitize_name(name)
        target = self.folder / f"{name}{SUFFIX}"
        if target.exists():
            raise _taken(name)
        stored = AdapterFile(adapter.tensors, replace(adapter.metadata, name=name))
        try:
            # overwrite=False: a concurrent writer that took the name in the meantime wins, we fail cleanly.
            save_adapter(target, stored, overwrite=False)
        except FileExistsError as exc:
            raise _taken(name) from exc
        logger.info("added %s adapter '%s' to the library", stored.metadata.kind, name)
        return self._info(target)

    def import_file(self, path: str | Path, name: str | None = None, base: BaseModel | None = None) -> AdapterInfo:
        """Import an adapter file in any supported format (see `studio.formats`) under ``name`` (default: file name).

        With ``base`` the adapter is checked against the base model (family, shapes) before anything is written.
        """
        path = Path(path)
        # 1. Check the name first: a bad or taken name should not cost a file read.
        name = sanitize_name(name) if name is not None else name_from_file(path)
        if self.exists(name):
            raise _taken(name)
        # 2. Read, check and convert the whole file.
        adapter = import_adapter(path, base=base)
        if base is not None:
            check_compatible(adapter, base, source=path.name)
        # 3. Only now write it.
        return self.add(adapter, name)

    def list(self) -> list[AdapterInfo]:
        """Every adapter, sorted by name. Unreadable files are skipped with a warning."""
        if not self.folder.is_dir():
            return []
        infos = []
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            if path.name.startswith("."):
                continue  # temporary files of writes in progress
            try:
                infos.append(self._info(path))
            except StudioError as exc:
                logger.warning("skipping %s: %s", path.name, exc)
        return infos

    def show(self, name: str) -> AdapterInfo:
        """The metadata of adapter ``name``."""
        return self._info(self.path(name))

    def load(self, name: str) -> AdapterFile:
        """Read and check adapter ``name``."""
        return load_adapter(self.path(name))

    def export(self, name: str, fmt: str, out: str | Path) -> list[Path]:
        """Write adapter ``name`` as ``kohya``, ``diffusers`` or ``a1111`` to ``out``; returns the files written."""
        adapter = self.load(name)
        return export_adapter(adapter, fmt, Path(out), family_by_name(adapter.metadata.family))

    def remove(self, name: str) -> None:
        """Delete adapter ``name``."""
        self.path(name).unlink()
        logger.info("removed adapter '%s'", name)

    def _info(self, path: Path) -> AdapterInfo:
        header = read_header(path)
        meta = AdapterMetadata.from_header(header, source=path.name)
        return AdapterInfo(
            name=path.name.removesuffix(SUFFIX),
            kind=meta.kind,
            family=meta.family,
            base_model=meta.base_model,
            base_fingerprint=meta.base_fingerprint,
            placeholder_tokens=list(meta.placeholder_tokens),
            path=str(path),
            size_bytes=path.stat().st_size,
            created=meta.created,
            metadata=dict(header),
        )


def _taken(name: str) -> AlreadyExistsError:
    return AlreadyExistsError(f"an adapter named '{name}' already exists; choose another --name or remove it first")
