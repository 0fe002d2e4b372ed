"""Single-file checkpoints: a diffusers pipeline written as one original-layout safetensors file.

AUTOMATIC1111, ComfyUI, Forge and kohya load a full Stable Diffusion model from one file in the layout of the original
training code (CompVis LDM for SD1.x/SD2.x, Stability's SGM for SDXL): ``model.diffusion_model.*`` (U-Net),
``first_stage_model.*`` (VAE) and ``cond_stage_model.*`` / ``conditioner.embedders.N.*`` (text encoders). diffusers
reads that layout (``from_single_file``) but does not write it; `save_single_file` does.

>>> import tempfile, pathlib
>>> from studio.testing import build_tiny_sd1_pipeline
>>> path = pathlib.Path(tempfile.mkdtemp()) / "tiny.safetensors"
>>> save_single_file(build_tiny_sd1_pipeline(), path, {"modelspec.title": "tiny"}).name
'tiny.safetensors'

How the names are derived
-------------------------
The key map is built from the pipeline's own modules, not from a table for one model size, so it holds for SD1.5,
SDXL and the tiny test models alike. The LDM U-Net is a flat list of ``input_blocks`` (``conv_in``, then for every
level its resnet(+attention) layers and its down-sampler), a ``middle_block`` (resnet, attention, resnet) and
``output_blocks`` (one per up-block layer: resnet, then attention, then on a level's last layer the up-sampler).
Walking the diffusers blocks in order and counting gives each layer its LDM number. The LDM VAE numbers decoder
levels from the bottom (``decoder.up.0`` is diffusers' last up block) and stores its mid-block attention projections
as 1x1 convolutions (4-D weights). Text encoders: OpenAI CLIP keeps the transformers names under
``transformer.text_model.``; OpenCLIP (SD2's encoder, SDXL's second) fuses q/k/v into ``in_proj_weight`` and stores
the projection transposed, as its ``x @ text_projection`` expects.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from studio.adapter_files import check_finite, fsync_dir, utc_now
from studio.errors import InvalidInputError, NotAvailableError
from studio.families import (
    PEFT_ADAPTER_PARTS,
    UNET_RESNET_TO_SGM,
    UNET_TOP_LEVEL_TO_SGM,
    ModelFamily,
    canonical_text_path,
    detect_family,
)

__all__ = ["LDM_UNET_PREFIX", "LDM_VAE_PREFIX", "checkpoint_state_dict", "save_single_file"]

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
FORMAT_VERSION = "1"
# ModelSpec names the code a checkpoint's layout belongs to; the original layout is Stability's (kohya writes the same).
_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"

# Where each text encoder goes and in which layout, per family, in the family's text-encoder order. SD2's encoder and
# SDXL's second are OpenCLIP models in the original checkpoints; the others are OpenAI CLIP.
_TEXT_LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "sd1": (("cond_stage_model.transformer.", "clip"),),
    "sd2": (("cond_stage_model.model.", "open_clip"),),
    "sdxl": (("conditioner.embedders.0.transformer.", "clip"), ("conditioner.embedders.1.model.", "open_clip")),
}

# U-Net modules outside the block structure: the SGM names that LoRA key naming uses too, plus the class embedding,
# which the original layout keeps under ``label_emb`` as well.
_UNET_TOP_LEVEL = {
    **UNET_TOP_LEVEL_TO_SGM,
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
}
# Inside a VAE resnet only the shortcut is named differently; inside the VAE mid-block attention every projection is.
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP_LEVEL = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}

# OpenCLIP names of CLIP text-model parts (canonical transformers paths, from the text_model root).
_OPEN_CLIP_TOP_LEVEL = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_QKV = ("q_proj", "k_proj", "v_proj")


# A prefix rule: diffusers module prefix (with trailing dot) -> (LDM prefix, renames of the first inner module name).
_Rules = dict[str, tuple[str, Mapping[str, str]]]


def save_single_file(
    pipe: Any,
    path: str | os.PathLike[str],
    metadata: Mapping[str, object] | None = None,
    *,
    family: ModelFamily | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``pipe`` (U-Net, VAE, text encoders) as one original-layout checkpoint at ``path``, atomically.

    The header carries ``studio.*`` keys (format version, family, kind ``checkpoint``) and ModelSpec keys
    (``modelspec.architecture``, ``modelspec.title`` (default: the file name), ``modelspec.resolution``,
    ``modelspec.prediction_type``, ...); ``metadata`` adds or overrides entries (non-strings are stored as JSON).
    ``family`` defaults to the detected one; ``dtype`` (e.g. ``torch.float16``) casts floating weights, else each
    tensor keeps its dtype. Raises `InvalidInputError` for a pipeline with adapters loaded (they would be dropped) and
    `NotAvailableError` for a module the original layout has no place for.

    >>> save_single_file(pipe, "models/my-dog.safetensors", {"modelspec.title": "my dog"})  # doctest: +SKIP
    """
    path = Path(path)
    family = family or detect_family(pipe)
    # 1. Tensors in the original layout, on the CPU and contiguous (safetensors writes raw buffers). No copy where
    #    none is needed: a checkpoint can be gigabytes.
    tensors = checkpoint_state_dict(pipe, family)
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.contiguous()
    check_finite(tensors, f"checkpoint {path.name}")

    # 2. Header: what it is, for people (ModelSpec) and for the studio.
    header = _header(pipe, family, title=path.stem)
    for key, value in (metadata or {}).items():
        header[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)

    # 3. Write a temporary file beside the target (same filesystem), sync it, then rename it into place.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata=header)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def checkpoint_state_dict(pipe: Any, family: ModelFamily | None = None) -> dict[str, torch.Tensor]:
    """The pipeline's U-Net, VAE and text-encoder weights under original-layout (LDM/SGM) keys.

    Tensors are the modules' own (views where a reshape suffices); `save_single_file` copies them to the CPU.

    >>> from studio.testing import build_tiny_sd1_pipeline
    >>> sorted(checkpoint_state_dict(build_tiny_sd1_pipeline()))[0]
    'cond_stage_model.transformer.text_model.embeddings.position_embedding.weight'
    """
    family = family or detect_family(pipe)
    if family.name not in _TEXT_LAYOUTS:
        raise NotAvailableError(f"single-file checkpoints for {family.label} are not available yet")
    out: dict[str, torch.Tensor] = {}

    # 1. U-Net.
    unet_rules = _unet_rules(pipe.unet)
    for key, tensor in _plain_state_dict(pipe.unet, "U-Net").items():
        out[LDM_UNET_PREFIX + _apply_rules(key, unet_rules, "U-Net")] = tensor

    # 2. VAE: the mid-block attention projections are Linear in diffusers and 1x1 Conv2d in the original.
    vae_rules = _vae_rules(pipe.vae)
    for key, tensor in _plain_state_dict(pipe.vae, "VAE").items():
        ldm_key = _apply_rules(key, vae_rules, "VAE")
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[LDM_VAE_PREFIX + ldm_key] = tensor

    # 3. Text encoders, each in its family's layout.
    encoders = family.text_encoders(pipe)
    for encoder, (prefix, layout) in zip(encoders, _TEXT_LAYOUTS[family.name], strict=True):
        weights = {canonical_text_path(k): v for k, v in _plain_state_dict(encoder, "text encoder").items()}
        converted = _clip_layout(weights) if layout == "clip" else _open_clip_layout(weights)
        out.update({prefix + key: tensor for key, tensor in converted.items()})
    return out


