"""Foreign adapter formats: detect what a file is, convert imports to the studio layout, export to other tools.

The studio keeps one internal layout per kind (ARCHITECTURE.md, "Adapter files"): a LoRA uses kohya keys with an
explicit ``.alpha`` per module, a textual-inversion embedding uses the family's embedding keys (``emb_params``, or
``clip_l``/``clip_g`` for SDXL). Everything else is converted on the way in (`import_adapter`) and on the way out
(`export_adapter`). Facts about the formats are in ``shared/guides/formats.md``.

Import reads:

- our own files (``studio.kind`` in the header);
- kohya/A1111 LoRA (``lora_unet_*``, ``lora_te*_*`` with ``lora_down``/``lora_up``/``alpha``);
- diffusers/PEFT LoRA (``unet.<path>.lora_A.weight``/``lora_B.weight``, ``text_encoder.``, ``text_encoder_2.``) and the
  older diffusers attention-processor layout (``...to_q_lora.down.weight``, ``...to_q.lora.down.weight``);
- embeddings: A1111 ``.pt`` (``string_to_param``), single-key safetensors (``emb_params`` or any one key), SDXL
  ``clip_l``/``clip_g``, diffusers ``{"<token>": tensor}`` (``.safetensors`` or ``.bin``).

LyCORIS files (LoHa, LoKr, Tucker, DoRA, OFT) are refused: diffusers cannot load them.

Export writes ``kohya`` (= ``a1111`` for a LoRA), ``diffusers`` and ``a1111``. For SDXL embeddings the diffusers export
writes two files, one per text encoder (``<name>_text_encoder.safetensors`` and ``<name>_text_encoder_2.safetensors``),
because diffusers loads an SDXL embedding with two ``load_textual_inversion`` calls; the a1111 export writes the single
``clip_l``/``clip_g`` file that A1111 and ComfyUI read.

>>> import torch, tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = torch.save({"<cat>": torch.zeros(1, 768)}, folder / "learned_embeds.bin")
>>> adapter = import_adapter(folder / "learned_embeds.bin")
>>> adapter.metadata.kind, adapter.metadata.family, adapter.metadata.placeholder_tokens
('textual_inversion', 'sd1', ['<cat>'])
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from studio.adapter_files import (
    AdapterFile,
    AdapterMetadata,
    check_finite,
    read_safetensors,
    safe_torch_load,
    save_adapter,
)
from studio.errors import AlreadyExistsError, InvalidInputError, NotFoundError
from studio.families import FAMILIES, ModelFamily, family_by_name

if TYPE_CHECKING:
    from studio.base_models import BaseModel

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("kohya", "diffusers", "a1111")

# Header key prefixes of other tools that an imported file keeps (its "card" in A1111 and ComfyUI).
_FOREIGN_HEADER_PREFIXES = ("ss_", "sshs_", "modelspec.")

_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_PEFT_PREFIXES = {"unet": None, "text_encoder": 0, "text_encoder_2": 1}

# Key parts of LyCORIS algorithms, which diffusers cannot load: (prefix of one dotted part of a key, algorithm).
_LYCORIS_MARKERS = (
    ("hada_", "LoHa"),
    ("lokr_", "LoKr"),
    ("lora_mid", "LoCon with Tucker decomposition"),
    ("dora_scale", "DoRA"),
    ("lora_magnitude_vector", "DoRA"),
    ("oft_", "OFT"),
)
_LYCORIS_EXACT_PARTS = {
    "a1": "GLoRA",
    "b1": "GLoRA",
    "diff": "full-weight difference",
    "diff_b": "full-weight difference",
}
# Key fragments of full checkpoints (not adapters): SGM/LDM layout, diffusers U-Net, CLIP text model.
_CHECKPOINT_MARKERS = ("model.diffusion_model.", "first_stage_model.", "conv_in.weight", "text_model.embeddings.")

# Widths that identify a real model family without a base model: text-encoder widths and U-Net cross-attention
# widths (SD1.x: CLIP-L 768; SD2.x: OpenCLIP-H 1024; SDXL: 768 + 1280 = 2048 cross-attention).
_EMBEDDING_WIDTH_FAMILY = {768: "sd1", 1024: "sd2"}
_CROSS_ATTENTION_WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}

# Generic single-key names that are not the placeholder token itself (A1111 / ComfyUI embeddings).
_GENERIC_EMBEDDING_KEYS = frozenset({"emb_params", "*", "embedding", "embeddings", "string_to_param"})

# The largest number of vectors a usable embedding can have: CLIP's 77 positions minus start and end tokens.
_MAX_VECTORS = 75


@dataclass(frozen=True)
class DetectedFormat:
    """What a file is: a format id (``studio``, ``kohya``, ``diffusers``, ``diffusers_legacy``, ``a1111_pt``,
    ``embedding``, ``sdxl_embedding``, ``diffusers_embedding``), the adapter kind, and a description for messages."""

    name: str
    kind: str
    description: str


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------


def _sniff(path: Path) -> str:
    with path.open("rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head[:3] == b"\xff\xd8\xff":
        return "a JPEG image"
    if not head:
        return "an empty file"
    return "neither safetensors nor a torch file"


@dataclass
class SourceFile:
    """A candidate adapter file as read: its tensors, its safetensors header, and for an A1111 ``.pt`` embedding the
    file's other fields (``name``, ``step``, ``sd_checkpoint_name``); ``a1111`` is None for any other file."""

    tensors: dict[str, torch.Tensor]
    header: dict[str, str]
    a1111: dict[str, Any] | None = None


