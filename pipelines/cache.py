"""A least-recently-used cache of parsed adapter files with a memory budget.

An adapter file is read and checked once (`studio.adapter_files.load_adapter`), hashed once, and then served from RAM
until the cache needs the room. Switching between cached adapters never touches the file again; a cheap ``stat`` of
the path notices a file that was replaced under the same name and reloads it. When an entry is evicted the cache calls
``on_evict`` so that its owner (the pipeline service) can take the adapter out of the model too: nothing stays
resident in the pipeline once the cache has let go of it.

>>> import torch, tempfile, pathlib
>>> from studio.adapter_files import AdapterFile, AdapterMetadata, save_adapter
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = save_adapter(folder / "a.safetensors", AdapterFile({"emb_params": torch.zeros(1, 8)},
...                  AdapterMetadata(kind="textual_inversion", family="sd1", placeholder_tokens=["<a>"])))
>>> cache = AdapterCache(lambda name: folder / f"{name}.safetensors", budget_bytes=1 << 20)
>>> cache.get("a").adapter.metadata.kind, cache.get("a").adapter.metadata.kind, cache.reads
('textual_inversion', 'textual_inversion', 1)
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from studio.adapter_files import AdapterFile, load_adapter
from studio.errors import NotFoundError
from studio.formats import has_bundled_embedding, split_pivotal_adapter

logger = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20


@dataclass
class CachedAdapter:
    """One parsed adapter held in RAM: the file's content, where it came from and what it costs."""

    name: str
    path: Path
    adapter: AdapterFile
    sha256: str
    nbytes: int
    stamp: tuple[int, int]
    """(mtime_ns, size) of the file when it was read; a different stamp means the file was replaced."""
    _parts: tuple[AdapterFile, AdapterFile | None] | None = field(default=None, repr=False, compare=False)

    @property
    def kind(self) -> str:
        """The adapter kind from the file's metadata (``lora``, ``textual_inversion``, ``neti``, ``preference``)."""
        return self.adapter.metadata.kind

    def parts(self) -> tuple[AdapterFile, AdapterFile | None]:
        """A LoRA's weights and, for a pivotal-tuning bundle, its embedding (split once, then kept)."""
        if self._parts is None:
            if has_bundled_embedding(self.adapter):
                lora, embedding = split_pivotal_adapter(self.adapter)
                self._parts = (lora, embedding)
            else:
                self._parts = (self.adapter, None)
        return self._parts


def file_sha256(path: Path) -> str:
    """The sha256 of a file, as A1111 and civitai record adapter hashes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path) -> tuple[int, int]:
    try:
        info = path.stat()
    except FileNotFoundError as exc:
        raise NotFoundError(f"expected the adapter file '{path}', found nothing") from exc
    return info.st_mtime_ns, info.st_size


class AdapterCache:
    """LRU cache of parsed adapters under a byte budget (the sum of the adapters' tensor sizes).

    ``resolve`` turns an adapter name into its file path (raising `NotFoundError` for unknown names); ``loader``
    reads a file (tests pass a counting wrapper); ``on_evict`` is called with every entry that leaves the cache.
    Entries named in ``pinned`` (the adapters of the request being served) are never evicted, so a request can
    temporarily hold more than the budget; the next insertion brings the cache back under it.
    """

    def __init__(
        self,
        resolve: Callable[[str], Path],
        *,
        budget_bytes: int,
        loader: Callable[[Path], AdapterFile] = load_adapter,
        on_evict: Callable[[CachedAdapter], None] | None = None,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._resolve = resolve
        self._loader = loader
        self._on_evict = on_evict
        self._entries: OrderedDict[str, CachedAdapter] = OrderedDict()
        # Re-entrant: on_evict callbacks may ask the cache what it holds.
        self._lock = threading.RLock()
        self.reads = 0
        """How many adapter files have been read (each read parses and hashes one file)."""
        self.evictions = 0

    # -- queries ---------------------------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """Bytes held by the cached adapters' tensors."""
        with self._lock:
            return sum(entry.nbytes for entry in self._entries.values())

    def names(self) -> list[str]:
        """Cached adapter names, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # -- use -------------------------------------------------------------------------------------------------------

    def get(self, name: str, *, pinned: Collection[str] = ()) -> CachedAdapter:
        """The parsed adapter ``name``, read from its file only when it is not cached (or the file changed).

        Marks it most recently used and then evicts least-recently-used entries, except those in ``pinned`` and
        ``name`` itself, until the cache fits its budget.
        """
        path = Path(self._resolve(name))
        stamp = _stamp(path)
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and (entry.path != path or entry.stamp != stamp):
                logger.info("adapter '%s' changed on disk; reading it again", name)
                self._evict(name)
                entry = None
            if entry is None:
                entry = self._read(name, path, stamp)
                self._entries[name] = entry
            self._entries.move_to_end(name)
            self._shrink(keep={name, *pinned})
            return entry

    def evict(self, name: str) -> bool:
        """Drop ``name`` from the cache (calling ``on_evict``); return whether it was cached."""
        with self._lock:
            if name not in self._entries:
                return False
            self._evict(name)
            return True

    def clear(self) -> None:
        """Evict everything."""
        with self._lock:
            for name in list(self._entries):
                self._evict(name)

    # -- internals -------------------------------------------------------------------------------------------------

    def _read(self, name: str, path: Path, stamp: tuple[int, int]) -> CachedAdapter:
        adapter = self._loader(path)
        self.reads += 1
        nbytes = sum(tensor.numel() * tensor.element_size() for tensor in adapter.tensors.values())
        logger.info("read adapter '%s' (%d bytes of tensors) from %s", name, nbytes, path)
        return CachedAdapter(
            name=name, path=path, adapter=adapter, sha256=file_sha256(path), nbytes=nbytes, stamp=stamp
        )

    def _shrink(self, keep: Collection[str]) -> None:
        used = sum(entry.nbytes for entry in self._entries.values())
        for name in list(self._entries):  # least recently used first
            if used <= self.budget_bytes:
                break
            if name in keep:
                continue
            used -= self._entries[name].nbytes
            self._evict(name)

    def _evict(self, name: str) -> None:
        entry = self._entries.pop(name)
        self.evictions += 1
        logger.info("evicted adapter '%s' from the cache", name)
        if self._on_evict is not None:
            self._on_evict(entry)


def library_resolver(source: object) -> Callable[[str], Path]:
    """Turn an adapter source into ``name -> path``: a callable is used as is; an object with ``path(name)`` (the
    `studio.library.AdapterLibrary`) is asked for the path; a folder maps ``name`` to ``<folder>/<name>.safetensors``.
    """
    if isinstance(source, str | os.PathLike):
        folder = Path(source)

        def in_folder(name: str) -> Path:
            path = folder / f"{name}.safetensors"
            if not path.is_file():
                raise NotFoundError(f"expected an adapter named '{name}' in {folder}, found none")
            return path

        return in_folder
    path_of = getattr(source, "path", None)
    if callable(path_of):
        return lambda name: Path(path_of(name))
    if callable(source):
        return lambda name: Path(source(name))
    raise TypeError(f"expected a callable name -> path, an adapter library or a folder, got {type(source).__name__}")
