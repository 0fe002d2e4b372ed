"""LoRA adapters in the shared pipeline, through diffusers' peft integration.

Each LoRA is loaded into the pipeline once with ``pipe.load_lora_weights(state_dict, adapter_name=...)`` (diffusers
converts the kohya keys of our files) and stays resident; a request then only picks its set and weights with
``pipe.set_adapters``, which costs milliseconds. A request without LoRAs calls ``pipe.disable_lora()``: peft's
layers then return their base layer's output unchanged, so the images equal the stock pipeline's bit for bit.

The number of resident LoRAs is bounded; the least recently used one that the current request does not need is
deleted from the pipeline (``pipe.delete_adapters``) to make room. It stays parsed in the adapter cache, so loading
it again reads no file.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import Any

from studio.adapter_files import AdapterFile
from studio.errors import InvalidInputError

logger = logging.getLogger(__name__)

DEFAULT_MAX_RESIDENT = 8


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


class LoraSlots:
    """The LoRAs resident in one pipeline, keyed by library name, least recently used first.

    >>> from studio.testing import build_tiny_sd1_pipeline
    >>> slots = LoraSlots(build_tiny_sd1_pipeline())
    >>> slots.activate([])  # no LoRA: nothing to disable yet
    >>> slots.resident()
    []
    """

    def __init__(self, pipeline: Any, *, max_resident: int = DEFAULT_MAX_RESIDENT) -> None:
        if max_resident < 1:
            raise ValueError(f"max_resident must be >= 1, got {max_resident}")
        self.pipeline = pipeline
        self.max_resident = max_resident
        # library name -> name inside the pipeline. peft adapter names become module-dict keys, which may not contain
        # dots, and a replaced file must not reuse the old name while its layers are being deleted: hence a counter.
        self._resident: OrderedDict[str, str] = OrderedDict()
        self._counter = itertools.count()
        self.loads = 0
        """How many times a LoRA was loaded into the pipeline (cold loads and re-loads after eviction)."""

    def resident(self) -> list[str]:
        """Library names of the LoRAs in the pipeline, least recently used first."""
        return list(self._resident)

    def pipeline_name(self, name: str) -> str | None:
        """The adapter name inside the pipeline of a resident LoRA."""
        return self._resident.get(name)

    def ensure(self, name: str, adapter: AdapterFile, *, keep: Collection[str] = ()) -> str:
        """Load ``adapter`` into the pipeline unless it is resident; return its pipeline adapter name.

        Makes room first by deleting least-recently-used LoRAs not in ``keep``. A file whose keys do not fit the
        base model raises `InvalidInputError` and leaves nothing behind in the pipeline.
        """
        if name in self._resident:
            self._resident.move_to_end(name)
            return self._resident[name]
        self._make_room(keep={name, *keep})
        adapter_name = f"{re.sub(r'[^A-Za-z0-9_]', '_', name)}__{next(self._counter)}"
        try:
            # A shallow copy: diffusers pops keys from the dict while converting it; the tensors are not changed.
            self.pipeline.load_lora_weights(dict(adapter.tensors), adapter_name=adapter_name)
        except (ValueError, KeyError, RuntimeError) as exc:
            self._delete(adapter_name)
            raise InvalidInputError(
                f"LoRA '{name}' does not fit the base model (expected kohya keys of its modules with matching "
                f"shapes): {_first_line(exc)}"
            ) from exc
        self.loads += 1
        self._resident[name] = adapter_name
        logger.info("loaded LoRA '%s' into the pipeline as '%s'", name, adapter_name)
        return adapter_name

    def activate(self, weights: Sequence[tuple[str, float]]) -> None:
        """Make exactly these resident LoRAs (library name, weight) active; an empty list disables LoRA."""
        if not weights:
            if self._resident:
                self.pipeline.disable_lora()
            return
        names = [self._resident[name] for name, _ in weights]
        self.pipeline.enable_lora()
        self.pipeline.set_adapters(names, adapter_weights=[float(weight) for _, weight in weights])

    def remove(self, name: str) -> bool:
        """Delete a LoRA from the pipeline; return whether it was resident."""
        adapter_name = self._resident.pop(name, None)
        if adapter_name is None:
            return False
        self._delete(adapter_name)
        logger.info("deleted LoRA '%s' from the pipeline", name)
        return True

    def _make_room(self, keep: Collection[str]) -> None:
        for name in list(self._resident):
            if len(self._resident) < self.max_resident:
                return
            if name not in keep:
                self.remove(name)

    def _delete(self, adapter_name: str) -> None:
        present = {name for names in self.pipeline.get_list_adapters().values() for name in names}
        if adapter_name in present:
            self.pipeline.delete_adapters([adapter_name])
