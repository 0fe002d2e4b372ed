"""Runtime helpers: accelerate on CPU, precision choices explained, checkpointing, attention, optimizers."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from studio.errors import InvalidInputError, NotAvailableError
from studio.testing import build_tiny_sd1_pipeline
from trainers.core.optim import make_lr_scheduler, make_optimizer
from trainers.core.runtime import (
    enable_fast_attention,
    enable_gradient_checkpointing,
    has_accelerator_device,
    make_accelerator,
    seed_everything,
)


def test_cpu_accelerator_and_precision_switches_in_one_process() -> None:
    accelerator = make_accelerator("no", gradient_accumulation_steps=2, seed=0, cpu=True)
    assert accelerator.device.type == "cpu" and accelerator.gradient_accumulation_steps == 2
    # The job queue runs several trainings in one process with different settings.
    bf16 = make_accelerator("bf16", cpu=True)
    assert bf16.mixed_precision == "bf16"
    again = make_accelerator("no", gradient_accumulation_steps=3, cpu=True)
    assert again.mixed_precision == "no" and again.gradient_accumulation_steps == 3


def test_bad_runtime_choices_are_explained() -> None:
    with pytest.raises(InvalidInputError, match="'fp16' needs a GPU .* 'bf16' or 'no'"):
        make_accelerator("fp16", cpu=True)
    if not has_accelerator_device():
        with pytest.raises(InvalidInputError, match="'fp16' needs a GPU"):
            make_accelerator("fp16")
    with pytest.raises(InvalidInputError, match="mixed_precision"):
        make_accelerator("fp8", cpu=True)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="gradient_accumulation_steps"):
        make_accelerator("no", gradient_accumulation_steps=0, cpu=True)


def test_seed_everything_repeats_draws() -> None:
    seed_everything(7)
    first = torch.rand(3)
    seed_everything(7)
    assert torch.equal(first, torch.rand(3))


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    pipe = build_tiny_sd1_pipeline(seed=0)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    unet.train()
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))

    def grads() -> torch.Tensor:
        unet.zero_grad(set_to_none=True)
        unet(sample, 10, context).sample.pow(2).mean().backward()
        return unet.conv_in.weight.grad.clone()

    before = grads()
    enable_gradient_checkpointing(unet)
    enable_gradient_checkpointing(text_encoder)
    assert unet.is_gradient_checkpointing and text_encoder.is_gradient_checkpointing
    assert torch.allclose(grads(), before, atol=1e-6)
    with pytest.raises(NotAvailableError, match="Linear does not support gradient checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_fast_attention_on_cpu_is_sdpa_and_keeps_custom_processors() -> None:
    unet = build_tiny_sd1_pipeline(seed=0).unet

    class Custom(AttnProcessor2_0):
        pass

    processors = dict(unet.attn_processors)
    names = list(processors)
    unet.set_attn_processor({n: Custom() if i == 0 else AttnProcessor() for i, n in enumerate(names)})
    assert enable_fast_attention(unet) == "sdpa"
    after = unet.attn_processors
    assert type(after[names[0]]) is Custom
    assert all(type(after[n]) is AttnProcessor2_0 for n in names[1:])


def test_optimizer_and_schedule_choices() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(InvalidInputError, match="'lr' expects a positive finite float, got 'nan'"):
        make_optimizer(params, "adamw", lr=float("nan"))
    with pytest.raises(InvalidInputError, match="'optimizer' expects one of adamw, adamw8bit"):
        make_optimizer(params, "sgd", lr=1e-3)  # type: ignore[arg-type]
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(NotAvailableError, match="'adamw8bit' needs the bitsandbytes package"):
            make_optimizer(params, "adamw8bit", lr=1e-3)
    optimizer = make_optimizer(params, "adamw", lr=1.0)
    schedule = make_lr_scheduler(optimizer, "linear", warmup_steps=2, total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.5])
    with pytest.raises(InvalidInputError, match="'lr_scheduler' expects one of"):
        make_lr_scheduler(optimizer, "exponential", total_steps=4)
