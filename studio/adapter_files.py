"""Adapter files: one safetensors file per adapter, with the studio's metadata in the header.

This is the only module that reads or writes adapter files. Writes are atomic (a temporary file in the same folder,
flushed and fsync'ed, then renamed over the target), so a crash never leaves half a file under an adapter's name.
Reads check the file before trusting it: the safetensors header is parsed here first so that a truncated file or a
header that lies about its offsets gets a clear one-line `CorruptFileError`, and NaN/Inf weights are refused.
Pickles (``.pt``, ``.bin``, ``.ckpt``) are read only through `safe_torch_load`, which never runs code from the file.

>>> import torch, tempfile, pathlib
>>> meta = AdapterMetadata(kind="textual_inversion", family="sd1", placeholder_tokens=["<cat>"])
>>> path = pathlib.Path(tempfile.mkdtemp()) / "cat.safetensors"
>>> _ = save_adapter(path, AdapterFile({"emb_params": torch.zeros(1, 32)}, meta))
>>> load_adapter(path).metadata.placeholder_tokens
['<cat>']
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import struct
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from studio.errors import CorruptFileError, InvalidInputError, NotFoundError, UnsafeFileError

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
KINDS = ("lora", "textual_inversion", "neti", "preference")
FAMILIES = ("sd1", "sd2", "sdxl")

# Header keys written by the studio (see ARCHITECTURE.md, "Adapter files").
KEY_FORMAT_VERSION = "studio.format_version"
KEY_KIND = "studio.kind"
KEY_FAMILY = "studio.family"
KEY_BASE_MODEL = "studio.base_model"
KEY_BASE_FINGERPRINT = "studio.base_fingerprint"
KEY_PLACEHOLDER_TOKENS = "studio.placeholder_tokens"
KEY_CONFIG = "studio.config"
KEY_CREATED = "studio.created"
KEY_NAME = "studio.name"
STUDIO_PREFIX = "studio."

# Bytes per element of every dtype the safetensors format defines; used to check header offsets by hand.
_DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# A header larger than this is not an adapter (safetensors itself caps headers at 100 MB).
_MAX_HEADER_BYTES = 100_000_000


def utc_now() -> str:
    """The current time as ISO-8601 UTC with seconds, e.g. ``2025-01-31T12:00:00Z``."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class AdapterMetadata:
    """What the studio knows about an adapter, stored as ``studio.*`` strings in the safetensors header.

    ``extra`` holds foreign header keys (kohya's ``ss_*``, Stability's ``modelspec.*``, ...) verbatim, so that an
    imported file keeps its card when exported again.

    >>> meta = AdapterMetadata(kind="lora", family="sd1", placeholder_tokens=["sks"])
    >>> AdapterMetadata.from_header(meta.to_header()).placeholder_tokens
    ['sks']
    """

    kind: str
    family: str
    base_model: str = ""
    base_fingerprint: str = ""
    placeholder_tokens: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=utc_now)
    format_version: str = FORMAT_VERSION
    name: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidInputError(f"adapter kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.family not in FAMILIES:
            raise InvalidInputError(f"adapter family must be one of {', '.join(FAMILIES)}, got {self.family!r}")

    def to_header(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` dict: our ``studio.*`` keys plus the foreign keys in ``extra``."""
        header = {key: str(value) for key, value in self.extra.items()}
        header.update(
            {
                KEY_FORMAT_VERSION: self.format_version,
                KEY_KIND: self.kind,
                KEY_FAMILY: self.family,
                KEY_BASE_MODEL: self.base_model,
                KEY_BASE_FINGERPRINT: self.base_fingerprint,
                KEY_PLACEHOLDER_TOKENS: json.dumps(list(self.placeholder_tokens)),
                KEY_CONFIG: json.dumps(self.config, sort_keys=True, default=str),
                KEY_CREATED: self.created,
                KEY_NAME: self.name,
            }
        )
        return header

    @classmethod
    def from_header(cls, header: dict[str, str], source: str = "header") -> AdapterMetadata:
        """Parse a header written by `to_header`; raise `CorruptFileError` when a studio key is missing or malformed.

        ``source`` names the file in error messages.
        """
        if KEY_KIND not in header:
            raise InvalidInputError(
                f"{source} is not a studio adapter file (its header has no {KEY_KIND}); "
                "import foreign files with `studio adapters import`"
            )
        version = header.get(KEY_FORMAT_VERSION, "")
        if version != FORMAT_VERSION:
            raise CorruptFileError(
                f"{source} has studio format version {version!r}; this studio reads version {FORMAT_VERSION!r}"
            )
        kind = header[KEY_KIND]
        if kind not in KINDS:
            raise CorruptFileError(f"{source} says its kind is {kind!r}; expected one of {', '.join(KINDS)}")
        family = header.get(KEY_FAMILY, "")
        if family not in FAMILIES:
            raise CorruptFileError(f"{source} says its family is {family!r}; expected one of {', '.join(FAMILIES)}")
        tokens = _parse_json(header.get(KEY_PLACEHOLDER_TOKENS, "[]"), KEY_PLACEHOLDER_TOKENS, source)
        if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
            raise CorruptFileError(
                f"{source}: {KEY_PLACEHOLDER_TOKENS} should be a JSON list of strings, got {tokens!r}"
            )
        config = _parse_json(header.get(KEY_CONFIG, "{}"), KEY_CONFIG, source)
        if not isinstance(config, dict):
            raise CorruptFileError(f"{source}: {KEY_CONFIG} should be a JSON object, got {type(config).__name__}")
        return cls(
            kind=kind,
            family=family,
            base_model=header.get(KEY_BASE_MODEL, ""),
            base_fingerprint=header.get(KEY_BASE_FINGERPRINT, ""),
            placeholder_tokens=tokens,
            config=config,
            created=header.get(KEY_CREATED, ""),
            format_version=version,
            name=header.get(KEY_NAME, ""),
            extra={key: value for key, value in header.items() if not key.startswith(STUDIO_PREFIX)},
        )


def _parse_json(text: str, key: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{source}: {key} should be JSON but is not ({exc.msg})") from exc


@dataclass
class AdapterFile:
    """An adapter as a value: its tensors (layout per kind, see ARCHITECTURE.md) and its metadata."""

    tensors: dict[str, torch.Tensor]
    metadata: AdapterMetadata


def save_adapter(path: str | os.PathLike[str], adapter: AdapterFile, *, overwrite: bool = True) -> Path:
    """Write ``adapter`` to ``path`` atomically and return the path.

    The tensors are written contiguous and on the CPU. With ``overwrite=False`` an existing file raises
    `FileExistsError` instead of being replaced (the check and the rename are one atomic step).

    >>> import torch, tempfile, pathlib
    >>> meta = AdapterMetadata(kind="textual_inversion", family="sd1")
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> out = save_adapter(folder / "a.safetensors", AdapterFile({"emb_params": torch.ones(1, 4)}, meta))
    >>> out.name
    'a.safetensors'
    """
    path = Path(path)
    tensors = {}
    for key, tensor in adapter.tensors.items():
        # clone(): safetensors refuses tensors that share storage (views of one parameter); adapters are small.
        tensors[key] = tensor.detach().to("cpu").contiguous().clone()
    check_finite(tensors, f"adapter for {path.name}")
    data = safetensors.torch.save(tensors, metadata=adapter.metadata.to_header())

    path.parent.mkdir(parents=True, exist_ok=True)
    # 1. Write a temporary file next to the target so that the rename stays on one filesystem (atomic).
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # 2. Move it into place: replace, or link (fails if the name is taken) and drop the temporary name.
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(folder: Path) -> None:
    """Make renames inside ``folder`` durable (POSIX); a no-op where directories cannot be synced (Windows)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_header(path: str | os.PathLike[str]) -> dict[str, str]:
    """Check a safetensors file's layout and return its ``__metadata__`` (string to string; empty when absent).

    Raises `NotFoundError` for a missing file and `CorruptFileError` for a file that is not safetensors, is truncated,
    or whose header lies about its tensors' offsets. The tensors themselves are not read.
    """
    metadata, _ = _check_safetensors_layout(Path(path))
    return metadata


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read any safetensors file after checking it: ``(tensors on CPU, header metadata)``.

    Used for foreign files too (`studio.formats`); raises `CorruptFileError` on a bad layout or NaN/Inf values.
    """
    path = Path(path)
    metadata, _ = _check_safetensors_layout(path)
    try:
        tensors = safetensors.torch.load_file(path, device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise CorruptFileError(f"{path.name} could not be read as safetensors ({_first_line(exc)})") from exc
    check_finite(tensors, path.name)
    return tensors, metadata


def load_adapter(path: str | os.PathLike[str]) -> AdapterFile:
    """Read and check a studio adapter file (layout, NaN/Inf, known kind and family).

    >>> import torch, tempfile, pathlib
    >>> meta = AdapterMetadata(kind="lora", family="sd1")
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> p = save_adapter(folder / "l.safetensors", AdapterFile({"x.alpha": torch.tensor(4.0)}, meta))
    >>> load_adapter(p).metadata.kind
    'lora'
    """
    path = Path(path)
    tensors, header = read_safetensors(path)
    return AdapterFile(tensors=tensors, metadata=AdapterMetadata.from_header(header, source=path.name))


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise `CorruptFileError` naming the first floating tensor that holds NaN or Inf."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            raise CorruptFileError(f"{source}: tensor '{key}' holds {bad} values; expected finite weights")


def safe_torch_load(path: str | os.PathLike[str]) -> Any:
    """Load a torch pickle (``.pt``, ``.bin``, ``.ckpt``) with ``weights_only=True`` on the CPU.

    Code in the pickle never runs: anything beyond tensors and plain containers is refused with `UnsafeFileError`.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"no file at {path}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    # torch files are zip archives (torch >= 1.6) or bare pickles (protocol byte 0x80); anything else is not one.
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise CorruptFileError(f"{path.name} is not a torch file ({_describe_magic(magic, 9)})")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"{path.name} needs more than tensors and plain containers to load (refused: {_refusal_reason(exc)})"
        ) from exc
    except (RuntimeError, EOFError, ValueError, struct.error) as exc:
        raise CorruptFileError(f"{path.name} is not a readable torch file ({_first_line(exc)})") from exc


def _refusal_reason(exc: pickle.UnpicklingError) -> str:
    # torch wraps the weights-only unpickler's error in a long explanation; the inner error names the culprit.
    inner = exc.__context__ if isinstance(exc.__context__, pickle.UnpicklingError) else exc
    text = _first_line(inner)
    found = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    if found:
        return f"it calls {found.group(1)}"
    return text


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def _check_safetensors_layout(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Parse the 8-byte header length and the JSON header by hand and check every tensor's offsets.

    safetensors checks this too, but its errors ("MetadataIncompleteBuffer") don't tell a user what is wrong.
    Returns ``(metadata, tensor entries)``.
    """
    if not path.is_file():
        raise NotFoundError(f"no file at {path}")
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(9)
        if len(prefix) < 9 or prefix[8:9] != b"{":
            raise CorruptFileError(f"{path.name} is not a safetensors file ({_describe_magic(prefix, size)})")
        (header_len,) = struct.unpack("<Q", prefix[:8])
        if header_len > _MAX_HEADER_BYTES:
            raise CorruptFileError(f"{path.name} is not a safetensors file (header length {header_len} is implausible)")
        if 8 + header_len > size:
            raise CorruptFileError(
                f"{path.name} is truncated: its header says the JSON header is {header_len} bytes "
                f"but only {size - 8} bytes follow"
            )
        handle.seek(8)
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path.name} is not a safetensors file (its header is not valid JSON)") from exc
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path.name} is not a safetensors file (its header is not a JSON object)")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptFileError(f"{path.name}: header metadata should map strings to strings")

    data_len = size - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or {"dtype", "shape", "data_offsets"} - entry.keys():
            raise CorruptFileError(f"{path.name}: header entry '{name}' lacks dtype, shape or data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPE_SIZES:
            raise CorruptFileError(f"{path.name}: header says tensor '{name}' has dtype {dtype!r}, which is unknown")
        if not _is_int_list(shape) or any(dim < 0 for dim in shape):
            raise CorruptFileError(f"{path.name}: header says tensor '{name}' has shape {shape!r}, not a list of sizes")
        if not _is_int_list(offsets) or len(offsets) != 2:
            raise CorruptFileError(f"{path.name}: header gives tensor '{name}' offsets {offsets!r}, not [begin, end]")
        begin, end = offsets
        expected = math.prod(shape) * _DTYPE_SIZES[dtype]
        if begin < 0 or end < begin:
            raise CorruptFileError(
                f"{path.name}: header says tensor '{name}' spans bytes {begin}..{end}, which is empty"
            )
        if end - begin != expected:
            raise CorruptFileError(
                f"{path.name}: header says tensor '{name}' is {dtype} {shape} ({expected} bytes) "
                f"but its offsets span {end - begin} bytes"
            )
        if end > data_len:
            raise CorruptFileError(
                f"{path.name}: header says tensor '{name}' ends at byte {end} of the data "
                f"but the file holds only {data_len} data bytes (truncated?)"
            )
        spans.append((begin, end, name))

    # Tensors must tile the data section without overlap or gaps; a gap or an overlap means the header lies.
    spans.sort()
    position = 0
    previous = ""
    for begin, end, name in spans:
        if begin < position:
            raise CorruptFileError(
                f"{path.name}: header says tensor '{name}' starts at byte {begin} "
                f"but '{previous}' runs to byte {position}"
            )
        if begin > position:
            raise CorruptFileError(
                f"{path.name}: header says tensor '{name}' starts at byte {begin} "
                f"but the previous tensor ends at byte {position}"
            )
        position, previous = end, name
    if position != data_len:
        raise CorruptFileError(f"{path.name}: header accounts for {position} data bytes but the file holds {data_len}")
    return metadata, header


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _describe_magic(prefix: bytes, size: int) -> str:
    if size < 9:
        return f"only {size} bytes"
    if prefix.startswith(b"\x89PNG"):
        return "it is a PNG image"
    if prefix[:3] == b"\xff\xd8\xff":
        return "it is a JPEG image"
    if prefix.startswith(b"PK\x03\x04"):
        return "it is a zip archive, such as a torch .pt file"
    if prefix[:1] == b"\x80":
        return "it is a pickle"
    return "its first bytes match no known format"
