"""Model families: everything that differs between SD1.x, SD2.x and SDXL, in one strategy object per family.

A `ModelFamily` is chosen once per base model by `detect_family` and asked whenever code needs a family-specific
answer (which text encoders, which embedding keys in A1111 files, how kohya names U-Net modules, ...). Nothing else
in the studio tests ``if sdxl``.

>>> from studio.testing import build_tiny_sdxl_pipeline
>>> family = detect_family(build_tiny_sdxl_pipeline())
>>> family.label, family.kohya_unet_key("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
('SDXL', 'lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q')

Kohya module names
------------------
kohya and AUTOMATIC1111 name a LoRA module ``lora_unet_<path>`` / ``lora_te_<path>`` (SDXL: ``lora_te1_``,
``lora_te2_``) with the dots of the module path replaced by underscores. For SD1.x/SD2.x the path is the diffusers
module path. For SDXL kohya trains on the original (SGM) U-Net, so the path is the SGM one: ``input_blocks.N.K``,
``middle_block.K``, ``output_blocks.N.K``, ``time_embed.0``, ``label_emb.0.0``, ``out.2``, with resnets spelled
``in_layers.2`` / ``out_layers.3`` / ``emb_layers.1`` / ``skip_connection`` and down-samplers ``op``. The SGM block
numbers follow from ``layers_per_block`` (2 on every SDXL model), exactly as diffusers' own kohya loader assumes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from studio.errors import InvalidInputError

KOHYA_UNET_PREFIX = "lora_unet_"

# Module names that contain an underscore. A kohya key loses the difference between "." and "_", so turning it back
# into a module path needs to know which underscores belong to a name. Longest match wins.
_COMPOUND_NAMES = frozenset(
    {
        # U-Net (diffusers)
        "down_blocks",
        "up_blocks",
        "mid_block",
        "transformer_blocks",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "add_k_proj",
        "add_v_proj",
        "proj_in",
        "proj_out",
        "time_emb_proj",
        "conv_shortcut",
        "conv_in",
        "conv_out",
        "conv_norm_out",
        "conv_act",
        "time_embedding",
        "time_proj",
        "add_embedding",
        "add_time_proj",
        "class_embedding",
        "encoder_hid_proj",
        "linear_1",
        "linear_2",
        # CLIP text encoders
        "text_model",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "layer_norm1",
        "layer_norm2",
        "final_layer_norm",
        "text_projection",
        "token_embedding",
        "position_embedding",
    }
)
_MAX_COMPOUND_PARTS = max(len(name.split("_")) for name in _COMPOUND_NAMES)

# Inside a resnet block: diffusers name <-> SGM name.
UNET_RESNET_TO_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_SGM_TO_RESNET = {sgm.replace(".", "_"): diffusers for diffusers, sgm in UNET_RESNET_TO_SGM.items()}

# Modules outside the block structure: diffusers path <-> SGM path.
UNET_TOP_LEVEL_TO_SGM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_SGM_TO_TOP_LEVEL = {sgm.replace(".", "_"): diffusers for diffusers, sgm in UNET_TOP_LEVEL_TO_SGM.items()}


def _underscores_to_path(name: str) -> str:
    """``transformer_blocks_0_attn1_to_out_0`` -> ``transformer_blocks.0.attn1.to_out.0`` (module names known)."""
    parts = name.split("_")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for width in range(min(_MAX_COMPOUND_PARTS, len(parts) - i), 1, -1):
            candidate = "_".join(parts[i : i + width])
            if candidate in _COMPOUND_NAMES:
                out.append(candidate)
                i += width
                break
        else:
            out.append(parts[i])
            i += 1
    if any(not part for part in out):
        raise InvalidInputError(f"expected a kohya module name without empty parts, found '{name}'")
    return ".".join(out)


def _bad_unet_key(key: str, family_label: str) -> InvalidInputError:
    return InvalidInputError(f"expected a kohya {family_label} U-Net module name, found '{key}'")


def _diffusers_to_sgm(path: str, layers_per_block: int) -> str:
    """Diffusers U-Net module path -> SGM module path (dotted)."""
    if path in UNET_TOP_LEVEL_TO_SGM:
        return UNET_TOP_LEVEL_TO_SGM[path]
    parts = path.split(".")
    stride = layers_per_block + 1

    def resnet_inner(rest: list[str]) -> str:
        inner = ".".join(rest)
        if inner not in UNET_RESNET_TO_SGM:
            raise _bad_unet_key(path, "SDXL")
        return UNET_RESNET_TO_SGM[inner]

    if len(parts) >= 4 and parts[0] in ("down_blocks", "up_blocks") and parts[1].isdigit() and parts[3].isdigit():
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if parts[0] == "down_blocks":
            if kind == "resnets":
                return f"input_blocks.{1 + block * stride + index}.0.{resnet_inner(rest)}"
            if kind == "attentions" and rest:
                return f"input_blocks.{1 + block * stride + index}.1." + ".".join(rest)
            if kind == "downsamplers" and index == 0 and rest == ["conv"]:
                return f"input_blocks.{(block + 1) * stride}.0.op"
        else:
            if kind == "resnets":
                return f"output_blocks.{block * stride + index}.0.{resnet_inner(rest)}"
            if kind == "attentions" and rest:
                return f"output_blocks.{block * stride + index}.1." + ".".join(rest)
            # SGM puts the up-sampler after the resnet and attention of the block's last layer (index 2). Every SDXL
            # up block that has an up-sampler also has attention; diffusers' loader assumes the same.
            if kind == "upsamplers" and index == 0 and rest == ["conv"]:
                return f"output_blocks.{block * stride + layers_per_block}.2.conv"
    if len(parts) >= 3 and parts[0] == "mid_block" and parts[2].isdigit():
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "resnets" and index in (0, 1):
            return f"middle_block.{2 * index}.{resnet_inner(rest)}"
        if kind == "attentions" and index == 0 and rest:
            return "middle_block.1." + ".".join(rest)
    raise _bad_unet_key(path, "SDXL")


_SGM_INPUT = re.compile(r"^input_blocks_(\d+)_(\d+)_(.+)$")
_SGM_MIDDLE = re.compile(r"^middle_block_(\d+)_(.+)$")
_SGM_OUTPUT = re.compile(r"^output_blocks_(\d+)_(\d+)_(.+)$")


def _sgm_to_diffusers(name: str, layers_per_block: int) -> str:
    """SGM module name with underscores (no ``lora_unet_``) -> diffusers U-Net module path."""
    if name in _SGM_TO_TOP_LEVEL:
        return _SGM_TO_TOP_LEVEL[name]
    stride = layers_per_block + 1

    def resnet(prefix: str, inner: str) -> str:
        if inner not in _SGM_TO_RESNET:
            raise _bad_unet_key(name, "SDXL")
        return f"{prefix}.{_SGM_TO_RESNET[inner]}"

    if match := _SGM_INPUT.match(name):
        number, slot, inner = int(match[1]), int(match[2]), match[3]
        if number == 0:
            raise _bad_unet_key(name, "SDXL")
        block, index = divmod(number - 1, stride)
        if index == layers_per_block:
            if slot == 0 and inner == "op":
                return f"down_blocks.{block}.downsamplers.0.conv"
        elif slot == 0:
            return resnet(f"down_blocks.{block}.resnets.{index}", inner)
        elif slot == 1:
            return f"down_blocks.{block}.attentions.{index}.{_underscores_to_path(inner)}"
    elif match := _SGM_MIDDLE.match(name):
        slot, inner = int(match[1]), match[2]
        if slot in (0, 2):
            return resnet(f"mid_block.resnets.{slot // 2}", inner)
        if slot == 1:
            return f"mid_block.attentions.0.{_underscores_to_path(inner)}"
    elif match := _SGM_OUTPUT.match(name):
        number, slot, inner = int(match[1]), int(match[2]), match[3]
        block, index = divmod(number, stride)
        if slot == 0:
            return resnet(f"up_blocks.{block}.resnets.{index}", inner)
        # An up-sampler sits at slot 2 after an attention, or at slot 1 in a block without attention.
        if inner == "conv" and slot in (1, 2) and index == layers_per_block:
            return f"up_blocks.{block}.upsamplers.0.conv"
        if slot == 1:
            return f"up_blocks.{block}.attentions.{index}.{_underscores_to_path(inner)}"
    raise _bad_unet_key(name, "SDXL")


def _components(pipeline_or_components: Any) -> Mapping[str, Any]:
    if isinstance(pipeline_or_components, Mapping):
        return pipeline_or_components
    components = getattr(pipeline_or_components, "components", None)
    if isinstance(components, Mapping):
        return components
    raise InvalidInputError(
        f"expected a diffusers pipeline or a dict of its components, found {type(pipeline_or_components).__name__}"
    )


_SECTION_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def _unet_order(name: str) -> tuple[int, ...]:
    # down blocks, then the mid block, then up blocks; inside each, numeric order (diffusers registers up before mid).
    head, *rest = name.split(".")
    return (_SECTION_ORDER.get(head, 3), *(int(part) for part in rest if part.isdigit()))


@dataclass(frozen=True)
class ModelFamily:
    """One model family (SD1.x, SD2.x, SDXL) and everything that differs by family.

    >>> SD1.kohya_unet_key("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q'
    """

    name: str
    """Short id written to files: ``sd1``, ``sd2``, ``sdxl``."""
    label: str
    """Human name used in messages: ``SD1.x``, ``SD2.x``, ``SDXL``."""
    pipeline_class: type
    """The diffusers pipeline class for text-to-image."""
    text_encoder_attrs: tuple[str, ...]
    """Pipeline attribute names of the text encoders, in kohya/A1111 order."""
    tokenizer_attrs: tuple[str, ...]
    """Pipeline attribute names of the tokenizers, matching `text_encoder_attrs`."""
    embedding_keys: tuple[str, ...]
    """Tensor keys of a textual-inversion embedding file, one per text encoder (A1111/ComfyUI convention)."""
    kohya_text_prefixes: tuple[str, ...]
    """kohya LoRA prefixes of the text encoders, one per text encoder."""
    modelspec_architecture: str
    """Stability ModelSpec architecture of the base model; writers append ``/lora`` or ``/textual-inversion``."""
    ss_base_model_version: str
    """kohya's ``ss_base_model_version`` metadata value."""
    kohya_unet_naming: str
    """How kohya names U-Net modules: ``diffusers`` (module paths) or ``sgm`` (original SDXL names)."""
    unet_lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """U-Net module-name suffixes a LoRA adapts by default (peft ``target_modules``)."""
    text_lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    """Text-encoder module-name suffixes a LoRA adapts by default."""
    sgm_layers_per_block: int = 2
    """``layers_per_block`` assumed by the SGM block numbering (2 on every SDXL model)."""

    def __repr__(self) -> str:
        return f"ModelFamily({self.name!r})"

    # -- components ---------------------------------------------------------------------------------------------

    def text_encoders(self, pipe: Any) -> list[torch.nn.Module]:
        """The pipeline's text encoders in family order (SDXL: CLIP-L, then OpenCLIP-G)."""
        return [getattr(pipe, attr) for attr in self.text_encoder_attrs]

    def tokenizers(self, pipe: Any) -> list[Any]:
        """The pipeline's tokenizers, matching `text_encoders`."""
        return [getattr(pipe, attr) for attr in self.tokenizer_attrs]

    def embedding_widths(self, pipe: Any) -> tuple[int, ...]:
        """Token-embedding width of each text encoder (SD1.5: ``(768,)``; SDXL: ``(768, 1280)``)."""
        return tuple(int(encoder.get_input_embeddings().weight.shape[1]) for encoder in self.text_encoders(pipe))

    def cross_attention_layers(self, unet: Any) -> list[str]:
        """The U-Net's cross-attention processor names in U-Net order: down blocks, mid block, up blocks.

        These are keys of ``unet.attn_processors`` (``...attn2.processor``); SD1.5 has 16 of them.
        """
        names = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
        return sorted(names, key=_unet_order)

    # -- kohya names --------------------------------------------------------------------------------------------

    def kohya_unet_key(self, diffusers_module_path: str) -> str:
        """kohya/A1111 LoRA module key of a U-Net module path, e.g. ``conv_in`` -> ``lora_unet_conv_in`` (SD1)."""
        path = diffusers_module_path
        if self.kohya_unet_naming == "sgm":
            path = _diffusers_to_sgm(path, self.sgm_layers_per_block)
        return KOHYA_UNET_PREFIX + path.replace(".", "_")

    def diffusers_unet_path(self, kohya_key: str) -> str:
        """The diffusers U-Net module path of a kohya module key (inverse of `kohya_unet_key`)."""
        if not kohya_key.startswith(KOHYA_UNET_PREFIX):
            raise _bad_unet_key(kohya_key, self.label)
        name = kohya_key[len(KOHYA_UNET_PREFIX) :]
        if self.kohya_unet_naming == "sgm":
            return _sgm_to_diffusers(name, self.sgm_layers_per_block)
        return _underscores_to_path(name)

    def kohya_text_key(self, encoder_index: int, module_path: str) -> str:
        """kohya module key of a text-encoder module; ``encoder_index`` counts from 0 in `text_encoder_attrs` order.

        Module paths are named from the CLIP ``text_model`` root as kohya and A1111 write them, whether or not the
        installed transformers nests a ``text_model`` inside ``CLIPTextModel`` (transformers 5 does not).

        >>> SDXL.kohya_text_key(1, "text_model.encoder.layers.0.self_attn.q_proj")
        'lora_te2_text_model_encoder_layers_0_self_attn_q_proj'
        >>> SD1.kohya_text_key(0, "encoder.layers.0.self_attn.q_proj")
        'lora_te_text_model_encoder_layers_0_self_attn_q_proj'
        """
        if not 0 <= encoder_index < len(self.kohya_text_prefixes):
            raise InvalidInputError(
                f"expected a text encoder index below {len(self.kohya_text_prefixes)} for {self.label}, "
                f"found {encoder_index}"
            )
        path = canonical_text_path(module_path)
        return f"{self.kohya_text_prefixes[encoder_index]}_{path.replace('.', '_')}"

    def diffusers_text_path(self, kohya_key: str) -> tuple[int, str]:
        """``(encoder_index, module_path)`` of a kohya text-encoder key (inverse of `kohya_text_key`).

        The path is canonical (``text_model.encoder...``, as diffusers-format LoRA files spell it); use
        `text_module_path` to find the module in a loaded encoder.
        """
        for index, prefix in enumerate(self.kohya_text_prefixes):
            if kohya_key.startswith(prefix + "_"):
                return index, _underscores_to_path(kohya_key[len(prefix) + 1 :])
        expected = " or ".join(f"'{prefix}_'" for prefix in self.kohya_text_prefixes)
        raise InvalidInputError(
            f"expected a {self.label} text-encoder key starting with {expected}, found '{kohya_key}'"
        )

    def is_kohya_text_key(self, kohya_key: str) -> bool:
        """Whether a kohya module key names one of this family's text encoders."""
        return any(kohya_key.startswith(prefix + "_") for prefix in self.kohya_text_prefixes)


SD1 = ModelFamily(
    name="sd1",
    label="SD1.x",
    pipeline_class=StableDiffusionPipeline,
    text_encoder_attrs=("text_encoder",),
    tokenizer_attrs=("tokenizer",),
    embedding_keys=("emb_params",),
    kohya_text_prefixes=("lora_te",),
    modelspec_architecture="stable-diffusion-v1",
    ss_base_model_version="sd_v1",
    kohya_unet_naming="diffusers",
)

SD2 = ModelFamily(
    name="sd2",
    label="SD2.x",
    pipeline_class=StableDiffusionPipeline,
    text_encoder_attrs=("text_encoder",),
    tokenizer_attrs=("tokenizer",),
    embedding_keys=("emb_params",),
    kohya_text_prefixes=("lora_te",),
    modelspec_architecture="stable-diffusion-v2-512",
    ss_base_model_version="sd_v2",
    kohya_unet_naming="diffusers",
)

SDXL = ModelFamily(
    name="sdxl",
    label="SDXL",
    pipeline_class=StableDiffusionXLPipeline,
    text_encoder_attrs=("text_encoder", "text_encoder_2"),
    tokenizer_attrs=("tokenizer", "tokenizer_2"),
    embedding_keys=("clip_l", "clip_g"),
    kohya_text_prefixes=("lora_te1", "lora_te2"),
    modelspec_architecture="stable-diffusion-xl-v1-base",
    ss_base_model_version="sdxl_base_v1-0",
    kohya_unet_naming="sgm",
)

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SD1, SD2, SDXL)}

