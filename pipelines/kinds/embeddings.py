"""Textual-inversion embeddings in the shared pipeline: tokens added once, prompts rewritten per request.

Users write an embedding's placeholder (``<cat-toy>``, from the file's metadata) or ``<adapter-name>`` in a prompt.
The vectors themselves live in the tokenizers and embedding tables under tokens that belong to the service:
``<studio-ti-0>``, ``<studio-ti-1>``, ... Each adapter gets its own tokens (one per vector), so two adapters whose
placeholder text is the same never share a row. Per request, the placeholders of the request's own embeddings are
rewritten to their tokens (``<cat-toy>`` -> ``<studio-ti-3> <studio-ti-4>`` for two vectors, the way diffusers
expands multi-vector embeddings); embeddings not in the request are never written into its prompt, so they cannot
affect it.

Why service tokens rather than the placeholder itself: tokens cannot be removed from a Hugging Face tokenizer, so
tokens named after adapters would pile up and keep matching their text after the adapter was evicted. Service tokens
are reused: an evicted adapter's tokens go back to a free list (their rows zeroed), and the tokenizers grow only to
the largest number of vectors held at once. The same tokens are added to every text encoder of the family (SDXL:
``clip_l`` rows to the first, ``clip_g`` rows to the second).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from studio.adapter_files import AdapterFile
from studio.errors import InvalidInputError

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "<studio-ti-"
TOKEN_FORMAT = TOKEN_PREFIX + "{}>"


@dataclass(frozen=True)
class EmbeddingUse:
    """One embedding in one request: its library name, the texts that refer to it, and its tokens."""

    name: str
    references: tuple[str, ...]
    tokens: tuple[str, ...]


def references_of(name: str, adapter: AdapterFile) -> tuple[str, ...]:
    """Texts a prompt may use for an embedding: its placeholder tokens, then ``<name>``."""
    references = [token for token in adapter.metadata.placeholder_tokens if token.strip()]
    references.append(f"<{name}>")
    return tuple(dict.fromkeys(references))


class EmbeddingSlots:
    """Textual-inversion vectors held in a pipeline's tokenizers and embedding tables.

    ``family`` is the base model's `studio.families.ModelFamily` (which text encoders, which tensor keys).
    """

    def __init__(self, pipeline: Any, family: Any) -> None:
        self.pipeline = pipeline
        self.family = family
        self._by_adapter: dict[str, tuple[str, ...]] = {}
        self._free: list[str] = []
        self._count = 0

    def tokens_of(self, name: str) -> tuple[str, ...] | None:
        """The service tokens of a loaded embedding."""
        return self._by_adapter.get(name)

    def loaded(self) -> list[str]:
        """Names of the embeddings whose vectors are in the pipeline."""
        return list(self._by_adapter)

    def ensure(self, name: str, adapter: AdapterFile) -> tuple[str, ...]:
        """Put the adapter's vectors into the embedding tables unless they are there; return its tokens."""
        if name in self._by_adapter:
            return self._by_adapter[name]
        vectors = self._vectors(name, adapter)
        tokens = self._take(vectors[0].shape[0])
        with torch.no_grad():
            for tokenizer, encoder, rows in zip(
                self.family.tokenizers(self.pipeline), self.family.text_encoders(self.pipeline), vectors, strict=True
            ):
                table = encoder.get_input_embeddings().weight
                ids = tokenizer.convert_tokens_to_ids(list(tokens))
                table[ids] = rows.to(device=table.device, dtype=table.dtype)
        self._by_adapter[name] = tokens
        logger.info("added embedding '%s' to the pipeline as %s", name, " ".join(tokens))
        return tokens

    def release(self, name: str) -> bool:
        """Take an embedding out: zero its rows and free its tokens. Return whether it was loaded."""
        tokens = self._by_adapter.pop(name, None)
        if tokens is None:
            return False
        with torch.no_grad():
            for tokenizer, encoder in zip(
                self.family.tokenizers(self.pipeline), self.family.text_encoders(self.pipeline), strict=True
            ):
                table = encoder.get_input_embeddings().weight
                table[tokenizer.convert_tokens_to_ids(list(tokens))] = 0
        self._free.extend(tokens)
        return True

    def _vectors(self, name: str, adapter: AdapterFile) -> list[torch.Tensor]:
        """The adapter's ``[n, width]`` tensors, one per text encoder, checked against the base model."""
        keys = self.family.embedding_keys
        widths = self.family.embedding_widths(self.pipeline)
        vectors = []
        for key, width in zip(keys, widths, strict=True):
            tensor = adapter.tensors.get(key)
            if tensor is None:
                found = ", ".join(sorted(adapter.tensors)) or "no tensors"
                raise InvalidInputError(
                    f"embedding '{name}' should hold '{key}' for {self.family.label}, found {found}"
                )
            if tensor.ndim == 1:
                tensor = tensor.unsqueeze(0)
            if tensor.ndim != 2 or tensor.shape[1] != width or tensor.shape[0] < 1:
                raise InvalidInputError(
                    f"embedding '{name}' should be [vectors, {width}] under '{key}' for this base model, "
                    f"found {list(tensor.shape)}"
                )
            vectors.append(tensor)
        if len({tensor.shape[0] for tensor in vectors}) != 1:
            counts = ", ".join(f"{key}: {tensor.shape[0]}" for key, tensor in zip(keys, vectors, strict=True))
            raise InvalidInputError(f"embedding '{name}' should have as many vectors per text encoder, found {counts}")
        return vectors

    def _take(self, count: int) -> tuple[str, ...]:
        """``count`` free tokens, adding new ones to every tokenizer and embedding table when needed."""
        missing = count - len(self._free)
        if missing > 0:
            new = [TOKEN_FORMAT.format(self._count + i) for i in range(missing)]
            self._count += missing
            for tokenizer, encoder in zip(
                self.family.tokenizers(self.pipeline), self.family.text_encoders(self.pipeline), strict=True
            ):
                added = tokenizer.add_tokens(new)
                if added != len(new):
                    raise RuntimeError(f"the tokenizer already had some of the tokens {new}")
                # mean_resizing=False: the new rows are overwritten with the adapter's vectors right away.
                encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            self._free.extend(new)
        # Lowest-numbered first, so that a request's tokens do not depend on eviction order more than needed.
        self._free.sort(key=lambda token: int(token.rsplit("-", 1)[1].rstrip(">")))
        taken, self._free = self._free[:count], self._free[count:]
        return tuple(taken)


