"""How much of one DreamBooth LoRA training step is the U-Net's forward and backward pass (the rest is overhead).

Runs the real trainer (`trainers.dreambooth.train_dreambooth`) for a few steps and times each step from its progress
events, then times the U-Net forward + backward alone on the same shapes with the same LoRA layers. Prints, per
model, the median step time, the median U-Net time and their ratio (the share of a step spent in the U-Net):

    python bench/bench_train_step.py [--steps 6] [--skip-sd15]

Models: ``tiny`` (the random tiny fixture until the embedded tiny model exists) at its native size, and the SD1.5
U-Net architecture (random weights, ``studio.testing.sd15_unet_config``) at 256 px (32x32 latents).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from studio.base_models import BaseModel, load_base_model
from studio.home import StudioHome
from studio.library import AdapterLibrary
from studio.testing import build_tiny_sd1_pipeline, load_clip_tokenizer, sd15_unet_config, tiny_model_path
from studio.world.concepts import SHIPPED_CONCEPTS, write_reference_folder
from trainers.core.config import load_config
from trainers.core.lora import inject_lora
from trainers.dreambooth import DreamBoothConfig, train_dreambooth


def tiny_base() -> BaseModel:
    if (tiny_model_path() / "model_index.json").is_file():
        return load_base_model("tiny")
    return BaseModel.from_pipeline(build_tiny_sd1_pipeline(), "tiny-random")


def sd15_base() -> BaseModel:
    """The SD1.5 U-Net with random weights; a small VAE (scale 8) and a one-layer 768-wide text encoder, whose cost
    the trainer caches away anyway."""
    torch.manual_seed(0)
    pipe = build_tiny_sd1_pipeline()
    text = CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=1,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=256,
    )
    config = {**sd15_unet_config(), "sample_size": 32}
    sd15 = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text),
        tokenizer=load_clip_tokenizer(),
        unet=UNet2DConditionModel(**config),
        scheduler=pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return BaseModel.from_pipeline(sd15, "sd15-architecture")


def time_trainer_steps(base: BaseModel, steps: int, work: Path) -> list[float]:
    images = work / "images"
    write_reference_folder(SHIPPED_CONCEPTS["robot-toy"], images, count=3)
    home = StudioHome(work / "home").ensure()
    times: list[float] = []

    def record(event: object) -> None:
        times.append(time.perf_counter())

    config = load_config(
        DreamBoothConfig, values={"class_noun": "toy"}, overrides=[f"steps={steps}", "checkpoint_every=0"]
    )
    train_dreambooth(
        config, images, base, name="bench", library=AdapterLibrary(home), run_dir=home.runs / "bench", progress=record
    )
    # The first step includes warm-up (allocator, kernels); time the steady ones.
    return [b - a for a, b in zip(times[1:], times[2:], strict=False)]


def time_unet(base: BaseModel, repeats: int) -> list[float]:
    pipe = base.pipeline
    unet = pipe.unet
    device = next(unet.parameters()).device
    inject_lora(unet, rank=4, alpha=4.0, targets=base.family.unet_lora_targets, seed=0)
    size = unet.config.sample_size
    latents = torch.randn(1, 4, size, size, device=device)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, device=device)
    timesteps = torch.tensor([500], device=device)
    unet.train()
    results = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        pred = unet(latents, timesteps, encoder_hidden_states=text).sample
        pred.float().pow(2).mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first pass is warm-up
            results.append(time.perf_counter() - start)
        unet.zero_grad(set_to_none=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip-sd15", action="store_true")
    args = parser.parse_args()
    models = [("tiny", tiny_base)] + ([] if args.skip_sd15 else [("sd15-unet@256px", sd15_base)])
    print(f"{'model':<18} {'step s':>9} {'unet f+b s':>11} {'unet share':>10} {'overhead':>9}")
    for label, build in models:
        base = build()
        with tempfile.TemporaryDirectory() as work:
            steps = time_trainer_steps(base, args.steps, Path(work))
        unet = time_unet(base, max(2, args.steps - 2))
        step_s, unet_s = statistics.median(steps), statistics.median(unet)
        share = unet_s / step_s
        print(f"{label:<18} {step_s:>9.4f} {unet_s:>11.4f} {share:>10.2f} {1 - share:>9.2f}")


if __name__ == "__main__":
    main()