def read_adapter_source(path: Path) -> SourceFile:
    """Read any candidate adapter file safely.

    Safetensors files are checked by `read_safetensors`; pickles go through `safe_torch_load` (code never runs).
    """
    if not path.is_file():
        raise NotFoundError(f"no file at {path}")
    kind = _sniff(path)
    if kind == "safetensors":
        tensors, header = read_safetensors(path)
        return SourceFile(tensors, header)
    if kind != "torch":
        raise InvalidInputError(f"{path.name} is not an adapter: expected a .safetensors or .pt file, found {kind}")
    loaded = safe_torch_load(path)
    if isinstance(loaded, torch.Tensor):
        # Some tools save a bare embedding tensor.
        loaded = {"emb_params": loaded}
    if not isinstance(loaded, dict):
        raise InvalidInputError(
            f"{path.name} is not an adapter: expected a dict of tensors, found {type(loaded).__name__}"
        )
    if "string_to_param" in loaded:
        return _read_a1111_pt(path, loaded)
    tensors = {}
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InvalidInputError(
                f"{path.name} is not an adapter: expected a dict of tensors, found {key!r}: {type(value).__name__}"
            )
        tensors[key] = value
    check_finite(tensors, path.name)
    return SourceFile(tensors, {})


def _read_a1111_pt(path: Path, loaded: dict[str, Any]) -> SourceFile:
    params = loaded["string_to_param"]
    if not isinstance(params, dict) or not params:
        raise InvalidInputError(f"{path.name}: expected string_to_param to hold an embedding tensor, found {params!r}")
    tensor = params.get("*", next(iter(params.values())))
    if not isinstance(tensor, torch.Tensor):
        raise InvalidInputError(
            f"{path.name}: expected string_to_param to hold a tensor, found {type(tensor).__name__}"
        )
    tensors = {"emb_params": tensor.detach()}
    check_finite(tensors, path.name)
    extras = {
        key: loaded[key] for key in ("name", "step", "sd_checkpoint_name") if isinstance(loaded.get(key), str | int)
    }
    return SourceFile(tensors, {}, extras)


# --------------------------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------------------------


def _has_studio_layout(header: dict[str, str], keys: list[str]) -> bool:
    """Whether a file with a studio header holds the studio layout (our exports to other layouts keep the header)."""
    kind = header.get("studio.kind")
    if kind == "lora":
        return all(key.startswith(("lora_unet_", "lora_te")) for key in keys)
    if kind == "textual_inversion":
        family = FAMILIES.get(header.get("studio.family", ""))
        return family is not None and set(keys) == set(family.embedding_keys)
    return True  # neti, preference: only the studio writes them


def _lycoris_algorithms(keys: list[str]) -> list[str]:
    found = []
    for key in keys:
        if not key.startswith(("lora_", "unet.", "text_encoder")):
            continue  # LyCORIS uses kohya or diffusers module names; other files are judged elsewhere
        for part in key.split("."):
            found += [algorithm for marker, algorithm in _LYCORIS_MARKERS if part.startswith(marker)]
            if part in _LYCORIS_EXACT_PARTS:
                found.append(_LYCORIS_EXACT_PARTS[part])
    return found