# SD2's OpenCLIP-H text encoder: GELU activations and 1024-wide hidden states fed to the U-Net's cross-attention.
_SD2_CROSS_ATTENTION_DIM = 1024


def family_by_name(name: str) -> ModelFamily:
    """The family for a stored name (``sd1``, ``sd2``, ``sdxl``), e.g. from an adapter file's metadata."""
    if name not in FAMILIES:
        raise InvalidInputError(f"expected a model family ({', '.join(FAMILIES)}), found '{name}'")
    return FAMILIES[name]


def detect_family(pipeline_or_components: Any) -> ModelFamily:
    """The family of a pipeline (or a dict of its components, as ``pipe.components``).

    SDXL when there is a second text encoder or the U-Net takes ``text_time`` added conditioning; SD2.x when the text
    encoder is OpenCLIP-like (``hidden_act`` ``gelu``) and cross-attention is 1024 wide; otherwise SD1.x.

    >>> from studio.testing import build_tiny_sd1_pipeline
    >>> detect_family(build_tiny_sd1_pipeline()).name
    'sd1'
    """
    components = _components(pipeline_or_components)
    unet = components.get("unet")
    text_encoder = components.get("text_encoder")
    if unet is None or (text_encoder is None and components.get("text_encoder_2") is None):
        found = ", ".join(sorted(name for name, value in components.items() if value is not None)) or "nothing"
        raise InvalidInputError(f"expected a Stable Diffusion pipeline with a U-Net and a text encoder, found {found}")
    if components.get("text_encoder_2") is not None or unet.config.get("addition_embed_type") == "text_time":
        return SDXL
    hidden_act = getattr(getattr(text_encoder, "config", None), "hidden_act", None)
    if hidden_act == "gelu" and unet.config.get("cross_attention_dim") == _SD2_CROSS_ATTENTION_DIM:
        return SD2
    return SD1


