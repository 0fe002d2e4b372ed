"""The recipe that trains the embedded base model ``tiny`` on the shapes world.

``tiny`` is an SD1.x-architecture text-to-image model (AutoencoderKL + UNet2DConditionModel + CLIPTextModel + the CLIP
BPE tokenizer) small enough to train and personalise on a laptop CPU. The recipe is deterministic given its seed and
is resumable: each stage writes its result into the work folder and a rerun skips finished stages.

Stages:
  1. VAE: reconstruct world renders (64x64 -> 4x16x16 latents).
  2. Latents: render a fixed, seeded training set and encode it once.
  3. U-Net + text encoder, trained jointly from scratch with the DDPM objective (10% empty captions for guidance),
     with an exponential moving average of the weights.
  4. Export: a diffusers folder in fp16 plus ``training_record.json`` (seed, steps, wall time, machine).

Run it (CPU or GPU)::

    python -m studio.world.train_tiny --work runs/tiny --out studio/assets/tiny
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from studio.world.scene import caption_for, random_scene, render_array

logger = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip_tokenizer"


@dataclass
class TinyRecipe:
    """Every knob of the recipe, with its one default."""

    seed: int = 0
    vae_steps: int = 2500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    dataset_size: int = 50_000
    unet_steps: int = 3000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    text_lr: float = 5e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    text_width: int = 128
    text_layers: int = 3
    unet_channels: tuple[int, int, int] = (64, 128, 128)
    threads: int = 0
    bf16: bool = True
    checkpoint_every: int = 500


def build_components(recipe: TinyRecipe) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel, CLIPTokenizer]:
    """Fresh (untrained) components of the SD1.x-layout tiny model."""
    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        # Narrow at full resolution: flat-coloured scenes need little capacity, and a CPU pays for every pixel.
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.text_width,
        intermediate_size=recipe.text_width * 4,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=recipe.text_width,
    )
    text_encoder = CLIPTextModel(text_config)
    # No attention at the 16x16 level (as SDXL's first block): it costs most on a CPU and shapes are laid out by the
    # 8x8 and 4x4 levels; the 16x16 level refines edges.
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=recipe.unet_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=recipe.text_width,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    return vae, text_encoder, unet, tokenizer


def make_noise_scheduler() -> DDPMScheduler:
    """SD1.x's training noise schedule."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def render_batch(rng: random.Random, n: int) -> tuple[torch.Tensor, list[str]]:
    scenes = [random_scene(rng) for _ in range(n)]
    pixels = np.stack([render_array(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [caption_for(s) for s in scenes]


def autocast(recipe: TinyRecipe, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.bf16)


# ---------------------------------------------------------------------------------------------------------------------
# 1. VAE


def train_vae(recipe: TinyRecipe, vae: AutoencoderKL, work: Path, device: torch.device) -> None:
    path = work / "vae.safetensors"
    if path.exists():
        vae.load_state_dict(load_file(str(path)))
        logger.info("vae: reusing %s", path)
        return
    rng = random.Random(f"vae:{recipe.seed}")
    vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.vae_lr, total_steps=recipe.vae_steps, pct_start=0.05
    )
    start = time.time()
    for step in range(recipe.vae_steps):
        pixels, _ = render_batch(rng, recipe.vae_batch)
        if step < int(recipe.vae_steps * 0.85):
            # The VAE is convolutional: random 32x32 crops teach the same local reconstruction at a quarter of the
            # cost; the last steps see whole images so the mid-block attention adapts to the 16x16 latent grid.
            y, x = rng.randrange(0, 33, 8), rng.randrange(0, 33, 8)
            pixels = pixels[:, :, y : y + 32, x : x + 32]
        else:
            pixels = pixels[: recipe.vae_batch // 2]
        pixels = pixels.to(device)
        with autocast(recipe, device):
            posterior = vae.encode(pixels).latent_dist
            recon = vae.decode(posterior.sample()).sample
        recon = recon.float()
        # L1 keeps flat colours and sharp edges better than MSE alone.
        loss = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels) + recipe.vae_kl_weight * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == recipe.vae_steps - 1:
            logger.info("vae step %d/%d loss %.4f (%.0fs)", step, recipe.vae_steps, loss.item(), time.time() - start)
    vae.eval()
    save_file({k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}, str(path))


# ---------------------------------------------------------------------------------------------------------------------
# 2. Latents


@torch.no_grad()
def encode_dataset(
    recipe: TinyRecipe, vae: AutoencoderKL, tokenizer: CLIPTokenizer, work: Path, device: torch.device
) -> dict[str, torch.Tensor]:
    path = work / "latents.safetensors"
    if path.exists():
        logger.info("latents: reusing %s", path)
        return load_file(str(path))
    rng = random.Random(f"data:{recipe.seed}")
    vae.to(device).eval()
    latents, token_ids = [], []
    start = time.time()
    for i in range(0, recipe.dataset_size, 256):
        pixels, captions = render_batch(rng, min(256, recipe.dataset_size - i))
        with autocast(recipe, device):
            latents.append(vae.encode(pixels.to(device)).latent_dist.mean.float().cpu())
        token_ids.append(
            tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        )
        if i % 10240 == 0:
            logger.info("latents %d/%d (%.0fs)", i, recipe.dataset_size, time.time() - start)
    data = {"latents": torch.cat(latents).contiguous(), "input_ids": torch.cat(token_ids).to(torch.int32)}
    # Scale latents to unit variance, as SD does with its scaling factor.
    data["scaling_factor"] = torch.tensor([1.0 / data["latents"].std().item()])
    save_file({k: v.contiguous() for k, v in data.items()}, str(path))
    return data


# ---------------------------------------------------------------------------------------------------------------------
# 3. U-Net + text encoder


def train_unet(
    recipe: TinyRecipe,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    tokenizer: CLIPTokenizer,
    data: dict[str, torch.Tensor],
    work: Path,
    device: torch.device,
) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    final = work / "unet_final.pt"
    noise_scheduler = make_noise_scheduler()
    scale = float(data["scaling_factor"][0])
    latents_all = data["latents"] * scale
    ids_all = data["input_ids"].long()
    empty_ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    text_encoder.to(device).train()
    unet.to(device).train()
    ema_text, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    for p in [*ema_text.parameters(), *ema_unet.parameters()]:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": recipe.unet_lr, "weight_decay": 1e-2},
            {"params": list(text_encoder.parameters()), "lr": recipe.text_lr, "weight_decay": 0.0},
        ]
    )

    def lr_lambda(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(1, recipe.unet_steps - recipe.warmup_steps)
        # A plain float: a numpy scalar here would end up in the checkpoint and break weights_only loading.
        return float(0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(1.0, progress))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    generator = torch.Generator().manual_seed(recipe.seed)
    start_step = 0
    checkpoints = sorted(work.glob("unet-step-*.pt"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    if checkpoints:
        # Older checkpoints of this recipe hold numpy scalars in the LR schedule state: allow just those.
        with torch.serialization.safe_globals([np._core.multiarray.scalar, np.dtype, np.dtypes.Float64DType]):
            state = torch.load(checkpoints[-1], weights_only=True)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        start_step = int(state["step"])
        logger.info("unet: resuming from step %d", start_step)
    n = latents_all.shape[0]
    start = time.time()
    losses: list[float] = []
    for step in range(start_step, recipe.unet_steps):
        index = torch.randint(0, n, (recipe.unet_batch,), generator=generator)
        latents = latents_all[index].to(device)
        ids = ids_all[index].clone()
        drop = torch.rand(recipe.unet_batch, generator=generator) < recipe.caption_dropout
        ids[drop] = empty_ids
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, 1000, (recipe.unet_batch,), generator=generator).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with autocast(recipe, device):
            states = text_encoder(ids.to(device))[0]
            pred = unet(noisy, timesteps, states).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *text_encoder.parameters()], 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        # EMA with a warm-up so that early, noisy weights fade quickly.
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, model in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                    pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0 or step == recipe.unet_steps - 1:
            rate = (time.time() - start) / max(1, step + 1 - start_step)
            logger.info(
                "unet step %d/%d loss %.4f (%.2fs/step, eta %.0fs)",
                step,
                recipe.unet_steps,
                float(np.mean(losses[-50:])),
                rate,
                rate * (recipe.unet_steps - step - 1),
            )
        if (step + 1) % recipe.checkpoint_every == 0 and step + 1 < recipe.unet_steps:
            state = {
                "unet": unet.state_dict(),
                "text": text_encoder.state_dict(),
                "ema_unet": ema_unet.state_dict(),
                "ema_text": ema_text.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "generator": generator.get_state(),
                "step": step + 1,
            }
            tmp = work / f".unet-step-{step + 1}.tmp"
            torch.save(state, tmp)
            tmp.rename(work / f"unet-step-{step + 1}.pt")
            # Numeric order: "unet-step-1000" sorts before "unet-step-500" as text.
            newest_last = sorted(work.glob("unet-step-*.pt"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
            for old in checkpoints + newest_last[:-1]:
                old.unlink(missing_ok=True)
            checkpoints = []
    torch.save({"unet": ema_unet.state_dict(), "text": ema_text.state_dict()}, final)
    return ema_text, ema_unet


# ---------------------------------------------------------------------------------------------------------------------
# 4. Export


def export(
    recipe: TinyRecipe,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    tokenizer: CLIPTokenizer,
    scaling_factor: float,
    out: Path,
    record: dict[str, object],
) -> None:
    vae.register_to_config(scaling_factor=scaling_factor)
    scheduler = DPMSolverMultistepScheduler.from_config(make_noise_scheduler().config)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "training_record.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/tiny"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "assets" / "tiny")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    recipe = TinyRecipe()
    for item in args.set:
        key, _, value = item.partition("=")
        current = getattr(recipe, key)
        setattr(
            recipe,
            key,
            type(current)(value) if not isinstance(current, bool) else value.lower() in {"1", "true", "yes"},
        )
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    vae, text_encoder, unet, tokenizer = build_components(recipe)
    t0 = time.time()
    train_vae(recipe, vae, args.work, device)
    timings["vae_s"] = time.time() - t0
    t0 = time.time()
    data = encode_dataset(recipe, vae, tokenizer, args.work, device)
    timings["latents_s"] = time.time() - t0
    t0 = time.time()
    text_encoder, unet = train_unet(recipe, text_encoder, unet, tokenizer, data, args.work, device)
    timings["unet_s"] = time.time() - t0
    record = {
        "recipe": asdict(recipe),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "note": "timings of the last invocation; stages reused from the work folder count 0",
        "machine": {
            "device": str(device),
            "processor": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    export(
        recipe, vae.cpu(), text_encoder.cpu(), unet.cpu(), tokenizer, float(data["scaling_factor"][0]), args.out, record
    )
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