def detect_format(
    tensors: dict[str, torch.Tensor], header: dict[str, str], source: str = "file", *, a1111_pt: bool = False
) -> DetectedFormat:
    """Tell which adapter format a file's tensors and header are; raise `InvalidInputError` if it is not an adapter.

    >>> detect_format({"lora_unet_conv_in.alpha": torch.tensor(1.0)}, {}).name
    'kohya'
    """
    keys = list(tensors)
    if "studio.kind" in header and _has_studio_layout(header, keys):
        return DetectedFormat("studio", header["studio.kind"], "studio adapter")
    if not keys:
        raise InvalidInputError(f"{source} is not an adapter: it holds no tensors")
    lycoris = _lycoris_algorithms(keys)
    if lycoris:
        raise InvalidInputError(
            f"{source} is a LyCORIS {lycoris[0]} adapter, which is not supported; expected a plain LoRA "
            "(lora_down/lora_up or lora_A/lora_B)"
        )
    if a1111_pt:
        return DetectedFormat("a1111_pt", "textual_inversion", "A1111 .pt embedding")
    if all(key.startswith(("lora_unet_", "lora_te")) for key in keys):
        odd = [key for key in keys if not key.endswith(_KOHYA_SUFFIXES)]
        if odd:
            raise InvalidInputError(
                f"{source} has kohya LoRA keys but also '{odd[0]}'; expected only .lora_down.weight, "
                ".lora_up.weight and .alpha"
            )
        return DetectedFormat("kohya", "lora", "kohya/A1111 LoRA")
    if all(key.split(".", 1)[0] in _PEFT_PREFIXES for key in keys) and any(".lora_A." in key for key in keys):
        odd = [key for key in keys if not key.endswith((".lora_A.weight", ".lora_B.weight"))]
        if odd:
            raise InvalidInputError(
                f"{source} has diffusers LoRA keys but also '{odd[0]}'; expected only .lora_A.weight and .lora_B.weight"
            )
        return DetectedFormat("diffusers", "lora", "diffusers (PEFT) LoRA")
    if all(
        key.endswith(
            (
                ".lora.down.weight",
                ".lora.up.weight",
                "_lora.down.weight",
                "_lora.up.weight",
                "_layer.down.weight",
                "_layer.up.weight",
            )
        )
        for key in keys
    ):
        return DetectedFormat("diffusers_legacy", "lora", "diffusers attention-processor LoRA")
    if any(marker in key for key in keys for marker in _CHECKPOINT_MARKERS):
        raise InvalidInputError(
            f"{source} is a full model checkpoint, not an adapter; use it as a base model (--base) instead"
        )
    if set(keys) == {"clip_l", "clip_g"}:
        return DetectedFormat("sdxl_embedding", "textual_inversion", "SDXL clip_l/clip_g embedding")
    if len(keys) == 1 and tensors[keys[0]].is_floating_point() and tensors[keys[0]].dim() in (1, 2):
        if keys[0] in _GENERIC_EMBEDDING_KEYS:
            return DetectedFormat("embedding", "textual_inversion", "A1111 embedding")
        return DetectedFormat("diffusers_embedding", "textual_inversion", "diffusers embedding")
    shown = ", ".join(f"'{key}'" for key in keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    raise InvalidInputError(
        f"{source} is not an adapter: expected LoRA keys (lora_unet_..., unet....lora_A.weight) or an embedding "
        f"(emb_params, clip_l/clip_g, one tensor), found {shown}"
    )


# --------------------------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------------------------


def import_adapter(path: str | Path, base: BaseModel | None = None) -> AdapterFile:
    """Read an adapter file in any supported format and convert it to the studio layout with metadata filled in.

    ``base`` (optional) decides the family when the file itself does not tell; checking the file's shapes against
    the base model is the library's job (`studio.library.check_compatible`).
    """
    path = Path(path)
    source = read_adapter_source(path)
    tensors, header, a1111 = source.tensors, source.header, source.a1111 or {}
    detected = detect_format(tensors, header, path.name, a1111_pt=source.a1111 is not None)
    # Our own header may also sit on a file we exported in another layout: its metadata still applies.
    studio = AdapterMetadata.from_header(header, source=path.name) if "studio.kind" in header else None
    if detected.name == "studio" and studio is not None:
        return AdapterFile(tensors, studio)

    if detected.kind == "lora":
        family = _infer_lora_family(detected.name, tensors, header, base, path.name)
        if detected.name == "kohya":
            tensors = _kohya_with_alphas(_kohya_sgm_names(tensors, family), path.name)
        elif detected.name == "diffusers":
            tensors = _peft_to_kohya(tensors, header, family, path.name)
        else:
            tensors = _legacy_to_kohya(tensors, family, path.name)
        tokens = studio.placeholder_tokens if studio else _trigger_words(header)
    else:
        tensors, family, token = _embedding_to_internal(detected.name, tensors, header, base, path)
        tokens = studio.placeholder_tokens if studio else [token]

    extra = {key: value for key, value in header.items() if key.startswith(_FOREIGN_HEADER_PREFIXES)}
    metadata = AdapterMetadata(
        kind=detected.kind,
        family=family.name,
        base_model=header.get("ss_sd_model_name", str(a1111.get("sd_checkpoint_name", ""))),
        placeholder_tokens=tokens,
        config={"imported_from": path.name, "source_format": detected.name},
        extra=extra,
    )
    logger.info("imported %s as a %s %s adapter", path.name, family.label, detected.description)
    return AdapterFile(tensors, metadata)


def _family_from_header(header: dict[str, str]) -> ModelFamily | None:
    if header.get("studio.family") in FAMILIES:
        return FAMILIES[header["studio.family"]]
    version = header.get("ss_base_model_version", "") + " " + header.get("modelspec.architecture", "")
    if "sdxl" in version or "stable-diffusion-xl" in version:
        return FAMILIES["sdxl"]
    if "sd_v2" in version or "stable-diffusion-v2" in version:
        return FAMILIES["sd2"]
    if "sd_v1" in version or "stable-diffusion-v1" in version:
        return FAMILIES["sd1"]
    return None


def _cross_attention_width(tensors: dict[str, torch.Tensor]) -> int | None:
    # The input width of attn2.to_k is the width of the text hidden states the U-Net attends to.
    for key, tensor in tensors.items():
        if re.search(r"attn2[._]to_k(\.lora_down\.weight|\.lora_A\.weight|[._]lora\.down\.weight)$", key):
            return int(tensor.shape[1])
        if key.endswith("attn2.processor.to_k_lora.down.weight"):
            return int(tensor.shape[1])
    return None


def _infer_lora_family(
    fmt: str, tensors: dict[str, torch.Tensor], header: dict[str, str], base: BaseModel | None, source: str
) -> ModelFamily:
    # 1. What the file says about itself: kohya's SDXL prefixes and SGM block names, a second text encoder, the header.
    keys = list(tensors)
    if any(
        key.startswith(
            ("lora_te1_", "lora_te2_", "lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block")
        )
        for key in keys
    ):
        return FAMILIES["sdxl"]
    if any(key.startswith("text_encoder_2.") for key in keys):
        return FAMILIES["sdxl"]
    from_header = _family_from_header(header)
    if from_header is not None:
        return from_header
    # 2. Real model widths, then 3. the base model in use.
    width = _cross_attention_width(tensors)
    if width in _CROSS_ATTENTION_WIDTH_FAMILY and (base is None or width not in _base_cross_widths(base)):
        return FAMILIES[_CROSS_ATTENTION_WIDTH_FAMILY[width]]
    if base is not None:
        return base.family
    raise InvalidInputError(f"cannot tell which model family {source} is for; import it with a base model (--base)")


def _base_cross_widths(base: BaseModel) -> set[int]:
    return {int(base.pipeline.unet.config.cross_attention_dim)}


def _kohya_sgm_names(tensors: dict[str, torch.Tensor], family: ModelFamily) -> dict[str, torch.Tensor]:
    """Rename kohya U-Net keys that use diffusers paths (some SDXL trainers write them) to the family's naming."""
    diffusers_named = FAMILIES["sd1"]  # its kohya names are the diffusers module paths
    if family.kohya_unet_naming == diffusers_named.kohya_unet_naming:
        return tensors
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_")):
            module, dot, suffix = key.partition(".")
            key = family.kohya_unet_key(diffusers_named.diffusers_unet_path(module)) + dot + suffix
        out[key] = tensor
    return out


def _kohya_with_alphas(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Check that every module has down and up weights and write the ``.alpha`` explicitly (alpha = rank if absent)."""
    modules = sorted({key.rsplit(".lora_", 1)[0].removesuffix(".alpha") for key in tensors})
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        down, up = tensors.get(f"{module}.lora_down.weight"), tensors.get(f"{module}.lora_up.weight")
        if down is None or up is None:
            missing = "lora_down" if down is None else "lora_up"
            raise InvalidInputError(f"{source}: LoRA module '{module}' has no {missing} weight; expected both")
        _check_pair(module, down, up, source)
        alpha = tensors.get(f"{module}.alpha")
        if alpha is None:
            # kohya and diffusers read a missing alpha as alpha == rank (scale 1); ComfyUI uses 1.0, so write it.
            alpha = torch.tensor(float(down.shape[0]))
        elif alpha.numel() != 1:
            raise InvalidInputError(f"{source}: '{module}.alpha' should be one number, found shape {list(alpha.shape)}")
        out[f"{module}.lora_down.weight"] = down
        out[f"{module}.lora_up.weight"] = up
        out[f"{module}.alpha"] = alpha.reshape(()).to(torch.float32)
    return out


def _check_pair(module: str, down: torch.Tensor, up: torch.Tensor, source: str) -> None:
    if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
        raise InvalidInputError(
            f"{source}: LoRA module '{module}' has down {list(down.shape)} and up {list(up.shape)}; "
            "expected down [rank, in] and up [out, rank]"
        )


def _peft_alphas(
    header: dict[str, str], prefix: str, module_paths: list[str], ranks: dict[str, int]
) -> dict[str, float]:
    """Per-module alpha of a diffusers/PEFT file: from ``lora_adapter_metadata`` if written, else alpha == rank."""
    alphas = {path: float(ranks[path]) for path in module_paths}
    raw = header.get("lora_adapter_metadata")
    if not raw:
        return alphas
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        logger.warning("ignoring unreadable lora_adapter_metadata; using alpha == rank")
        return alphas
    default = config.get(f"{prefix}.lora_alpha")
    pattern = config.get(f"{prefix}.alpha_pattern") or {}
    for path in module_paths:
        value = default
        for key, alpha in pattern.items():
            # peft matches a pattern against the end of the module path.
            if re.match(rf"(.*\.)?({key})$", path):
                value = alpha
                break
        if isinstance(value, int | float):
            alphas[path] = float(value)
    return alphas


def _peft_to_kohya(
    tensors: dict[str, torch.Tensor], header: dict[str, str], family: ModelFamily, source: str
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        prefix, path = key.removesuffix(".lora_A.weight").split(".", 1)
        up = tensors.get(f"{prefix}.{path}.lora_B.weight")
        groups.setdefault(prefix, {})[path] = (down, up)
    orphan = [
        key for key in tensors if key.endswith(".lora_B.weight") and key.replace(".lora_B.", ".lora_A.") not in tensors
    ]
    if orphan:
        raise InvalidInputError(f"{source}: '{orphan[0]}' has no matching lora_A weight; expected both")
    for prefix, modules in groups.items():
        ranks = {path: int(down.shape[0]) for path, (down, _) in modules.items()}
        alphas = _peft_alphas(header, prefix, list(modules), ranks)
        for path, (down, up) in modules.items():
            if up is None:
                raise InvalidInputError(f"{source}: '{prefix}.{path}' has no lora_B weight; expected both")
            key = _kohya_key(family, prefix, path, source)
            _check_pair(key, down, up, source)
            out[f"{key}.lora_down.weight"] = down
            out[f"{key}.lora_up.weight"] = up
            out[f"{key}.alpha"] = torch.tensor(alphas[path], dtype=torch.float32)
    return out


def _kohya_key(family: ModelFamily, prefix: str, path: str, source: str) -> str:
    if prefix == "unet":
        return family.kohya_unet_key(path)
    index = _PEFT_PREFIXES[prefix]
    if index is None or index >= len(family.kohya_text_prefixes):
        raise InvalidInputError(f"{source} has '{prefix}' LoRA weights but {family.label} has no such text encoder")
    return family.kohya_text_key(index, path)


_LEGACY_KEY = re.compile(
    r"^(?:(unet|text_encoder|text_encoder_2)\.)?(.+?)"
    r"(?:(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora|\.lora|\.lora_linear_layer)\.(down|up)\.weight$"
)
# The attention-processor names diffusers once used for CLIP's projections.
_LEGACY_TEXT_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _legacy_to_kohya(tensors: dict[str, torch.Tensor], family: ModelFamily, source: str) -> dict[str, torch.Tensor]:
    """Older diffusers layouts: ``unet.<attn>.processor.to_q_lora.down.weight``, ``unet.<path>.lora.down.weight``,
    ``text_encoder.<attn>.to_q_lora.down.weight`` and ``<path>.lora_linear_layer.down.weight``."""
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _LEGACY_KEY.match(key)
        if match is None:
            raise InvalidInputError(f"{source}: unexpected key '{key}' in a diffusers attention-processor LoRA")
        prefix, path, projection, direction = match.groups()
        if projection and prefix in ("text_encoder", "text_encoder_2"):
            path = f"{path}.{_LEGACY_TEXT_PROJECTIONS[projection]}"
        elif projection:
            path = f"{path}.{'to_out.0' if projection == 'to_out' else projection}"
        letter = "A" if direction == "down" else "B"
        renamed[f"{prefix or 'unet'}.{path}.lora_{letter}.weight"] = tensor
    return _peft_to_kohya(renamed, {}, family, source)


def _trigger_words(header: dict[str, str]) -> list[str]:
    phrase = header.get("modelspec.trigger_phrase", "")
    return [word.strip() for word in phrase.split(",") if word.strip()]


def _embedding_to_internal(
    fmt: str, tensors: dict[str, torch.Tensor], header: dict[str, str], base: BaseModel | None, path: Path
) -> tuple[dict[str, torch.Tensor], ModelFamily, str]:
    source = path.name
    if fmt == "sdxl_embedding":
        clip_l, clip_g = (_as_vectors(tensors[key], key, source) for key in ("clip_l", "clip_g"))
        if clip_l.shape[0] != clip_g.shape[0]:
            raise InvalidInputError(
                f"{source}: clip_l has {clip_l.shape[0]} vectors but clip_g has {clip_g.shape[0]}; expected the same"
            )
        return {"clip_l": clip_l, "clip_g": clip_g}, FAMILIES["sdxl"], _token_from_stem(path)

    key, tensor = next(iter(tensors.items()))
    vectors = _as_vectors(tensor, key, source)
    token = key if fmt == "diffusers_embedding" else _token_from_stem(path)
    width = int(vectors.shape[1])
    base_widths = tuple(base.embedding_widths) if base is not None else ()
    from_header = _family_from_header(header)
    if from_header is not None:
        family = from_header
    elif base is not None and len(base_widths) == 1 and width == base_widths[0]:
        family = base.family
    elif width in _EMBEDDING_WIDTH_FAMILY:
        family = FAMILIES[_EMBEDDING_WIDTH_FAMILY[width]]
    elif base is not None:
        family = base.family
    else:
        raise InvalidInputError(
            f"cannot tell which model family the {width}-wide embedding {source} is for; import it with a base model"
        )
    if len(family.embedding_keys) != 1:
        raise InvalidInputError(
            f"{source} holds one embedding but {family.label} has {len(family.embedding_keys)} text encoders; "
            f"expected {'/'.join(family.embedding_keys)}"
        )
    return {family.embedding_keys[0]: vectors}, family, token


def _as_vectors(tensor: torch.Tensor, key: str, source: str) -> torch.Tensor:
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)  # diffusers' learned_embeds.bin holds one vector as [dim]
    if tensor.dim() != 2 or not tensor.is_floating_point() or not 1 <= tensor.shape[0] <= _MAX_VECTORS:
        raise InvalidInputError(
            f"{source}: embedding '{key}' should be float [vectors, width] with 1-{_MAX_VECTORS} vectors, "
            f"found {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"
        )
    return tensor.to(torch.float32)


def _token_from_stem(path: Path) -> str:
    # A1111 uses the file name as the prompt word; keep it one word.
    return re.sub(r"\s+", "_", path.stem.strip()) or "embedding"


# --------------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------------


def export_adapter(
    adapter: AdapterFile, fmt: str, out_path: str | Path, family: ModelFamily | None = None
) -> list[Path]:
    """Write ``adapter`` in another tool's format and return the files written (never overwrites).

    ``fmt`` is ``kohya``, ``diffusers`` or ``a1111``. ``out_path`` is a file path, or an existing folder (the file is
    then named after the adapter). ``family`` defaults to the adapter's own.
    """
    fmt = fmt.lower()
    if fmt not in EXPORT_FORMATS:
        raise InvalidInputError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    family = family or family_by_name(adapter.metadata.family)
    kind = adapter.metadata.kind
    out = _output_path(Path(out_path), adapter, fmt, kind)
    if kind == "lora":
        if fmt == "diffusers":
            # diffusers loads LoRAs and embeddings separately: a pivotal bundle becomes a LoRA plus an embedding file.
            lora, embedding = split_pivotal_adapter(adapter) if has_bundled_embedding(adapter) else (adapter, None)
            written = [_write(out, AdapterFile(_kohya_to_peft(lora.tensors, family), lora.metadata), {"format": "pt"})]
            if embedding is not None:
                written += _export_embedding(embedding, fmt, out.with_name(f"{out.stem}.embedding{out.suffix}"), family)
            return written
        return [_write(out, adapter, _kohya_card(adapter, family))]
    if kind == "textual_inversion":
        return _export_embedding(adapter, fmt, out, family)
    raise InvalidInputError(
        f"a {kind} adapter can only be used inside the studio; export supports lora and textual_inversion adapters"
    )


def _output_path(out: Path, adapter: AdapterFile, fmt: str, kind: str) -> Path:
    if out.is_dir():
        out = out / f"{adapter.metadata.name or 'adapter'}.safetensors"
    allowed = (".safetensors", ".pt") if (fmt == "a1111" and kind == "textual_inversion") else (".safetensors",)
    if out.suffix not in allowed:
        raise InvalidInputError(f"export path should end in {' or '.join(allowed)}, found '{out.name}'")
    return out


def _write(out: Path, adapter: AdapterFile, extra_header: dict[str, str]) -> Path:
    metadata = replace(adapter.metadata, extra={**adapter.metadata.extra, **extra_header})
    try:
        return save_adapter(out, AdapterFile(adapter.tensors, metadata), overwrite=False)
    except FileExistsError as exc:
        raise AlreadyExistsError(f"{out} already exists; choose another --out or remove it first") from exc


def _lora_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(key.removesuffix(".lora_down.weight") for key in tensors if key.endswith(".lora_down.weight"))


def _kohya_card(adapter: AdapterFile, family: ModelFamily) -> dict[str, str]:
    """kohya ``ss_*`` and ModelSpec keys, so A1111 and ComfyUI show the adapter's card."""
    meta, tensors = adapter.metadata, adapter.tensors
    modules = _lora_modules(tensors)
    ranks = Counter(int(tensors[f"{m}.lora_down.weight"].shape[0]) for m in modules)
    alphas = Counter(float(tensors[f"{m}.alpha"]) for m in modules if f"{m}.alpha" in tensors)
    rank = ranks.most_common(1)[0][0] if ranks else 0
    alpha = alphas.most_common(1)[0][0] if alphas else float(rank)
    title = meta.name or "adapter"
    card = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": family.ss_base_model_version,
        "ss_output_name": title,
        "ss_sd_model_name": meta.base_model,
        "ss_training_comment": f"trigger words: {', '.join(meta.placeholder_tokens)}"
        if meta.placeholder_tokens
        else "",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.modelspec_architecture}/lora",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": title,
        "modelspec.date": meta.created,
    }
    if meta.placeholder_tokens:
        card["modelspec.trigger_phrase"] = ", ".join(meta.placeholder_tokens)
    resolution = meta.config.get("resolution")
    if isinstance(resolution, int):
        card["modelspec.resolution"] = f"{resolution}x{resolution}"
        card["ss_resolution"] = f"({resolution}, {resolution})"
    tag_frequency = meta.config.get("tag_frequency")
    if isinstance(tag_frequency, dict):
        card["ss_tag_frequency"] = json.dumps(tag_frequency)
    # Keys an imported file brought with it win over what we derive, except the layout-defining ones above.
    return {**{k: v for k, v in meta.extra.items()}, **{k: v for k, v in card.items() if v}}