# CLIP text-encoder modules that sit beside ``text_model`` rather than inside it.
_TEXT_TOP_LEVEL = frozenset({"text_model", "text_projection"})


def canonical_text_path(module_path: str) -> str:
    """A CLIP text-encoder module path named from the ``text_model`` root, as kohya, A1111 and diffusers files do.

    >>> canonical_text_path("encoder.layers.0.mlp.fc1"), canonical_text_path("text_projection")
    ('text_model.encoder.layers.0.mlp.fc1', 'text_projection')
    """
    if module_path.split(".", 1)[0] in _TEXT_TOP_LEVEL:
        return module_path
    return "text_model." + module_path


def text_module_path(encoder: torch.nn.Module, canonical_path: str) -> str:
    """The path of a canonical text-encoder module path inside this encoder (``encoder.get_submodule`` accepts it).

    transformers 5 flattened ``CLIPTextModel`` (no ``text_model`` child) but not ``CLIPTextModelWithProjection``.
    """
    if canonical_path.startswith("text_model.") and not hasattr(encoder, "text_model"):
        return canonical_path[len("text_model.") :]
    return canonical_path


def iter_lora_layers(module: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Module]]:
    """``(path, module)`` for every Linear and Conv2d of a module: the layers a LoRA (or LoCon) can adapt.

    Layers already wrapped by peft are reported once, under their own path, with the base layer's weight.
    """
    for path, child in module.named_modules():
        if not isinstance(child, torch.nn.Linear | torch.nn.Conv2d):
            continue
        parts = path.split(".")
        if any(part in PEFT_ADAPTER_PARTS for part in parts):
            continue
        if parts[-1] == "base_layer":
            path = ".".join(parts[:-1])
        yield path, child


# Sub-module names peft adds inside a wrapped layer; they are adapter weights, not base-model layers.
PEFT_ADAPTER_PARTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"})
