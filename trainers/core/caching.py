"""Cache VAE latents and frozen text-encoder outputs: each computed once, in batches, then reused every step.

Entries are keyed by a hash of what produced them (the image's pixels or the caption, plus a ``model_key`` naming the
model, e.g. the base model's fingerprint), so a changed image, caption or model is recomputed and nothing stale is
served. The cache lives in memory and, with ``cache_dir``, also as one safetensors file per entry::

    cache = TensorCache(home.cache / "latents")
    latents = cache_latents(vae, [dataset.pixels_uint8(i) for i in range(len(dataset))],
                            cache=cache, model_key=base.fingerprint)
    text = cache_text_embeddings(encode_prompts, dataset.captions, cache=TensorCache(), model_key=base.fingerprint)

``encode_prompts(captions) -> {"prompt_embeds": [B, T, D], ...}`` comes from the trainer (the model family knows
how its text encoders are called); every tensor in its result must have the batch as its first dimension.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    "TensorCache",
    "cache_latents",
    "cache_text_embeddings",
    "content_key",
    "encode_latents",
]

logger = logging.getLogger(__name__)

TextEncodeFn = Callable[[list[str]], Mapping[str, torch.Tensor]]


def content_key(*parts: str | bytes | torch.Tensor) -> str:
    """A hex SHA-256 over strings, bytes and tensors (dtype, shape and values), usable as a file name."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            tensor = part.detach().to("cpu").contiguous()
            digest.update(f"tensor:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(part, bytes):
            digest.update(b"bytes:" + len(part).to_bytes(8, "little") + part)
        else:
            encoded = str(part).encode("utf-8")
            digest.update(b"str:" + len(encoded).to_bytes(8, "little") + encoded)
    return digest.hexdigest()


class TensorCache:
    """Named groups of tensors (``key -> {name: tensor}``) in memory, mirrored to ``cache_dir`` when given.

    Disk files are written atomically (temp file + rename); an unreadable file is treated as a miss and rewritten.
    """

    def __init__(self, cache_dir: str | Path | None = None, *, kind: str = "tensors") -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.kind = kind
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def _file(self, key: str) -> Path:
        return Path(self.cache_dir or ".") / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The tensors stored under ``key``, or None."""
        found = self._memory.get(key)
        if found is None and self.cache_dir is not None and self._file(key).is_file():
            try:
                found = load_file(str(self._file(key)))
            except (OSError, SafetensorError) as error:
                logger.warning("ignoring unreadable cache file %s: %s", self._file(key), error)
                found = None
            if found is not None:
                self._memory[key] = found
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, key: str, tensors: Mapping[str, torch.Tensor], *, note: str = "") -> dict[str, torch.Tensor]:
        """Store CPU copies of ``tensors`` under ``key`` (and on disk); returns the stored copies."""
        stored = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
        self._memory[key] = stored
        if self.cache_dir is None:
            return stored
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        target = self._file(key)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        save_file(stored, str(tmp), metadata={"studio.cache_kind": self.kind, "studio.cache_key": key, "note": note})
        os.replace(tmp, target)
        return stored

    def __contains__(self, key: str) -> bool:
        return key in self._memory or (self.cache_dir is not None and self._file(key).is_file())

    def __len__(self) -> int:
        return len(self._memory)


@torch.no_grad()
def encode_latents(
    vae: Any, pixels: torch.Tensor, *, generators: Sequence[torch.Generator] | None = None
) -> torch.Tensor:
    """Latents of ``pixels`` (BCHW in [-1, 1]) as the U-Net sees them: ``(z - shift_factor) * scaling_factor``.

    ``z`` is the mean of the VAE's latent distribution (deterministic) or, with one generator per image, a sample.
    """
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist
    if generators is None:
        latents = dist.mean
    else:
        noise = torch.stack(
            [torch.randn(dist.mean.shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generators]
        )
        latents = dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype)
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * vae.config.scaling_factor


def cache_latents(
    vae: Any,
    images: Sequence[torch.Tensor],
    *,
    cache: TensorCache,
    model_key: str,
    batch_size: int = 8,
    sample_seed: int | None = None,
) -> list[torch.Tensor]:
    """Latents (CHW, on CPU) for each image, computing only the missing ones, batched by image size.

    ``images`` are uint8 CHW (what the dataset stores, hashed exactly) or float CHW in [-1, 1]. With
    ``sample_seed`` each image's latent is a sample drawn with a seed derived from that seed and the image, so the
    result does not depend on batching or order.
    """
    keys = [content_key("latents", model_key, str(sample_seed), image) for image in images]
    results: dict[int, torch.Tensor] = {}
    missing_by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, key in enumerate(keys):
        found = cache.get(key)
        if found is not None:
            results[index] = found["latents"]
        else:
            missing_by_shape.setdefault(tuple(images[index].shape), []).append(index)
    for indices in missing_by_shape.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            pixels = torch.stack([_as_unit_range(images[i]) for i in chunk])
            generators = None
            if sample_seed is not None:
                generators = [torch.Generator().manual_seed(int(keys[i][:15], 16)) for i in chunk]
            latents = encode_latents(vae, pixels, generators=generators)
            for i, latent in zip(chunk, latents, strict=True):
                results[i] = cache.put(keys[i], {"latents": latent}, note=f"model={model_key}")["latents"]
    return [results[i] for i in range(len(images))]


def _as_unit_range(image: torch.Tensor) -> torch.Tensor:
    if image.dtype == torch.uint8:
        return image.to(torch.float32) / 127.5 - 1.0
    return image.to(torch.float32)


@torch.no_grad()
def cache_text_embeddings(
    encode: TextEncodeFn,
    captions: Sequence[str],
    *,
    cache: TensorCache,
    model_key: str,
    batch_size: int = 16,
) -> dict[str, dict[str, torch.Tensor]]:
    """Frozen text-encoder outputs per distinct caption: ``{caption: {"prompt_embeds": [T, D], ...}}`` on CPU.

    ``encode`` is called on batches of captions not yet cached and must return tensors with the batch first.
    """
    distinct = list(dict.fromkeys(captions))
    results: dict[str, dict[str, torch.Tensor]] = {}
    missing: list[str] = []
    for caption in distinct:
        found = cache.get(content_key("text", model_key, caption))
        if found is not None:
            results[caption] = found
        else:
            missing.append(caption)
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        outputs = encode(list(chunk))
        for name, tensor in outputs.items():
            if tensor.shape[0] != len(chunk):
                raise ValueError(f"text encoder output {name!r} has batch {tensor.shape[0]}, expected {len(chunk)}")
        for row, caption in enumerate(chunk):
            key = content_key("text", model_key, caption)
            results[caption] = cache.put(key, {n: t[row] for n, t in outputs.items()}, note=f"model={model_key}")
    return results