def _kohya_to_peft(tensors: dict[str, torch.Tensor], family: ModelFamily) -> dict[str, torch.Tensor]:
    """Kohya keys -> diffusers/PEFT keys, folding alpha / rank into lora_B so that alpha == rank reproduces it."""
    out: dict[str, torch.Tensor] = {}
    for module in _lora_modules(tensors):
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        rank = down.shape[0]
        alpha = float(tensors[f"{module}.alpha"]) if f"{module}.alpha" in tensors else float(rank)
        if module.startswith("lora_unet_"):
            key = "unet." + family.diffusers_unet_path(module)
        else:
            index, path = family.diffusers_text_path(module)
            key = f"{family.text_encoder_attrs[index]}.{path}"
        out[f"{key}.lora_A.weight"] = down
        out[f"{key}.lora_B.weight"] = up * (alpha / rank)
    return out


def _export_embedding(adapter: AdapterFile, fmt: str, out: Path, family: ModelFamily) -> list[Path]:
    meta, tensors = adapter.metadata, adapter.tensors
    token = meta.placeholder_tokens[0] if meta.placeholder_tokens else (meta.name or out.stem)
    vectors = [tensors[key] for key in family.embedding_keys]
    if fmt in ("a1111", "kohya"):
        if out.suffix == ".pt":
            return [_write_a1111_pt(out, adapter, family, token)]
        # kohya writes embeddings in the same layout as A1111: our internal one.
        return [_write(out, AdapterFile(dict(zip(family.embedding_keys, vectors, strict=True)), meta), {})]
    # diffusers: {"<token>": tensor}; one file per text encoder.
    if len(vectors) == 1:
        return [_write(out, AdapterFile({token: vectors[0]}, meta), {})]
    paths = [out.with_name(f"{out.stem}_{attr}{out.suffix}") for attr in family.text_encoder_attrs]
    for path in paths:
        if path.exists():
            raise AlreadyExistsError(f"{path} already exists; choose another --out or remove it first")
    return [_write(path, AdapterFile({token: vector}, meta), {}) for path, vector in zip(paths, vectors, strict=True)]