def _header(pipe: Any, family: ModelFamily, *, title: str) -> dict[str, str]:
    size = int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
    prediction = str(pipe.scheduler.config.get("prediction_type", "epsilon"))
    now = utc_now()
    return {
        "studio.format_version": FORMAT_VERSION,
        "studio.kind": "checkpoint",
        "studio.family": family.name,
        "studio.created": now,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": _IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}",
        # ModelSpec spells v-prediction "v".
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else prediction,
        "modelspec.date": now,
    }


def _plain_state_dict(module: torch.nn.Module, what: str) -> dict[str, torch.Tensor]:
    state = module.state_dict()
    for key in state:
        if any(part in PEFT_ADAPTER_PARTS for part in key.split(".")):
            raise InvalidInputError(
                f"expected a {what} without adapters loaded, found adapter weight '{key}'; unload or merge it first"
            )
    return state


def _apply_rules(key: str, rules: _Rules, what: str) -> str:
    """Rename ``key`` by its longest matching module prefix; the first inner name may be renamed too."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:cut]) + "." if cut else ""
        if prefix not in rules:
            continue
        target, inner_names = rules[prefix]
        rest = ".".join(parts[cut:])
        # Inner names may span two parts ("to_out.0"); longest first.
        for name in sorted(inner_names, key=len, reverse=True):
            if rest.startswith(name + "."):
                rest = inner_names[name] + rest[len(name) :]
                break
        return target + rest
    raise NotAvailableError(f"single-file export of {what} weight '{key}' is not available yet (no original name)")


def _unet_rules(unet: Any) -> _Rules:
    rules: _Rules = {f"{name}.": (f"{ldm}.", {}) for name, ldm in _UNET_TOP_LEVEL.items()}
    if getattr(unet, "mid_block", None) is None or not hasattr(unet.mid_block, "attentions"):
        raise NotAvailableError("single-file export of a U-Net whose mid block has no attention is not available yet")

    # 1. Input blocks: after conv_in, one per down-block layer (resnet, attention), then one per down-sampler.
    number = 1
    for level, block in enumerate(unet.down_blocks):
        for index in range(len(block.resnets)):
            rules[f"down_blocks.{level}.resnets.{index}."] = (f"input_blocks.{number}.0.", UNET_RESNET_TO_SGM)
            if getattr(block, "attentions", None) is not None:
                rules[f"down_blocks.{level}.attentions.{index}."] = (f"input_blocks.{number}.1.", {})
            number += 1
        if getattr(block, "downsamplers", None):
            rules[f"down_blocks.{level}.downsamplers.0.conv."] = (f"input_blocks.{number}.0.op.", {})
            number += 1

    # 2. Middle block: resnet, attention, resnet.
    rules["mid_block.resnets.0."] = ("middle_block.0.", UNET_RESNET_TO_SGM)
    rules["mid_block.attentions.0."] = ("middle_block.1.", {})
    rules["mid_block.resnets.1."] = ("middle_block.2.", UNET_RESNET_TO_SGM)

    # 3. Output blocks: one per up-block layer; a level's up-sampler joins its last layer, after the attention if any.
    number = 0
    for level, block in enumerate(unet.up_blocks):
        has_attention = getattr(block, "attentions", None) is not None
        for index in range(len(block.resnets)):
            rules[f"up_blocks.{level}.resnets.{index}."] = (f"output_blocks.{number}.0.", UNET_RESNET_TO_SGM)
            if has_attention:
                rules[f"up_blocks.{level}.attentions.{index}."] = (f"output_blocks.{number}.1.", {})
            number += 1
        if getattr(block, "upsamplers", None):
            slot = 2 if has_attention else 1
            rules[f"up_blocks.{level}.upsamplers.0.conv."] = (f"output_blocks.{number - 1}.{slot}.conv.", {})
    return rules


def _vae_rules(vae: Any) -> _Rules:
    rules: _Rules = {f"{name}.": (f"{ldm}.", {}) for name, ldm in _VAE_TOP_LEVEL.items()}
    for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out"):
        rules[f"{name}."] = (f"{name}.", {})
    for name in ("quant_conv", "post_quant_conv"):
        if getattr(vae, name, None) is not None:
            rules[f"{name}."] = (f"{name}.", {})
    for side in ("encoder", "decoder"):
        rules[f"{side}.mid_block.attentions.0."] = (f"{side}.mid.attn_1.", _VAE_ATTENTION)
        for index in range(len(getattr(vae, side).mid_block.resnets)):
            rules[f"{side}.mid_block.resnets.{index}."] = (f"{side}.mid.block_{index + 1}.", _VAE_RESNET)
    # Encoder levels keep their order; decoder levels are numbered from the bottom in the original.
    for level, block in enumerate(vae.encoder.down_blocks):
        ours, theirs = f"encoder.down_blocks.{level}.", f"encoder.down.{level}."
        for index in range(len(block.resnets)):
            rules[f"{ours}resnets.{index}."] = (f"{theirs}block.{index}.", _VAE_RESNET)
        if getattr(block, "downsamplers", None):
            rules[f"{ours}downsamplers.0.conv."] = (f"{theirs}downsample.conv.", {})
    levels = len(vae.decoder.up_blocks)
    for level, block in enumerate(vae.decoder.up_blocks):
        ours, theirs = f"decoder.up_blocks.{level}.", f"decoder.up.{levels - 1 - level}."
        for index in range(len(block.resnets)):
            rules[f"{ours}resnets.{index}."] = (f"{theirs}block.{index}.", _VAE_RESNET)
        if getattr(block, "upsamplers", None):
            rules[f"{ours}upsamplers.0.conv."] = (f"{theirs}upsample.conv.", {})
    return rules


def _clip_layout(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # OpenAI CLIP in the original checkpoints is the transformers model itself, under its text_model root.
    return dict(weights)


def _open_clip_layout(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}  # "resblocks.N.attn.in_proj_weight" -> {"q_proj": ..., ...}
    layer_prefix = "text_model.encoder.layers."
    for key, tensor in weights.items():
        if key in _OPEN_CLIP_TOP_LEVEL:
            out[_OPEN_CLIP_TOP_LEVEL[key]] = tensor
        elif key == "text_projection.weight":
            # transformers applies x @ W.T (Linear); OpenCLIP applies x @ text_projection.
            out["text_projection"] = tensor.T
        elif key.startswith(layer_prefix):
            number, rest = key[len(layer_prefix) :].split(".", 1)
            module, param = rest.rsplit(".", 1)
            if module.startswith("self_attn.") and module.split(".", 1)[1] in _QKV:
                fused.setdefault(f"transformer.resblocks.{number}.attn.in_proj_{param}", {})[module[10:]] = tensor
            elif module in _OPEN_CLIP_LAYER:
                out[f"transformer.resblocks.{number}.{_OPEN_CLIP_LAYER[module]}.{param}"] = tensor
            else:
                raise NotAvailableError(f"single-file export of text-encoder weight '{key}' is not available yet")
        else:
            raise NotAvailableError(f"single-file export of text-encoder weight '{key}' is not available yet")
    for key, parts in fused.items():
        if set(parts) != set(_QKV):
            raise InvalidInputError(f"expected q, k and v projections for '{key}', found {', '.join(sorted(parts))}")
        # OpenCLIP's nn.MultiheadAttention packs the projections in q, k, v order.
        out[key] = torch.cat([parts[name] for name in _QKV])
    return out
