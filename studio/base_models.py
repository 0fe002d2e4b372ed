"""Base models: one loader for the embedded tiny model, diffusers folders, single-file checkpoints and hub ids.

>>> base_model = load_base_model("tiny")  # doctest: +SKIP
>>> base_model.family.label, len(base_model.fingerprint)  # doctest: +SKIP
('SD1.x', 16)

The pipeline is returned on the CPU; the caller moves it to a device. The model family is detected once, here.

Fingerprints
------------
A fingerprint names the exact weights an adapter was trained on (16 hex chars of a sha256). For a model on disk it
hashes the files that define it (configs, tokenizer files and weights), so it does not depend on the ``torch_dtype``
the model was loaded with. Hashing gigabytes takes seconds, so it is computed only when first asked for, memoised for
the process, and cached on disk in ``<cache_dir>/base_fingerprints.json`` keyed by path, size and mtime of every file.
``cache_dir`` is the argument, else ``$STUDIO_CACHE_DIR``, else ``~/.cache/personalization-studio``. For a pipeline
built in memory (`BaseModel.from_pipeline`) it hashes the component configs and tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from studio.errors import InvalidInputError, NotFoundError, UnsafeFileError
from studio.families import PEFT_ADAPTER_PARTS, ModelFamily, detect_family, iter_lora_layers
from studio.testing import tiny_model_path

logger = logging.getLogger(__name__)

TINY = "tiny"
FINGERPRINT_CACHE_FILE = "base_fingerprints.json"
CACHE_ENV_VAR = "STUDIO_CACHE_DIR"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# Files that define a diffusers model folder; README files, images and hidden files do not change the model.
_MODEL_FILE_SUFFIXES = (".json", ".txt", ".safetensors", ".bin", ".ckpt", ".pt", ".model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A single-file checkpoint holds the U-Net under this prefix (original LDM/SGM layout).
_CHECKPOINT_UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
_CHECKPOINT_SDXL_PREFIX = "conditioner.embedders.1."

# Fingerprints already computed in this process, by file signature.
_FINGERPRINTS: dict[str, str] = {}


@dataclass(eq=False)
class BaseModel:
    """A loaded base model: its pipeline (on the CPU), family, fingerprint and layer shapes.

    >>> from studio.testing import build_tiny_sd1_pipeline
    >>> base_model = BaseModel.from_pipeline(build_tiny_sd1_pipeline(), "tiny-random")
    >>> base_model.family.name, base_model.embedding_widths
    ('sd1', (32,))
    """

    name: str
    pipeline: Any
    family: ModelFamily
    source: Path | None = None
    """The folder or file the model was loaded from; None for a pipeline built in memory."""
    cache_dir: Path | None = None
    _fingerprint: str | None = field(default=None, repr=False)
    _shape_table: dict[str, tuple[int, ...]] | None = field(default=None, repr=False)

    @classmethod
    def from_pipeline(cls, pipeline: Any, name: str) -> BaseModel:
        """Wrap a pipeline built in code (tests, benchmarks); its fingerprint hashes configs and tensors."""
        return cls(name=name, pipeline=pipeline, family=detect_family(pipeline))

    @property
    def fingerprint(self) -> str:
        """16 hex characters identifying the exact weights; computed once, then cached."""
        if self._fingerprint is None:
            if self.source is None:
                self._fingerprint = _fingerprint_pipeline(self.pipeline)
            else:
                self._fingerprint = _fingerprint_files(self.source, _cache_dir(self.cache_dir))
        return self._fingerprint

    @property
    def embedding_widths(self) -> tuple[int, ...]:
        """Token-embedding width of each text encoder, in family order (SD1.5: ``(768,)``)."""
        return self.family.embedding_widths(self.pipeline)

    def shape_table(self) -> dict[str, tuple[int, ...]]:
        """Kohya module key -> weight shape for every Linear and Conv2d of the U-Net and the text encoders.

        Keys look like ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` and
        ``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` (SDXL: SGM U-Net names, ``lora_te1_``/``lora_te2_``).
        """
        if self._shape_table is None:
            table: dict[str, tuple[int, ...]] = {}
            for path, module in iter_lora_layers(self.pipeline.unet):
                table[self.family.kohya_unet_key(path)] = tuple(module.weight.shape)
            for index, encoder in enumerate(self.family.text_encoders(self.pipeline)):
                for path, module in iter_lora_layers(encoder):
                    table[self.family.kohya_text_key(index, path)] = tuple(module.weight.shape)
            self._shape_table = table
        return dict(self._shape_table)


def canonical_base_name(spec: str | None) -> str:
    """``tiny`` for the embedded default however it is named (nothing, ``tiny``, or a path to its folder), else
    ``spec`` as given: what per-base settings (a trainer's measured recipe) are keyed by.

    >>> canonical_base_name(None), canonical_base_name(str(tiny_model_path()) + "/"), canonical_base_name("my/model")
    ('tiny', 'tiny', 'my/model')
    """
    text = str(spec or "").strip()
    if not text or text == TINY:
        return TINY
    try:
        same = Path(text).expanduser().resolve() == tiny_model_path().resolve()
    except OSError:  # a hub id or a name no filesystem can resolve is not the embedded folder
        same = False
    return TINY if same else text


def load_base_model(
    spec: str = TINY,
    *,
    torch_dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> BaseModel:
    """Load a base model from ``tiny``, a diffusers folder, a ``.safetensors``/``.ckpt`` checkpoint or a hub id.

    Errors are one-line `StudioError`s: a missing path, an unsafe pickle, a file that is not a checkpoint, a hub id
    while offline.

    >>> base_model = load_base_model("tiny")  # doctest: +SKIP
    """
    cache = Path(cache_dir) if cache_dir is not None else None
    # Weights are loaded in float32 unless asked otherwise: transformers 5 would otherwise keep a text encoder stored
    # in fp16 in fp16, which is slow or unsupported on CPUs; a GPU caller passes torch.float16/bfloat16.
    torch_dtype = torch_dtype or torch.float32
    spec = str(spec).strip()
    if not spec:
        raise InvalidInputError("expected a base model ('tiny', a folder, a checkpoint file or a hub id), found ''")

    # 1. The embedded default.
    if spec == TINY:
        folder = tiny_model_path()
        if not (folder / "model_index.json").is_file():
            raise NotFoundError(
                f"the embedded tiny base model is not built yet (no {folder}); build it with "
                "`python -m studio.world.train_tiny`"
            )
        return _load_folder(folder, TINY, torch_dtype, cache)

    path = Path(spec).expanduser()
    # 2. A diffusers folder.
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise InvalidInputError(f"expected a diffusers model folder with model_index.json, found {path} without it")
        return _load_folder(path, path.name, torch_dtype, cache)

    # 3. A single-file checkpoint.
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise InvalidInputError(
                f"expected a base model checkpoint (.safetensors or .ckpt) or a diffusers folder, found {path.name}"
            )
        return _load_single_file(path, torch_dtype, cache)

    # 4. A hub id.
    if _HUB_ID.match(spec) and not spec.lower().endswith(SINGLE_FILE_SUFFIXES):
        return _load_hub(spec, torch_dtype)

    raise NotFoundError(
        f"no base model at '{spec}': expected 'tiny', a diffusers folder, a .safetensors/.ckpt file or a hub id"
    )


def _load_folder(folder: Path, name: str, torch_dtype: torch.dtype | None, cache: Path | None) -> BaseModel:
    from diffusers import DiffusionPipeline

    index = json.loads((folder / "model_index.json").read_text())
    kwargs: dict[str, Any] = {}
    if "safety_checker" in index:
        # Personalization studio images are checked by the user; skip the 1 GB classifier when a folder has one.
        kwargs |= {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipeline = DiffusionPipeline.from_pretrained(
            str(folder), torch_dtype=torch_dtype, local_files_only=True, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"could not load the diffusers folder {folder}: {_first_line(exc)}") from exc
    return _wrap(pipeline, name, folder.resolve(), cache)


def _load_single_file(path: Path, torch_dtype: torch.dtype | None, cache: Path | None) -> BaseModel:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    # 1. Check the file before diffusers touches it: pickles only through weights_only, and it must be a checkpoint.
    keys = _checkpoint_keys(path)
    if _CHECKPOINT_UNET_KEY not in keys:
        example = next(iter(sorted(keys)), "nothing")
        raise InvalidInputError(
            f"expected a Stable Diffusion checkpoint with U-Net weights ({_CHECKPOINT_UNET_KEY}) in {path.name}, "
            f"found {len(keys)} tensors such as '{example}' (adapters go to `studio adapters import`)"
        )
    # 2. Let diffusers convert the original layout; it reads pickles with weights_only=True too.
    sdxl = any(key.startswith(_CHECKPOINT_SDXL_PREFIX) for key in keys)
    pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    offline = _offline()
    try:
        pipeline = pipeline_class.from_single_file(str(path), torch_dtype=torch_dtype, local_files_only=offline)
    except (OSError, ValueError) as exc:
        if offline:
            raise NotFoundError(
                f"could not load the checkpoint {path.name}: diffusers needs the config of its architecture from the "
                "Hugging Face hub, which is offline (HF_HUB_OFFLINE=1) and not cached; use a diffusers folder instead"
            ) from exc
        raise InvalidInputError(f"could not load the checkpoint {path.name}: {_first_line(exc)}") from exc
    return _wrap(pipeline, path.stem, path.resolve(), cache)


def _load_hub(repo_id: str, torch_dtype: torch.dtype | None) -> BaseModel:
    from diffusers import DiffusionPipeline

    offline = _offline()
    try:
        pipeline = DiffusionPipeline.from_pretrained(repo_id, torch_dtype=torch_dtype, local_files_only=offline)
    except (OSError, ValueError) as exc:
        if offline:
            raise NotFoundError(
                f"base model '{repo_id}' is not in the local Hugging Face cache and the hub is offline "
                "(HF_HUB_OFFLINE=1); download it on a connected machine or pass a local folder"
            ) from exc
        raise NotFoundError(f"could not load base model '{repo_id}' from the hub: {_first_line(exc)}") from exc
    # Files live in the hub cache; hash the tensors rather than guess the snapshot folder.
    return _wrap(pipeline, repo_id, None, None)


def _wrap(pipeline: Any, name: str, source: Path | None, cache: Path | None) -> BaseModel:
    pipeline.set_progress_bar_config(disable=True)
    family = detect_family(pipeline)
    if not isinstance(pipeline, family.pipeline_class):
        raise InvalidInputError(
            f"expected a {family.pipeline_class.__name__} for a {family.label} base model, "
            f"found {type(pipeline).__name__} in {name}"
        )
    logger.info("loaded base model %s (%s)", name, family.label)
    return BaseModel(name=name, pipeline=pipeline, family=family, source=source, cache_dir=cache)


def _checkpoint_keys(path: Path) -> set[str]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return set(handle.keys())
        except (SafetensorError, OSError) as exc:
            raise InvalidInputError(f"{path.name} is not a readable safetensors file ({_first_line(exc)})") from exc
    from studio.adapter_files import safe_torch_load

    checkpoint = safe_torch_load(path)
    # Old checkpoints nest the weights under "state_dict"; diffusers unwraps the same way.
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise UnsafeFileError(f"expected a dict of tensors in {path.name}, found {type(checkpoint).__name__}")
    return {str(key) for key in checkpoint}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


# -- fingerprints ---------------------------------------------------------------------------------------------------


def _cache_dir(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    return Path.home() / ".cache" / "personalization-studio"


def _model_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    return sorted(
        path
        for path in source.rglob("*")
        if path.is_file()
        and path.suffix.lower() in _MODEL_FILE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(source).parts)
    )


def _fingerprint_files(source: Path, cache_dir: Path) -> str:
    files = _model_files(source)
    signature = json.dumps(
        [[str(path.relative_to(source) if source.is_dir() else path.name), *_stat(path)] for path in files]
    )
    memo_key = f"{source}\n{signature}"
    if memo_key in _FINGERPRINTS:
        return _FINGERPRINTS[memo_key]
    cache_file = cache_dir / FINGERPRINT_CACHE_FILE
    cache = _read_cache(cache_file)
    entry = cache.get(str(source))
    if isinstance(entry, dict) and entry.get("signature") == signature and isinstance(entry.get("fingerprint"), str):
        fingerprint = entry["fingerprint"]
    else:
        digest = hashlib.sha256()
        for path in files:
            digest.update(str(path.relative_to(source) if source.is_dir() else "").encode() + b"\0")
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        fingerprint = digest.hexdigest()[:16]
        cache[str(source)] = {"signature": signature, "fingerprint": fingerprint}
        _write_cache(cache_file, cache)
    _FINGERPRINTS[memo_key] = fingerprint
    return fingerprint


def _stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _read_cache(cache_file: Path) -> dict[str, Any]:
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        # A missing or damaged cache only costs a re-hash.
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache_file: Path, cache: dict[str, Any]) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cache_file.parent, suffix=".tmp", delete=False) as handle:
            json.dump(cache, handle, indent=1, sort_keys=True)
        os.replace(handle.name, cache_file)
    except OSError as exc:
        # A read-only cache folder must not stop anyone from using a model.
        logger.warning("could not write the fingerprint cache %s: %s", cache_file, exc)


def _fingerprint_pipeline(pipeline: Any) -> str:
    digest = hashlib.sha256()
    for name, component in sorted(pipeline.components.items()):
        if not isinstance(component, torch.nn.Module):
            continue
        digest.update(f"{name}:{type(component).__name__}\0".encode())
        digest.update(json.dumps(_plain_config(component), sort_keys=True, default=str).encode())
        for key, tensor in _base_tensors(component):
            data = tensor.detach().to("cpu").contiguous()
            digest.update(f"{key}:{data.dtype}:{tuple(data.shape)}\0".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _plain_config(component: torch.nn.Module) -> dict[str, Any]:
    config = getattr(component, "config", None)
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    # Bookkeeping keys (library versions, where it was loaded from) say nothing about the model.
    volatile = {"transformers_version", "torch_dtype", "dtype", "architectures", "name_or_path"}
    return {key: value for key, value in raw.items() if not key.startswith("_") and key not in volatile}


def _base_tensors(component: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    # Adapters loaded into the pipeline (peft) are not part of the base model: skip their weights and read wrapped
    # layers under their own names, so loading a LoRA does not change the fingerprint.
    for key, tensor in component.state_dict().items():
        parts = key.split(".")
        if any(part in PEFT_ADAPTER_PARTS for part in parts):
            continue
        yield ".".join(part for part in parts if part != "base_layer"), tensor
