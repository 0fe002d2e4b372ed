"""LoRA for training: inject peft LoRA layers, collect them in the kohya layout, load kohya weights back, eject.

Shared by the DreamBooth trainer and textual inversion's pivotal tuning. peft does the layers (``lora_A`` random,
``lora_B`` zero, so a fresh adapter is a no-op); this module only names them the way the studio stores LoRAs: kohya
keys through the model family (``lora_down`` = ``lora_A``, ``lora_up`` = ``lora_B``, an explicit ``.alpha``; scale
alpha / rank on both sides)::

    inject_lora(unet, rank=4, alpha=4.0, targets=family.unet_lora_targets, seed=0)
    ...train the parameters of lora_parameters(unet)...
    tensors = kohya_state_dict(family, unet, text_encoders=[])
    eject_lora(unet)  # the U-Net is the stock module again

Injection is exactly reversible: `eject_lora` puts every wrapped layer's base layer back in its place.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from studio.errors import InvalidInputError
from studio.families import ModelFamily

__all__ = [
    "ADAPTER_NAME",
    "eject_lora",
    "inject_lora",
    "kohya_lora_header",
    "kohya_state_dict",
    "load_kohya_state_dict",
    "lora_layers",
    "lora_parameters",
]

ADAPTER_NAME = "studio_train"
"""peft adapter name of the LoRA being trained (distinct from names the shared pipeline uses)."""

_DOWN, _UP, _ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


def inject_lora(
    model: torch.nn.Module,
    *,
    rank: int,
    alpha: float,
    targets: Sequence[str],
    seed: int | None = None,
    adapter_name: str = ADAPTER_NAME,
) -> list[str]:
    """Wrap the modules of ``model`` whose names end with one of ``targets`` in peft LoRA layers; returns their paths.

    ``seed`` makes the random ``lora_A`` initialisation independent of the global RNG (the same adapter on every
    process of a distributed run and across a resume). Only the new LoRA parameters require grad afterwards.

    >>> from studio.testing import build_tiny_sd1_pipeline
    >>> len(inject_lora(build_tiny_sd1_pipeline().unet, rank=4, alpha=4, targets=["to_q"], seed=0))
    4
    """
    if rank < 1:
        raise InvalidInputError(f"LoRA rank expects a positive int, got '{rank}'")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            inject_adapter_in_model(config, model, adapter_name=adapter_name)
        except ValueError as exc:
            # peft: "Target modules {...} not found in the base model."
            raise InvalidInputError(
                f"LoRA targets {list(targets)} match no module of {type(model).__name__}: {exc}"
            ) from None
    model.requires_grad_(False)
    paths = []
    for path, layer in lora_layers(model, adapter_name):
        layer.lora_A[adapter_name].requires_grad_(True)
        layer.lora_B[adapter_name].requires_grad_(True)
        paths.append(path)
    return paths


def lora_layers(model: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> Iterator[tuple[str, LoraLayer]]:
    """``(module path, peft layer)`` of every layer of ``model`` that holds the adapter ``adapter_name``."""
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield path, module


def lora_parameters(model: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters of ``model`` (``lora_A``, ``lora_B`` of every wrapped layer), in a fixed order."""
    params: list[torch.nn.Parameter] = []
    for _, layer in lora_layers(model, adapter_name):
        params.extend(layer.lora_A[adapter_name].parameters())
        params.extend(layer.lora_B[adapter_name].parameters())
    return params


def _kohya_key(family: ModelFamily, encoder_index: int | None, path: str) -> str:
    return family.kohya_unet_key(path) if encoder_index is None else family.kohya_text_key(encoder_index, path)


def _models(
    unet: torch.nn.Module | None, text_encoders: Sequence[torch.nn.Module | None]
) -> Iterator[tuple[int | None, torch.nn.Module]]:
    if unet is not None:
        yield None, unet
    for index, encoder in enumerate(text_encoders):
        if encoder is not None:
            yield index, encoder