def rewrite_prompts(prompts: Sequence[str], uses: Sequence[EmbeddingUse]) -> tuple[list[str], list[str]]:
    """Replace each embedding's references in ``prompts`` with its tokens; return (prompts, warnings).

    A reference shared by two embeddings of the request is ambiguous where a prompt uses it and raises
    `InvalidInputError`. References are matched without regard to case (CLIP lower-cases text), not inside words.
    """
    for prompt in prompts:
        if TOKEN_PREFIX in prompt.lower():
            # The service's own tokens may hold another request's embedding; they are never typed by users.
            raise InvalidInputError(f"expected a prompt without '{TOKEN_PREFIX}...' (reserved), found it in {prompt!r}")
    targets: dict[str, list[EmbeddingUse]] = {}
    for use in uses:
        for reference in use.references:
            users = targets.setdefault(reference.lower(), [])
            if use not in users:
                users.append(use)
    if not targets:
        return list(prompts), []
    alternatives = "|".join(re.escape(reference) for reference in sorted(targets, key=len, reverse=True))
    pattern = re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])", re.IGNORECASE)
    mentioned: set[str] = set()

    def replace(match: re.Match[str]) -> str:
        users = targets[match.group(0).lower()]
        if len(users) > 1:
            names = " or ".join(f"'<{use.name}>'" for use in users)
            raise InvalidInputError(
                f"'{match.group(0)}' refers to more than one embedding in this request; write {names} instead"
            )
        mentioned.add(users[0].name)
        return " ".join(users[0].tokens)

    rewritten = [pattern.sub(replace, prompt) for prompt in prompts]
    warnings = [
        f"embedding '{use.name}' is not used: its placeholder ({' or '.join(use.references)}) is not in the prompt"
        for use in uses
        if use.name not in mentioned
    ]
    return rewritten, warnings
