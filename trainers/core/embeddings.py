"""Placeholder tokens for textual inversion: new words added next to a frozen embedding table.

A placeholder token such as ``<my-toy>`` with ``n`` vectors becomes ``n`` tokenizer tokens, ``<my-toy>``,
``<my-toy>_1``, ... ``<my-toy>_{n-1}`` (the names diffusers gives a multi-vector embedding), each with a row in every
text encoder's token-embedding table. The trained values do not live in that table: `TrainableRows` holds them as
one small ``[n, width]`` parameter and splices them into the embedding layer's output with a forward hook. So

- the table itself is never written by the optimizer (its weight keeps ``requires_grad=False``): every other row is
  unchanged by construction, and `table_digest` lets a trainer check that after training;
- the optimizer state is ``[n, width]``, not the whole 49,408-row table;
- the hook is removed by `TrainableRows.remove`, leaving the encoder as it was apart from the added rows.

::

    start = init_vector(tokenizer, encoder, "toy")
    ids = add_placeholder_tokens(tokenizer, encoder, vector_tokens("<my-toy>", 2), start)
    rows = TrainableRows(encoder, ids)
    before = table_digest(encoder, below=ids[0])
    ...  # train rows.weight
    assert table_digest(encoder, below=ids[0]) == before
    trained = rows.weight.detach().clone()   # [2, width]
    rows.remove()
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import torch
from torch import nn

from studio.errors import InvalidInputError

__all__ = [
    "MAX_VECTORS",
    "RESERVED_PREFIX",
    "TrainableRows",
    "add_placeholder_tokens",
    "expand_placeholder",
    "init_vector",
    "table_digest",
    "validate_placeholder_token",
    "vector_tokens",
    "word_token_ids",
]

MAX_VECTORS = 32
"""Most vectors per placeholder token: each takes one of the 75 prompt positions CLIP reads."""

RESERVED_PREFIX = "<studio-ti-"
"""The shared pipeline's own token names (`pipelines.kinds.embeddings`); a placeholder may not look like one."""

# Lower case because CLIP lower-cases prompts; no dots so the token can name a kohya "bundle_emb.<token>.*" key;
# angle brackets so that the word never collides with ordinary prompt text ("toy" vs "<my-toy>").
_PLACEHOLDER = re.compile(r"<[a-z0-9][a-z0-9_-]{0,62}>")


def validate_placeholder_token(token: str) -> str:
    """Return ``token`` if it is a namespaced placeholder such as ``<my-toy>``, else raise `InvalidInputError`.

    >>> validate_placeholder_token("<my-toy>")
    '<my-toy>'
    """
    if not isinstance(token, str) or not _PLACEHOLDER.fullmatch(token):
        raise InvalidInputError(
            "config key 'placeholder_token' expects a word in angle brackets made of a-z 0-9 _ - "
            f"(e.g. '<my-toy>'), got {token!r}"
        )
    if token.startswith(RESERVED_PREFIX):
        raise InvalidInputError(
            f"config key 'placeholder_token' may not start with '{RESERVED_PREFIX}' (reserved), got {token!r}"
        )
    return token


def vector_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """Tokenizer tokens of a placeholder with ``num_vectors`` vectors, named as diffusers names them.

    >>> vector_tokens("<my-toy>", 3)
    ['<my-toy>', '<my-toy>_1', '<my-toy>_2']
    """
    if not 1 <= num_vectors <= MAX_VECTORS:
        raise InvalidInputError(f"config key 'num_vectors' expects an int in [1, {MAX_VECTORS}], got '{num_vectors}'")
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def expand_placeholder(text: str, placeholder: str, num_vectors: int) -> str:
    """Write each occurrence of ``placeholder`` in ``text`` as its vector tokens (what diffusers does at inference).

    >>> expand_placeholder("a photo of <my-toy>", "<my-toy>", 2)
    'a photo of <my-toy> <my-toy>_1'
    """
    return text.replace(placeholder, " ".join(vector_tokens(placeholder, num_vectors)))


def word_token_ids(tokenizer: Any, word: str) -> list[int]:
    """The tokenizer's ids for ``word`` without the start and end tokens."""
    return list(tokenizer(word, add_special_tokens=False).input_ids)


def init_vector(tokenizer: Any, encoder: nn.Module, init_word: str) -> torch.Tensor:
    """The embedding a placeholder starts from: the init word's row, float32 on the CPU.

    A word the tokenizer splits into several tokens ("teddy bear", or a rare word split into pieces) starts from the
    mean of their rows: every piece carries part of the meaning, and the mean keeps the vector in the region of the
    table where words live. A word that gives no token at all is an error.
    """
    ids = word_token_ids(tokenizer, init_word)
    if not init_word.strip() or not ids:
        raise InvalidInputError(
            f"config key 'init_word' expects a word the tokenizer knows (e.g. 'toy'), got {init_word!r}"
        )
    if any(token_id >= _base_vocab_size(tokenizer) for token_id in ids):
        raise InvalidInputError(
            f"config key 'init_word' expects an ordinary word, not an added token, got {init_word!r}"
        )
    table = encoder.get_input_embeddings().weight
    return table.detach()[ids].to("cpu", torch.float32).mean(dim=0)