def _write_a1111_pt(out: Path, adapter: AdapterFile, family: ModelFamily, token: str) -> Path:
    """The A1111 ``.pt`` layout; written only when asked for by a ``.pt`` path (a pickle of plain containers)."""
    if len(family.embedding_keys) != 1:
        raise InvalidInputError(
            f"{family.label} embeddings export as .safetensors (clip_l/clip_g); .pt holds one text encoder"
        )
    if out.exists():
        raise AlreadyExistsError(f"{out} already exists; choose another --out or remove it first")
    meta = adapter.metadata
    data = {
        # 265 is the token id A1111 writes for its "*" placeholder.
        "string_to_token": {"*": 265},
        "string_to_param": {"*": adapter.tensors[family.embedding_keys[0]].detach().cpu().contiguous().clone()},
        "name": token,
        "step": int(meta.config.get("max_train_steps", meta.config.get("steps", 0)) or 0),
        "sd_checkpoint": meta.base_fingerprint or None,
        "sd_checkpoint_name": meta.base_model or None,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        torch.save(data, tmp)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


# Pivotal tuning bundles: a LoRA file that also carries its placeholder's embedding.

BUNDLE_PREFIX = "bundle_emb."


def bundle_embedding_keys(family: ModelFamily, placeholder_token: str) -> list[str]:
    """Keys of a placeholder's embedding inside a LoRA file (kohya's "bundled embeddings", read by A1111).

    A1111 (``extensions-builtin/Lora/networks.py``) collects ``bundle_emb.<name>.<rest>`` keys per ``<name>`` and
    loads each group as an embedding file: ``string_to_param.*`` is the SD1/SD2 ``.pt`` layout and ``clip_l``/
    ``clip_g`` the SDXL one. ``<name>`` is the prompt word, so it may hold no dot (`validate_placeholder_token`).

    >>> from studio.families import SD1, SDXL
    >>> bundle_embedding_keys(SD1, "<my-toy>"), bundle_embedding_keys(SDXL, "<my-toy>")
    (['bundle_emb.<my-toy>.string_to_param.*'], ['bundle_emb.<my-toy>.clip_l', 'bundle_emb.<my-toy>.clip_g'])
    """
    if len(family.embedding_keys) == 1:
        return [f"{BUNDLE_PREFIX}{placeholder_token}.string_to_param.*"]
    return [f"{BUNDLE_PREFIX}{placeholder_token}.{key}" for key in family.embedding_keys]


def split_pivotal_adapter(adapter: AdapterFile) -> tuple[AdapterFile, AdapterFile]:
    """A pivotal-tuning ``lora`` adapter as (the LoRA alone, its embedding as a ``textual_inversion`` adapter).

    This is how the bundle is exported for tools that load LoRAs and embeddings separately (diffusers, ComfyUI):
    export each part with `studio.formats.export_adapter`.
    """
    meta = adapter.metadata
    family = family_by_name(meta.family)
    if meta.kind != "lora" or not meta.placeholder_tokens:
        raise InvalidInputError(f"expected a pivotal-tuning lora adapter with a placeholder token, found {meta.kind}")
    token = meta.placeholder_tokens[0]
    keys = bundle_embedding_keys(family, token)
    missing = [key for key in keys if key not in adapter.tensors]
    if missing:
        raise InvalidInputError(f"expected bundled embedding keys {', '.join(keys)}, found none for '{token}'")
    lora = {key: value for key, value in adapter.tensors.items() if not key.startswith(BUNDLE_PREFIX)}
    embedding = {emb_key: adapter.tensors[key] for emb_key, key in zip(family.embedding_keys, keys, strict=True)}
    ti_meta = replace(meta, kind="textual_inversion", extra={})
    return AdapterFile(lora, meta), AdapterFile(embedding, ti_meta)


def has_bundled_embedding(adapter: AdapterFile) -> bool:
    """Whether a ``lora`` adapter carries a pivotal-tuning embedding (kohya ``bundle_emb.*`` keys)."""
    return any(key.startswith(BUNDLE_PREFIX) for key in adapter.tensors)
