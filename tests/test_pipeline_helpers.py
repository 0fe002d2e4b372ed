"""Builders shared by the pipeline tests: adapter files for the tiny random pipelines, written into tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from studio.adapter_files import AdapterFile, AdapterMetadata, save_adapter
from studio.base_models import BaseModel
from studio.families import ModelFamily, detect_family
from studio.testing import build_tiny_sd1_pipeline


def random_lora(pipe, *, seed: int, rank: int = 4, scale: float = 0.3, text_encoder: bool = False) -> AdapterFile:
    """A kohya-layout LoRA on every U-Net attention projection (and optionally the text encoder), with a visible
    effect: the up weights are non-zero."""
    family: ModelFamily = detect_family(pipe)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def add(key: str, module: torch.nn.Linear) -> None:
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * scale
        tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * scale
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))

    for name, module in pipe.unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")) and isinstance(module, torch.nn.Linear):
            add(family.kohya_unet_key(name), module)
    if text_encoder:
        for name, module in pipe.text_encoder.named_modules():
            if name.endswith(family.text_lora_targets) and isinstance(module, torch.nn.Linear):
                path = name if name.startswith("text_model.") else f"text_model.{name}"
                add(family.kohya_text_key(0, path), module)
    return AdapterFile(tensors, AdapterMetadata(kind="lora", family=family.name))


def random_embedding(
    *, seed: int, vectors: int = 1, width: int = 32, placeholder: str = "<sks>", family: str = "sd1"
) -> AdapterFile:
    """A textual-inversion file with random vectors (scaled like CLIP token embeddings, so they matter)."""
    generator = torch.Generator().manual_seed(seed)
    keys = ("clip_l", "clip_g") if family == "sdxl" else ("emb_params",)
    tensors = {key: torch.randn(vectors, width, generator=generator) for key in keys}
    meta = AdapterMetadata(kind="textual_inversion", family=family, placeholder_tokens=[placeholder])
    return AdapterFile(tensors, meta)


def write(folder: Path, name: str, adapter: AdapterFile) -> Path:
    """Save ``adapter`` as ``<folder>/<name>.safetensors``."""
    return save_adapter(folder / f"{name}.safetensors", adapter)


def tiny_base(seed: int = 0) -> BaseModel:
    """A fresh tiny random SD1.x base model (each service mutates its pipeline, so tests do not share one)."""
    return BaseModel.from_pipeline(build_tiny_sd1_pipeline(seed=seed), "tiny-random")


def pixels(image) -> np.ndarray:
    """An image as an int array, to compare exactly or measure a difference."""
    return np.asarray(image).astype(np.int16)


def stock_image(pipe, prompt: str, *, seed: int, steps: int, size: int, guidance: float = 7.5) -> np.ndarray:
    """What the untouched diffusers pipeline makes for a prompt and seed."""
    generator = torch.Generator("cpu").manual_seed(seed)
    output = pipe(
        prompt, num_inference_steps=steps, guidance_scale=guidance, width=size, height=size, generator=generator
    )
    return pixels(output.images[0])
