"""Devices, precision and distribution (through accelerate), seeding, gradient checkpointing, fast attention.

Nothing here picks a device at import time; a trainer asks once, at the start of its run::

    accelerator = make_accelerator(mixed_precision="bf16", gradient_accumulation_steps=2, seed=0)
    enable_gradient_checkpointing(unet)
    enable_fast_attention(unet)

Under ``accelerate launch --num_processes N`` the same call joins the process group (DDP; gloo on CPU).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import set_seed

from studio.errors import InvalidInputError, NotAvailableError

__all__ = [
    "MIXED_PRECISIONS",
    "enable_fast_attention",
    "enable_gradient_checkpointing",
    "has_accelerator_device",
    "make_accelerator",
    "seed_everything",
]

logger = logging.getLogger(__name__)

MixedPrecision = Literal["no", "fp16", "bf16"]
MIXED_PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")


def has_accelerator_device() -> bool:
    """Whether a GPU-like device (CUDA, XPU, MPS) is present; checked when asked, never at import."""
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return True
    return bool(torch.backends.mps.is_available())


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy, torch and every CUDA device (accelerate's ``set_seed``)."""
    set_seed(seed)


def make_accelerator(
    mixed_precision: MixedPrecision = "no",
    gradient_accumulation_steps: int = 1,
    seed: int | None = None,
    cpu: bool | None = None,
    **accelerator_kwargs: Any,
) -> Accelerator:
    """An `accelerate.Accelerator` for one training run.

    ``cpu=None`` uses a GPU when there is one; ``cpu=True`` forces the CPU. fp16 needs a GPU (CPU autocast is
    bf16-only) and is refused on CPU with a message naming the alternatives. In a single process, a run whose
    precision or device differs from the previous run in the same process (the job queue) gets a fresh accelerate
    state instead of accelerate's "already initialized" error.

    >>> make_accelerator("no", cpu=True).device.type  # doctest: +SKIP
    'cpu'
    """
    if mixed_precision not in MIXED_PRECISIONS:
        raise InvalidInputError(
            f"config key 'mixed_precision' expects one of {', '.join(MIXED_PRECISIONS)}, got {mixed_precision!r}"
        )
    if gradient_accumulation_steps < 1:
        raise InvalidInputError(
            f"config key 'gradient_accumulation_steps' expects a positive int, got '{gradient_accumulation_steps}'"
        )
    on_cpu = bool(cpu) or not has_accelerator_device()
    if mixed_precision == "fp16" and on_cpu:
        raise InvalidInputError(
            "mixed_precision 'fp16' needs a GPU but this run is on the CPU; use mixed_precision 'bf16' or 'no'"
        )
    _reset_stale_state(mixed_precision, cpu=bool(cpu))
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        cpu=bool(cpu),
        **accelerator_kwargs,
    )
    if seed is not None:
        # device_specific: each DDP process draws different noise, as separate GPUs should.
        set_seed(seed, device_specific=accelerator.num_processes > 1)
    return accelerator


def _reset_stale_state(mixed_precision: str, *, cpu: bool) -> None:
    # accelerate keeps one process-wide state and refuses a second Accelerator with other settings. A job worker runs
    # many trainings in one process, so a single-process state is reset (accelerate's own tests do the same).
    state = AcceleratorState._shared_state
    if not state:
        return
    partial = PartialState()
    if partial.num_processes > 1:
        return  # a distributed launch: one run per process; accelerate's own check applies
    same_precision = str(state.get("_mixed_precision", mixed_precision)) == mixed_precision
    same_device = (partial.device.type == "cpu") == (cpu or not has_accelerator_device())
    if not (same_precision and same_device):
        AcceleratorState._reset_state(reset_partial_state=not same_device)


def enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    """Trade compute for memory: recompute activations in the backward pass (diffusers and transformers models).

    Uses non-reentrant checkpointing so frozen inputs (LoRA on a frozen text encoder) still get gradients.
    """
    if hasattr(module, "enable_gradient_checkpointing"):  # diffusers ModelMixin
        if not getattr(module, "_supports_gradient_checkpointing", True):
            raise NotAvailableError(f"{type(module).__name__} does not support gradient checkpointing")
        module.enable_gradient_checkpointing()
    elif hasattr(module, "gradient_checkpointing_enable"):  # transformers PreTrainedModel
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise NotAvailableError(f"{type(module).__name__} does not support gradient checkpointing")


def enable_fast_attention(unet: torch.nn.Module) -> str:
    """Use xformers on CUDA when it is installed, else PyTorch SDPA; returns ``"xformers"`` or ``"sdpa"``.

    Custom attention processors (NeTI, preference adapters) are kept: only plain non-SDPA processors are swapped.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    device = next(unet.parameters()).device
    if device.type == "cuda" and importlib.util.find_spec("xformers") is not None:
        try:
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        except (ImportError, ValueError, RuntimeError, NotImplementedError) as error:
            logger.warning("xformers could not be enabled (%s); using PyTorch SDPA", error)
    processors = dict(unet.attn_processors)
    if any(type(p) is AttnProcessor for p in processors.values()):
        unet.set_attn_processor(
            {name: AttnProcessor2_0() if type(p) is AttnProcessor else p for name, p in processors.items()}
        )
    return "sdpa"
