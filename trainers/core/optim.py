"""Optimizers and learning-rate schedules by name.

``adamw8bit`` needs bitsandbytes. When it is asked for and bitsandbytes is missing, that is an error
(`NotAvailableError`), not a silent fall-back to AdamW: the user chose it to fit in memory, and a run that quietly
needs twice the optimizer memory fails later and less clearly::

    optimizer = make_optimizer(params, "adamw", lr=1e-4)
    scheduler = make_lr_scheduler(optimizer, "constant_with_warmup", warmup_steps=10, total_steps=500)
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from diffusers.optimization import SchedulerType, get_scheduler

from studio.errors import InvalidInputError, NotAvailableError

__all__ = ["LR_SCHEDULERS", "OPTIMIZERS", "make_lr_scheduler", "make_optimizer"]

OptimizerName = Literal["adamw", "adamw8bit"]
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit")
LR_SCHEDULERS: tuple[str, ...] = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)


def make_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
    name: OptimizerName = "adamw",
    *,
    lr: float,
    weight_decay: float = 1e-2,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW (torch) or 8-bit AdamW (bitsandbytes) over ``params`` (tensors or param groups).

    Raises `InvalidInputError` for an unknown name or a non-finite/non-positive lr, and `NotAvailableError` for
    ``adamw8bit`` without bitsandbytes.

    >>> make_optimizer(torch.nn.Linear(2, 2).parameters(), "adamw", lr=1e-4).defaults["lr"]
    0.0001
    """
    if not (math.isfinite(lr) and lr > 0):
        raise InvalidInputError(f"config key 'lr' expects a positive finite float, got '{lr}'")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise InvalidInputError(f"config key 'weight_decay' expects a non-negative float, got '{weight_decay}'")
    params = list(params)
    if not params:
        raise ValueError("make_optimizer got no parameters to train")
    if name == "adamw":
        # foreach is the fast default on every device; fused is CUDA-only and gains little for adapter-sized models.
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise NotAvailableError(
                "optimizer 'adamw8bit' needs the bitsandbytes package, which is not installed; "
                "install it (CUDA machines) or use optimizer 'adamw'"
            )
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    raise InvalidInputError(f"config key 'optimizer' expects one of {', '.join(OPTIMIZERS)}, got {name!r}")


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "constant",
    *,
    warmup_steps: int = 0,
    total_steps: int,
    num_cycles: int = 1,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """A diffusers learning-rate schedule (``diffusers.optimization.get_scheduler``) counted in optimizer steps.

    With accelerate, count steps the way the prepared scheduler does (it steps once per process per update).
    """
    if name not in LR_SCHEDULERS:
        raise InvalidInputError(f"config key 'lr_scheduler' expects one of {', '.join(LR_SCHEDULERS)}, got {name!r}")
    if warmup_steps < 0 or total_steps < 1:
        raise InvalidInputError(
            f"lr schedule expects warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}"
        )
    return get_scheduler(
        SchedulerType(name),
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
        num_cycles=num_cycles,
        power=power,
    )