def _base_vocab_size(tokenizer: Any) -> int:
    return int(getattr(tokenizer, "vocab_size", len(tokenizer)))


def add_placeholder_tokens(tokenizer: Any, encoder: nn.Module, tokens: list[str], initial: torch.Tensor) -> list[int]:
    """Add ``tokens`` to the tokenizer and one row each to the encoder's table, set to ``initial`` (``[width]`` or
    ``[len(tokens), width]``); return their ids (consecutive, after every existing row).

    A token the tokenizer already has is an error: reusing its row would silently start from someone else's vectors.
    """
    existing = [token for token in tokens if token in tokenizer.get_vocab()]
    if existing:
        raise InvalidInputError(
            f"expected a new placeholder token, but the tokenizer already has {', '.join(existing)}; choose another"
        )
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise RuntimeError(f"the tokenizer added {added} of the tokens {tokens}")
    ids = tokenizer.convert_tokens_to_ids(tokens)
    # mean_resizing=False: the new rows are set right below; transformers' mean init would only cost time.
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = encoder.get_input_embeddings().weight
    if list(ids) != list(range(ids[0], ids[0] + len(tokens))) or ids[-1] != table.shape[0] - 1:
        raise RuntimeError(f"expected the new tokens at the end of the table, found ids {ids} of {table.shape[0]}")
    with torch.no_grad():
        rows = initial.expand(len(tokens), -1) if initial.dim() == 1 else initial
        table[ids[0] :] = rows.to(table.device, table.dtype)
    return list(ids)


class TrainableRows(nn.Module):
    """The rows of some token ids as a trainable ``[n, width]`` parameter, spliced into an encoder's embedding output.

    While attached, every position whose id is one of ``token_ids`` gets ``weight[k]`` instead of the table row, so
    gradients reach ``weight`` and nothing else of the table. ``weight`` is float32 (master weights under mixed
    precision) and is cast to the embedding output's dtype in the hook.

    >>> from studio.testing import build_tiny_sd1_pipeline
    >>> pipe = build_tiny_sd1_pipeline()
    >>> ids = add_placeholder_tokens(pipe.tokenizer, pipe.text_encoder, ["<x>"], torch.zeros(32))
    >>> rows = TrainableRows(pipe.text_encoder, ids)
    >>> rows.weight.shape
    torch.Size([1, 32])
    >>> rows.remove()
    """

    def __init__(self, encoder: nn.Module, token_ids: list[int], initial: torch.Tensor | None = None) -> None:
        super().__init__()
        if not token_ids or list(token_ids) != list(range(token_ids[0], token_ids[0] + len(token_ids))):
            raise ValueError(f"TrainableRows expects consecutive token ids, got {token_ids}")
        self.first_id = int(token_ids[0])
        self.count = len(token_ids)
        embedding = encoder.get_input_embeddings()
        start = embedding.weight.detach()[self.first_id : self.first_id + self.count]
        values = start if initial is None else initial
        self.weight = nn.Parameter(values.detach().to(embedding.weight.device, torch.float32).clone())
        # The table is frozen: only this parameter trains (a LoRA or an optimizer over the encoder cannot touch it).
        embedding.weight.requires_grad_(False)
        self._handle: Any = embedding.register_forward_hook(self._splice)

    def _splice(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        ids = inputs[0]
        index = ids - self.first_id
        hit = (index >= 0) & (index < self.count)
        if not bool(hit.any()):
            return output
        rows = self.weight.to(output.dtype)[index.clamp(0, self.count - 1)]
        return torch.where(hit.unsqueeze(-1), rows, output)

    @property
    def attached(self) -> bool:
        """Whether the hook is installed."""
        return self._handle is not None

    def write_to_table(self, encoder: nn.Module) -> None:
        """Copy the trained rows into the encoder's table, so the tokens work without the hook."""
        table = encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[self.first_id : self.first_id + self.count] = self.weight.detach().to(table.device, table.dtype)

    def remove(self) -> None:
        """Take the hook out (idempotent); the encoder then reads its table again."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def table_digest(encoder: nn.Module, *, below: int) -> str:
    """SHA-256 of the token-embedding rows ``0 .. below-1`` (the rows a placeholder must never change).

    >>> from studio.testing import build_tiny_sd1_pipeline
    >>> len(table_digest(build_tiny_sd1_pipeline().text_encoder, below=10))
    64
    """
    rows = encoder.get_input_embeddings().weight.detach()[:below].to("cpu").contiguous()
    digest = hashlib.sha256(f"{rows.dtype}:{tuple(rows.shape)}:".encode())
    digest.update(rows.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