def kohya_state_dict(
    family: ModelFamily,
    unet: torch.nn.Module | None,
    text_encoders: Sequence[torch.nn.Module | None] = (),
    *,
    adapter_name: str = ADAPTER_NAME,
) -> dict[str, torch.Tensor]:
    """The trained LoRA as kohya tensors (float32, CPU): ``<key>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.

    ``text_encoders`` are in family order; None skips one. Module keys come from the family (SGM names for SDXL).
    """
    tensors: dict[str, torch.Tensor] = {}
    for index, model in _models(unet, text_encoders):
        for path, layer in lora_layers(model, adapter_name):
            key = _kohya_key(family, index, path)
            tensors[key + _DOWN] = layer.lora_A[adapter_name].weight.detach().float().cpu().clone()
            tensors[key + _UP] = layer.lora_B[adapter_name].weight.detach().float().cpu().clone()
            tensors[key + _ALPHA] = torch.tensor(float(layer.lora_alpha[adapter_name]))
    return tensors


@torch.no_grad()
def load_kohya_state_dict(
    family: ModelFamily,
    tensors: Mapping[str, torch.Tensor],
    unet: torch.nn.Module | None,
    text_encoders: Sequence[torch.nn.Module | None] = (),
    *,
    adapter_name: str = ADAPTER_NAME,
) -> int:
    """Copy kohya LoRA weights into injected peft layers (resume); returns the number of layers loaded.

    Every injected layer must find its weights with matching shapes and alpha, and every module in ``tensors`` must
    have an injected layer: a checkpoint from another configuration is an error, not a partial load.
    """
    expected = {key.removesuffix(_DOWN) for key in tensors if key.endswith(_DOWN)}
    loaded = 0
    for index, model in _models(unet, text_encoders):
        for path, layer in lora_layers(model, adapter_name):
            key = _kohya_key(family, index, path)
            if key + _DOWN not in tensors or key + _UP not in tensors:
                raise InvalidInputError(f"expected LoRA weights for '{key}' in the saved state, found none")
            down, up = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            if tuple(tensors[key + _DOWN].shape) != tuple(down.shape) or tuple(tensors[key + _UP].shape) != tuple(
                up.shape
            ):
                raise InvalidInputError(
                    f"LoRA '{key}' in the saved state has shapes {list(tensors[key + _DOWN].shape)} and "
                    f"{list(tensors[key + _UP].shape)}, expected {list(down.shape)} and {list(up.shape)}"
                )
            saved_alpha = float(tensors.get(key + _ALPHA, torch.tensor(float(down.shape[0]))))
            if abs(saved_alpha - float(layer.lora_alpha[adapter_name])) > 1e-6:
                raise InvalidInputError(
                    f"LoRA '{key}' was saved with alpha {saved_alpha:g}, expected {layer.lora_alpha[adapter_name]:g}"
                )
            down.copy_(tensors[key + _DOWN].to(down.device, down.dtype))
            up.copy_(tensors[key + _UP].to(up.device, up.dtype))
            expected.discard(key)
            loaded += 1
    if expected:
        raise InvalidInputError(f"the saved state has LoRA weights for {sorted(expected)[0]!r}, which is not trained")
    return loaded


def eject_lora(model: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> int:
    """Replace every peft layer holding only ``adapter_name`` by its base layer; returns how many were replaced.

    Layers that also hold other adapters keep them and only lose ``adapter_name``.
    """
    removed = 0
    for path, layer in list(lora_layers(model, adapter_name)):
        others = [name for name in layer.lora_A if name != adapter_name]
        if others:
            layer.delete_adapter(adapter_name)
            continue
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, layer.get_base_layer())
        removed += 1
    return removed


def kohya_lora_header(
    family: ModelFamily,
    *,
    name: str,
    rank: int,
    alpha: float,
    base_model: str,
    trigger_words: Sequence[str],
    resolution: int,
    created: str,
    training: Mapping[str, object] | None = None,
) -> dict[str, str]:
    """kohya ``ss_*`` and Stability ModelSpec header keys of a trained LoRA (what A1111 and ComfyUI show on its card).

    ``training`` adds more ``ss_*`` keys as they are (learning rate, steps, tag frequency, ...); values become strings.
    """
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": family.ss_base_model_version,
        "ss_output_name": name,
        "ss_sd_model_name": base_model,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_training_comment": f"trigger words: {', '.join(trigger_words)}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.modelspec_architecture}/lora",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": created,
        "modelspec.trigger_phrase": ", ".join(trigger_words),
    }
    for key, value in (training or {}).items():
        header[key] = value if isinstance(value, str) else json.dumps(value)
    return header
