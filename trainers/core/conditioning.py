"""What the U-Net is conditioned on during training: prompt embeddings, and for SDXL-style U-Nets pooled text
embeddings plus size/crop "time ids".

Prompts are encoded with the pipeline's own ``encode_prompt`` (no gradient blocking there, so a text-encoder LoRA
trains through it). Whether the U-Net wants added conditioning is read from the U-Net itself
(``addition_embed_type == "text_time"``), once, so a training loop calls the same two functions for every family::

    text = encode_prompts(pipe, ["a sks toy"], device)          # {"prompt_embeds": ..., ["pooled_prompt_embeds"]}
    kwargs = unet_inputs(pipe.unet, text, height=64, width=64)  # encoder_hidden_states (+ added_cond_kwargs)
    pred = unet(noisy, timesteps, **kwargs).sample
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["encode_prompts", "needs_added_conditioning", "unet_inputs"]

PROMPT_EMBEDS = "prompt_embeds"
POOLED_EMBEDS = "pooled_prompt_embeds"


def needs_added_conditioning(unet: Any) -> bool:
    """Whether the U-Net takes pooled text embeddings and micro-conditioning time ids (SDXL's ``text_time``)."""
    return unet.config.get("addition_embed_type") == "text_time"


def encode_prompts(pipe: Any, prompts: Sequence[str], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Text conditioning of ``prompts`` (batch first): ``prompt_embeds`` and, when the U-Net needs it, the pooled one.

    Gradients flow when the caller has them enabled (text-encoder LoRA); wrap in ``torch.no_grad()`` to cache.
    """
    outputs = pipe.encode_prompt(
        prompt=list(prompts), device=torch.device(device), num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    result = {PROMPT_EMBEDS: outputs[0]}
    if needs_added_conditioning(pipe.unet):
        # SDXL's encode_prompt returns (embeds, negative embeds, pooled, negative pooled).
        result[POOLED_EMBEDS] = outputs[2]
    return result


def unet_inputs(
    unet: Any, text: Mapping[str, torch.Tensor], *, height: int, width: int, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``unet(noisy, timesteps, **kwargs)`` from `encode_prompts` output, for images of
    ``height`` x ``width`` pixels (uncropped: original size = target size, crop at 0, 0)."""
    embeds = text[PROMPT_EMBEDS]
    if dtype is not None:
        embeds = embeds.to(dtype)
    kwargs: dict[str, Any] = {"encoder_hidden_states": embeds}
    if needs_added_conditioning(unet):
        batch = embeds.shape[0]
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=embeds.dtype, device=embeds.device)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": text[POOLED_EMBEDS].to(embeds.dtype),
            "time_ids": time_ids.expand(batch, -1),
        }
    return kwargs
