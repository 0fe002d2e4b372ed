"""Noise, timesteps, training targets, min-SNR weights and the (optionally masked) diffusion loss.

Pure functions over a diffusers noise scheduler (``DDPMScheduler`` and friends). A training step reads::

    noise = sample_noise(latents, generator, offset_noise=0.1)
    timesteps = sample_timesteps(scheduler, latents.shape[0], generator, device=latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = training_target(scheduler, latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states).sample
    weights = min_snr_weights(scheduler, timesteps, gamma=5.0)
    loss = diffusion_loss(pred, target, weights=weights, mask=batch.masks)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from studio.errors import InvalidInputError

__all__ = [
    "diffusion_loss",
    "min_snr_weights",
    "prediction_type_of",
    "sample_noise",
    "sample_timesteps",
    "training_target",
]

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    # Draw on the generator's device so a CPU generator gives the same numbers whatever device trains.
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device, like.dtype)


def sample_noise(latents: torch.Tensor, generator: torch.Generator | None, offset_noise: float = 0.0) -> torch.Tensor:
    """Gaussian noise shaped like ``latents``, plus ``offset_noise * randn(B, C, 1, 1)`` (lets the model learn to
    make images darker or brighter overall).

    >>> sample_noise(torch.zeros(2, 4, 8, 8), torch.Generator().manual_seed(0), 0.1).shape
    torch.Size([2, 4, 8, 8])
    """
    noise = _randn(tuple(latents.shape), generator, latents)
    if offset_noise:
        batch, channels = latents.shape[:2]
        offset = _randn((batch, channels) + (1,) * (latents.ndim - 2), generator, latents)
        noise = noise + offset_noise * offset
    return noise


def sample_timesteps(
    scheduler: Any,
    batch_size: int,
    generator: torch.Generator | None,
    *,
    device: torch.device | str | None = None,
    min_timestep: int = 0,
    max_timestep: int | None = None,
) -> torch.Tensor:
    """Uniform integer timesteps in ``[min_timestep, max_timestep)`` (default: the scheduler's whole range)."""
    high = scheduler.config.num_train_timesteps if max_timestep is None else max_timestep
    if not 0 <= min_timestep < high <= scheduler.config.num_train_timesteps:
        raise InvalidInputError(
            f"timestep range expects 0 <= min < max <= {scheduler.config.num_train_timesteps}, "
            f"got [{min_timestep}, {high})"
        )
    gen_device = generator.device if generator is not None else "cpu"
    steps = torch.randint(min_timestep, high, (batch_size,), generator=generator, device=gen_device)
    return steps.to(device if device is not None else gen_device).long()


def prediction_type_of(scheduler: Any, prediction_type: str | None = None) -> str:
    """The prediction type to train for: the given one, else the scheduler's; refuses unknown types."""
    kind = prediction_type or scheduler.config.prediction_type
    if kind not in _PREDICTION_TYPES:
        raise InvalidInputError(f"prediction_type expects one of {', '.join(_PREDICTION_TYPES)}, got {kind!r}")
    return kind


def training_target(
    scheduler: Any,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prediction_type: str | None = None,
) -> torch.Tensor:
    """What the model should predict: the noise (epsilon), the velocity (v_prediction, via ``get_velocity``) or the
    clean latents (sample)."""
    kind = prediction_type_of(scheduler, prediction_type)
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return latents


def min_snr_weights(
    scheduler: Any, timesteps: torch.Tensor, gamma: float = 5.0, prediction_type: str | None = None
) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023).

    ``min(SNR, gamma) / SNR`` for epsilon, ``min(SNR, gamma) / (SNR + 1)`` for v-prediction, ``min(SNR, gamma)`` for
    sample prediction. A timestep with SNR 0 (zero-terminal-SNR schedules) gets weight 1 for epsilon instead of NaN.
    """
    if not gamma > 0:
        raise InvalidInputError(f"config key 'snr_gamma' expects a positive float, got '{gamma}'")
    # Imported here: diffusers.training_utils costs seconds to import and only this function needs it.
    from diffusers.training_utils import compute_snr

    kind = prediction_type_of(scheduler, prediction_type)
    snr = compute_snr(scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=gamma)
    if kind == "epsilon":
        weights = clipped / snr
        return torch.where(snr == 0, torch.ones_like(weights), weights)
    if kind == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error per sample (in float32), times ``weights`` when given, averaged over the batch.

    With ``mask`` (B1HW or BHW in [0, 1] at image or latent size), each sample's error is averaged over the masked
    area only; the mask is resized to the latent size with area averaging.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    error = (pred.float() - target.float()) ** 2
    if mask is None:
        per_sample = error.flatten(1).mean(dim=1)
    else:
        if mask.ndim == error.ndim - 1:
            mask = mask.unsqueeze(1)
        mask = mask.to(device=error.device, dtype=torch.float32)
        if mask.shape[-2:] != error.shape[-2:]:
            mask = F.interpolate(mask, size=error.shape[-2:], mode="area")
        mask = mask.expand_as(error)
        # clamp: an all-zero mask gives zero loss, not NaN.
        per_sample = (error * mask).flatten(1).sum(dim=1) / mask.flatten(1).sum(dim=1).clamp(min=1e-6)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device, torch.float32)
    return per_sample.mean()
