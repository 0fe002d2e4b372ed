"""Noise, targets, min-SNR weights and the masked loss, checked against the formulas of the papers."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from studio.errors import InvalidInputError
from trainers.core.noise import diffusion_loss, min_snr_weights, sample_noise, sample_timesteps, training_target


def _scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
    )


def test_noise_is_seeded_and_offset_shifts_whole_channels() -> None:
    latents = torch.zeros(2, 4, 8, 8)
    plain = sample_noise(latents, torch.Generator().manual_seed(0), offset_noise=0.0)
    assert torch.equal(plain, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    offset = sample_noise(latents, torch.Generator().manual_seed(0), offset_noise=0.5)
    shift = offset - plain
    # The offset is one value per (sample, channel): constant over the spatial dims, and not zero.
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift))
    assert shift.abs().sum() > 0


def test_timesteps_in_range_and_seeded() -> None:
    scheduler = _scheduler()
    steps = sample_timesteps(scheduler, 256, torch.Generator().manual_seed(1))
    assert steps.dtype == torch.long and 0 <= steps.min() and steps.max() < 1000
    again = sample_timesteps(scheduler, 256, torch.Generator().manual_seed(1))
    assert torch.equal(steps, again)
    narrow = sample_timesteps(scheduler, 64, torch.Generator().manual_seed(1), min_timestep=200, max_timestep=300)
    assert 200 <= narrow.min() and narrow.max() < 300
    with pytest.raises(InvalidInputError, match="timestep range"):
        sample_timesteps(scheduler, 4, None, min_timestep=500, max_timestep=100)


def test_targets_epsilon_and_v_prediction() -> None:
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(training_target(_scheduler("epsilon"), latents, noise, t), noise)
    v_sched = _scheduler("v_prediction")
    a = v_sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * noise - (1 - a).sqrt() * latents  # Salimans & Ho: v = sqrt(a) eps - sqrt(1-a) x0
    assert torch.allclose(training_target(v_sched, latents, noise, t), expected, atol=1e-6)
    assert torch.equal(training_target(_scheduler("sample"), latents, noise, t), latents)
    with pytest.raises(InvalidInputError, match="prediction_type"):
        training_target(v_sched, latents, noise, t, prediction_type="flow")


def test_min_snr_weights_match_the_formula() -> None:
    scheduler = _scheduler()
    t = torch.tensor([0, 50, 300, 999])
    a = scheduler.alphas_cumprod[t].double()
    snr = a / (1 - a)
    gamma = 5.0
    eps = min_snr_weights(scheduler, t, gamma=gamma, prediction_type="epsilon")
    v = min_snr_weights(scheduler, t, gamma=gamma, prediction_type="v_prediction")
    assert torch.allclose(eps.double(), torch.clamp(snr, max=gamma) / snr, rtol=1e-4)
    assert torch.allclose(v.double(), torch.clamp(snr, max=gamma) / (snr + 1), rtol=1e-4)
    assert eps[0] < 0.01 and eps[-1] == pytest.approx(1.0)  # low noise is down-weighted, high noise kept
    assert torch.all(v <= 1.0)
    # Zero-terminal-SNR schedules: no NaN at SNR 0.
    zsnr = DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True)
    assert torch.isfinite(min_snr_weights(zsnr, torch.tensor([999]), gamma=5.0, prediction_type="epsilon")).all()


def test_loss_weights_and_masks() -> None:
    pred = torch.zeros(2, 4, 8, 8)
    target = torch.zeros(2, 4, 8, 8)
    target[:, :, :, 4:] = 2.0  # error only in the right half
    assert diffusion_loss(pred, target).item() == pytest.approx(2.0)  # mean of 4 over half the pixels
    weights = torch.tensor([1.0, 0.0])
    assert diffusion_loss(pred, target, weights=weights).item() == pytest.approx(1.0)
    # A 64x64 image mask (left half = subject) is resized to the 8x8 latent: the error outside it does not count.
    left = torch.zeros(2, 1, 64, 64)
    left[..., :32] = 1.0
    assert diffusion_loss(pred, target, mask=left).item() == pytest.approx(0.0)
    assert diffusion_loss(pred, target, mask=1 - left).item() == pytest.approx(4.0)
    assert diffusion_loss(pred, target, mask=torch.zeros(2, 64, 64)).item() == 0.0  # no NaN for an empty mask
    with pytest.raises(ValueError, match="differs"):
        diffusion_loss(pred, target[:, :3])
