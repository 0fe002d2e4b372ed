"""DreamBooth (Ruiz et al. 2023): bind a rare token to a subject from a few photos, as a LoRA (default) or a full
fine-tune, with optional class-prior preservation.

>>> from studio.base_models import load_base_model  # doctest: +SKIP
>>> config = load_config(DreamBoothConfig, values={"class_noun": "toy"}, overrides=["steps=200"])  # doctest: +SKIP
>>> info = train_dreambooth(config, "photos/", load_base_model("tiny"), name="my-toy",
...                         library=AdapterLibrary(home), run_dir=home.runs / "my-toy")  # doctest: +SKIP

Captions: an image with a ``.txt`` sidecar is trained on that caption; if the caption lacks the token, the first
mention of the class noun becomes "<token> <class noun>" (else the instance prompt is put in front). Images without
a sidecar use the instance prompt ("a sks toy").

Distributed runs (``accelerate launch --num_processes N``): every process draws the same global batch of
``batch_size`` images (and the same noise and timesteps) and trains on its slice ``rank::N``; DDP averages the
gradients, so N processes give the result of one process with the same ``batch_size`` (it must divide by N).

Full mode trains the base model's own U-Net (and text encoder) in place and saves a diffusers folder under
``<home>/models/<name>``; with ``single_file = true`` that folder also holds ``<name>.safetensors``, the same model as
one original-layout checkpoint for AUTOMATIC1111/ComfyUI (`studio.single_file`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import cast_training_params

from pipelines.service import PipelineService
from studio.adapter_files import AdapterFile, AdapterMetadata, utc_now
from studio.errors import AlreadyExistsError, InvalidInputError
from studio.library import AdapterInfo, AdapterLibrary, sanitize_name
from studio.single_file import save_single_file
from trainers.core.caching import TensorCache, cache_latents, cache_text_embeddings
from trainers.core.checkpoint import latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from trainers.core.class_images import class_images
from trainers.core.conditioning import encode_prompts, unet_inputs
from trainers.core.config import config_to_dict, expect_non_negative, expect_positive, load_config, recipe_for
from trainers.core.data import (
    BucketBatchSampler,
    ImageFolderDataset,
    expect_image_folder,
    fit_to_bucket,
    load_image_rgb,
    repeat_batches,
)
from trainers.core.lora import (
    eject_lora,
    inject_lora,
    kohya_lora_header,
    kohya_state_dict,
    load_kohya_state_dict,
    lora_parameters,
)
from trainers.core.noise import diffusion_loss, min_snr_weights, sample_noise, sample_timesteps, training_target
from trainers.core.optim import make_lr_scheduler, make_optimizer
from trainers.core.progress import ProgressEvent, ProgressReporter, TqdmProgress
from trainers.core.runtime import enable_gradient_checkpointing, make_accelerator

logger = logging.getLogger(__name__)

__all__ = ["BASE_RECIPES", "DreamBoothConfig", "FineTunedModel", "train_dreambooth", "train_from_cli"]

DEFAULT_LR = {"lora": 1e-4, "full": 5e-6}
RUN_FILE = "run.json"
_TOKEN = re.compile(r"^\S+$")


@dataclass(frozen=True)
class DreamBoothConfig:
    """Every DreamBooth option, with its one default. ``None`` means "derived": see `resolve`."""

    mode: Literal["lora", "full"] = "lora"
    rank: int = 4
    alpha: float | None = None  # None: = rank
    unet_targets: tuple[str, ...] | None = None  # None: the family's (to_q, to_k, to_v, to_out.0)
    train_text_encoder: bool = False
    text_encoder_rank: int | None = None  # None: = rank
    text_encoder_targets: tuple[str, ...] | None = None  # None: the family's (q_proj, k_proj, v_proj, out_proj)
    lr: float | None = None  # None: 1e-4 for LoRA, 5e-6 for full
    text_encoder_lr: float | None = None  # None: = lr
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # 0: no clipping
    steps: int = 500
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    resolution: int | None = None  # None: the base model's native size
    buckets: bool = True
    token: str = "sks"
    class_noun: str = ""
    instance_prompt: str = "a {token} {class_noun}"
    class_prompt: str = "a {class_noun}"
    prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    class_images_dir: Path | None = None
    class_image_steps: int = 20
    sample_every: int = 0  # 0: no samples during training
    sample_prompts: tuple[str, ...] = ("a {token} {class_noun}",)
    sample_seeds: tuple[int, ...] = (0,)
    sample_steps: int = 20
    sample_guidance: float = 7.5
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    min_snr_gamma: float | None = None  # 5.0 is the published value
    offset_noise: float = 0.0
    use_8bit_adam: bool = False
    checkpoint_every: int = 100  # 0: no checkpoints
    keep_checkpoints: int = 1
    cache_latents: bool = True
    single_file: bool = False  # full mode: also write <name>.safetensors, one A1111/ComfyUI checkpoint

    def validate(self) -> None:
        """Ranges and combinations; called by the config loader."""
        expect_positive(self, "rank", "text_encoder_rank", "steps", "batch_size", "gradient_accumulation_steps")
        expect_positive(self, "lr", "text_encoder_lr", "alpha", "resolution", "num_class_images")
        expect_positive(self, "class_image_steps", "sample_steps", "keep_checkpoints")
        expect_non_negative(self, "prior_loss_weight", "offset_noise", "weight_decay", "max_grad_norm")
        expect_non_negative(self, "sample_every", "checkpoint_every", "lr_warmup_steps", "sample_guidance")
        expect_positive(self, "min_snr_gamma")
        if not _TOKEN.match(self.token):
            raise InvalidInputError(f"config key 'token' expects one word without spaces, got {self.token!r}")
        if not self.class_noun.strip():
            raise InvalidInputError("config key 'class_noun' expects the subject's class (e.g. dog), got ''")
        for key in ("instance_prompt", "class_prompt"):
            _fill(getattr(self, key), self, key)
        if self.single_file and self.mode != "full":
            raise InvalidInputError("config key 'single_file' applies to mode 'full' only")

    def resolve(self, base: Any) -> DreamBoothConfig:
        """The effective config for a base model: every ``None`` replaced by its derived value (saved with outputs)."""
        family = base.family
        pipe = base.pipeline
        rank_alpha = float(self.rank) if self.alpha is None else self.alpha
        lr = DEFAULT_LR[self.mode] if self.lr is None else self.lr
        return dataclasses.replace(
            self,
            alpha=rank_alpha,
            unet_targets=self.unet_targets or tuple(family.unet_lora_targets),
            text_encoder_rank=self.text_encoder_rank or self.rank,
            text_encoder_targets=self.text_encoder_targets or tuple(family.text_lora_targets),
            lr=lr,
            text_encoder_lr=self.text_encoder_lr or lr,
            resolution=self.resolution or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor),
        )


@dataclass
class FineTunedModel:
    """A full fine-tune's output: a diffusers folder that ``--base`` accepts."""

    name: str
    path: Path
    base_model: str
    config: dict[str, Any]


def _fill(template: str, config: DreamBoothConfig, key: str = "sample_prompts") -> str:
    try:
        return template.format(token=config.token, class_noun=config.class_noun)
    except (KeyError, IndexError, ValueError):
        raise InvalidInputError(
            f"config key {key!r} expects a prompt using only {{token}} and {{class_noun}}, got {template!r}"
        ) from None


def instance_caption(config: DreamBoothConfig, sidecar: str) -> str:
    """The prompt an instance image trains on (see the module docstring)."""
    if not sidecar:
        return _fill(config.instance_prompt, config, "instance_prompt")
    if re.search(rf"(?<!\S){re.escape(config.token)}(?!\S)", sidecar):
        return sidecar
    noun = re.compile(rf"\b{re.escape(config.class_noun)}\b")
    if noun.search(sidecar):
        return noun.sub(f"{config.token} {config.class_noun}", sidecar, count=1)
    return f"{_fill(config.instance_prompt, config, 'instance_prompt')}, {sidecar}"


def _tag_frequency(folder: Path, captions: Sequence[str]) -> dict[str, dict[str, int]]:
    # kohya's ss_tag_frequency: comma-separated tags counted per image folder.
    tags = Counter(tag.strip() for caption in captions for tag in caption.split(",") if tag.strip())
    return {folder.name: dict(tags)}


def _step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    # Noise, timesteps and class-image choice depend only on (seed, step, micro-step): identical on every process,
    # and a resumed run draws exactly what the uninterrupted run would have.
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + step) * 64 + micro)


BASE_RECIPES: dict[str, dict[str, Any]] = {"tiny": {"rank": 8, "lr": 1e-3, "steps": 300, "batch_size": 4}}
"""Measured defaults per base model, under the TOML file, the UI's values and ``--set`` (`load_config`'s
``recipe``). The field defaults are the usual SD1.x LoRA recipe. On the embedded `tiny` (robot-toy,
``python bench/eval_dreambooth.py --runs plain``, with and without ``--steps 500 --lr 1e-4 --rank 4 --set
batch_size=1``) they reached similarity 0.491 (base model 0.420) in 34 s; a rank-8 LoRA at lr 1e-3 and batch 4
reached 0.601 in 36 s. The demo trains with it."""


def train_dreambooth(
    config: DreamBoothConfig,
    images_dir: str | Path,
    base: Any,
    *,
    name: str,
    library: AdapterLibrary,
    run_dir: str | Path,
    progress: Sequence[Callable[[ProgressEvent], None]] | Callable[[ProgressEvent], None] | None = None,
    resume: bool = False,
) -> AdapterInfo | FineTunedModel:
    """Train DreamBooth on the images in ``images_dir`` and store the result; returns the library entry (LoRA mode)
    or the saved model folder (full mode).

    ``base`` is a `studio.base_models.BaseModel`; in LoRA mode its pipeline gets the LoRA layers for the run and
    loses them at the end. ``progress`` receives `trainers.core.progress.ProgressEvent` s (main process only).
    With ``resume`` the newest complete checkpoint in ``run_dir`` is continued. Nothing is written to the library
    unless training finished.
    """
    cfg = config.resolve(base)
    cfg.validate()
    name = sanitize_name(name)
    images_dir, run_dir = Path(images_dir), Path(run_dir)
    home = library.home
    models_dir = home.root / "models" / name
    if cfg.mode == "lora" and library.exists(name):
        raise AlreadyExistsError(f"an adapter named '{name}' already exists; choose another --name or remove it first")
    if cfg.mode == "full" and models_dir.exists():
        raise AlreadyExistsError(f"a model named '{name}' already exists in {models_dir.parent}; choose another --name")
    pipe, family = base.pipeline, base.family
    fingerprint = base.fingerprint  # before any layer is added to the pipeline
    accelerator = make_accelerator(cfg.mixed_precision, cfg.gradient_accumulation_steps, seed=cfg.seed)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if cfg.batch_size % world:
        raise InvalidInputError(
            f"config key 'batch_size' expects a multiple of the {world} processes (each takes a slice of every batch), "
            f"got '{cfg.batch_size}'"
        )
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.mixed_precision]

    # 1. Load the instance images (bad files fail here, before anything is trained) and their prompts.
    levels = len(pipe.unet.config.block_out_channels) - 1
    bucket_step = int(pipe.vae_scale_factor) * 2**levels
    dataset = ImageFolderDataset(images_dir, resolution=cfg.resolution, bucket_step=bucket_step, buckets=cfg.buckets)
    captions = [instance_caption(cfg, caption) for caption in dataset.captions]
    class_prompt = _fill(cfg.class_prompt, cfg, "class_prompt")
    pipe.to(device)

    # 2. Class images for prior preservation, made by the untouched base model (main process first; the others
    #    then find them in the cache). The service is closed before training so that it leaves no processors behind.
    class_pixels: list[Any] = []
    if cfg.prior_preservation:
        services: list[PipelineService] = []

        def make_service() -> PipelineService:
            services.append(PipelineService(base, device))
            return services[-1]

        with accelerator.main_process_first():
            try:
                paths = class_images(
                    class_prompt,
                    cfg.num_class_images,
                    cache_root=home.cache,
                    base_fingerprint=fingerprint,
                    make_service=make_service,
                    folder=cfg.class_images_dir,
                    seed=cfg.seed,
                    steps=cfg.class_image_steps,
                    size=cfg.resolution,
                )
            finally:
                for service in services:
                    service.close()
        class_pixels = [load_image_rgb(path) for path in paths]

    # 3. Choose what trains: LoRA layers (U-Net, optionally text encoders) or the whole U-Net (full mode).
    text_encoders = family.text_encoders(pipe)
    frozen = [pipe.vae, *text_encoders] if cfg.mode == "full" else [pipe.vae, pipe.unet, *text_encoders]
    for module in frozen:
        # Frozen weights in the compute precision save memory; trained weights stay float32 (master weights).
        module.requires_grad_(False)
        if weight_dtype != torch.float32:
            module.to(dtype=weight_dtype)
    unet = pipe.unet
    trained_text = text_encoders if cfg.train_text_encoder else []
    if cfg.mode == "lora":
        inject_lora(unet, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.unet_targets, seed=cfg.seed)
        for index, encoder in enumerate(trained_text):
            inject_lora(
                encoder,
                rank=cfg.text_encoder_rank,
                alpha=float(cfg.text_encoder_rank) if config.alpha is None else cfg.alpha,
                targets=cfg.text_encoder_targets,
                seed=cfg.seed + 1 + index,
            )
        unet_params = lora_parameters(unet)
        text_params = [p for encoder in trained_text for p in lora_parameters(encoder)]
    else:
        unet.requires_grad_(True)
        for encoder in trained_text:
            encoder.requires_grad_(True)
        unet_params = [p for p in unet.parameters() if p.requires_grad]
        text_params = [p for encoder in trained_text for p in encoder.parameters() if p.requires_grad]
    cast_training_params([unet, *trained_text], dtype=torch.float32)
    unet.train()
    for encoder in trained_text:
        encoder.train()
    if cfg.gradient_checkpointing:
        for module in (unet, *trained_text):
            enable_gradient_checkpointing(module)

    try:
        # 4. Cache what does not change: VAE latents of every image (per bucket for class images) and, with a frozen
        #    text encoder, the prompt embeddings.
        vae_key = f"{fingerprint}:{cfg.mixed_precision}"
        latent_cache = TensorCache(home.cache / "latents" if cfg.cache_latents else None, kind="latents")
        instance_latents = cache_latents(
            pipe.vae, [dataset.pixels_uint8(i) for i in range(len(dataset))], cache=latent_cache, model_key=vae_key
        )
        class_latents: dict[tuple[int, int], list[torch.Tensor]] = {}
        for bucket in dataset.buckets if cfg.prior_preservation else []:
            fitted = [_uint8_chw(fit_to_bucket(image, bucket)) for image in class_pixels]
            class_latents[bucket] = cache_latents(pipe.vae, fitted, cache=latent_cache, model_key=vae_key)
        prompts = list(dict.fromkeys([*captions, class_prompt]))
        cached_text = None
        if not trained_text:
            cached_text = cache_text_embeddings(
                lambda batch: encode_prompts(pipe, batch, device), prompts, cache=TensorCache(), model_key=vae_key
            )
        if not cfg.cache_latents:
            # Nothing reads the pixels' latents from disk: keep only the in-memory copies computed above.
            logger.info("latents kept in memory only (cache_latents = false)")

        # 5. Optimizer and learning-rate schedule (one schedule step per optimizer step, on every process).
        groups: list[dict[str, Any]] = [{"params": unet_params, "lr": cfg.lr}]
        if text_params:
            groups.append({"params": text_params, "lr": cfg.text_encoder_lr})
        optimizer = make_optimizer(
            groups, "adamw8bit" if cfg.use_8bit_adam else "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        lr_scheduler = make_lr_scheduler(
            optimizer, cfg.lr_scheduler, warmup_steps=cfg.lr_warmup_steps, total_steps=cfg.steps
        )
        ddp_unet, optimizer = accelerator.prepare(unet, optimizer)
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

        def trained_weights() -> dict[str, torch.Tensor]:
            if cfg.mode == "lora":
                return kohya_state_dict(family, unet, trained_text)
            weights = {f"unet.{k}": v for k, v in unet.state_dict().items()}
            for attr, encoder in zip(family.text_encoder_attrs, trained_text, strict=False):
                weights.update({f"{attr}.{k}": v for k, v in encoder.state_dict().items()})
            return weights

        # 6. Resume from the newest complete checkpoint (a folder cut short by a kill is never complete).
        start_step = 0
        checkpoint = latest_checkpoint(run_dir) if resume else None
        if checkpoint is not None:
            state = load_checkpoint(checkpoint)
            _check_same_run(state.get("config", {}), config_to_dict(cfg), checkpoint)
            if cfg.mode == "lora":
                load_kohya_state_dict(family, state["weights"], unet, trained_text)
            else:
                _load_full(state["weights"], unet, family.text_encoder_attrs, trained_text)
            optimizer.load_state_dict(state["optimizer"])
            lr_scheduler.load_state_dict(state["lr_scheduler"])
            restore_rng(state)
            start_step = int(state["step"])
            logger.info("resuming from %s (step %d)", checkpoint, start_step)
        elif resume:
            logger.warning("no complete checkpoint in %s; starting from step 0", run_dir)

        # 7. The loop. Each micro-step draws one global batch of one bucket; this process trains on its slice.
        sampler = BucketBatchSampler(
            dataset.bucket_ids,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            repeats=math.ceil(cfg.batch_size / min(Counter(dataset.bucket_ids).values())),
            drop_last=True,  # equal slices on every process; the repeats above keep every bucket non-empty
        )
        batches = repeat_batches(sampler)
        for _ in range(start_step * cfg.gradient_accumulation_steps):
            next(batches)
        callbacks = [] if progress is None else list(progress) if isinstance(progress, Sequence) else [progress]
        reporter = ProgressReporter(cfg.steps, callbacks if accelerator.is_main_process else [], start_step=start_step)
        mine = slice(rank, None, world)

        def micro_loss(indices: list[int], generator: torch.Generator) -> torch.Tensor:
            bucket = dataset.buckets[dataset.bucket_ids[indices[0]]]
            latents = torch.stack([instance_latents[i] for i in indices])
            batch_prompts = [captions[i] for i in indices]
            masks = dataset.has_masks and [dataset[i].mask for i in indices]
            count = len(indices)
            if cfg.prior_preservation:
                choice = torch.randint(len(class_pixels), (count,), generator=generator).tolist()
                latents = torch.cat([latents, torch.stack([class_latents[bucket][c] for c in choice])])
                batch_prompts += [class_prompt] * count
            # Noise and timesteps for the whole global batch, then this process's rows of each half.
            noise = sample_noise(latents, generator, cfg.offset_noise)
            timesteps = sample_timesteps(noise_scheduler, latents.shape[0], generator)
            rows = list(range(count))[mine]
            if cfg.prior_preservation:
                rows += [count + r for r in rows]
            rows_t = torch.tensor(rows)
            latents, noise, timesteps = (
                latents[rows_t].to(device),
                noise[rows_t].to(device),
                timesteps[rows_t].to(device),
            )
            batch_prompts = [batch_prompts[r] for r in rows]
            if cached_text is not None:
                text = {
                    k: torch.stack([cached_text[p][k] for p in batch_prompts]).to(device)
                    for k in cached_text[prompts[0]]
                }
            else:
                text = encode_prompts(pipe, batch_prompts, device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            target = training_target(noise_scheduler, latents, noise, timesteps)
            height, width = bucket[1], bucket[0]
            with accelerator.autocast():
                pred = ddp_unet(
                    noisy.to(weight_dtype),
                    timesteps,
                    **unet_inputs(unet, text, height=height, width=width, dtype=weight_dtype),
                ).sample
            weights = min_snr_weights(noise_scheduler, timesteps, cfg.min_snr_gamma) if cfg.min_snr_gamma else None
            mine_count = len(rows) // (2 if cfg.prior_preservation else 1)
            mask = None
            if masks:
                mask = torch.stack([m if m is not None else torch.ones(1, height, width) for m in masks])[mine]
            loss = diffusion_loss(
                pred[:mine_count], target[:mine_count], weights[:mine_count] if weights is not None else None, mask
            )
            if cfg.prior_preservation:
                prior = diffusion_loss(
                    pred[mine_count:], target[mine_count:], weights[mine_count:] if weights is not None else None
                )
                loss = loss + cfg.prior_loss_weight * prior
            return loss

        trained_params = unet_params + text_params
        samples: list[Path] = []
        for step in range(start_step + 1, cfg.steps + 1):
            step_loss = torch.zeros((), device=device)
            for micro in range(cfg.gradient_accumulation_steps):
                indices = next(batches)
                with accelerator.accumulate(ddp_unet):
                    loss = micro_loss(indices, _step_generator(cfg.seed, step, micro))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        if text_params and world > 1:
                            # The text encoders run outside DDP (through the pipeline's encode_prompt): average their
                            # gradients by hand, as DDP does for the U-Net.
                            for param in text_params:
                                if param.grad is not None:
                                    param.grad = accelerator.reduce(param.grad, reduction="mean")
                        if cfg.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(trained_params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += loss.detach() / cfg.gradient_accumulation_steps
            lr_scheduler.step()
            mean_loss = float(accelerator.reduce(step_loss, reduction="mean"))
            if not math.isfinite(mean_loss):
                raise InvalidInputError(
                    f"training diverged at step {step} (loss {mean_loss}); expected a finite loss: lower 'lr'"
                )

            samples = []
            if cfg.sample_every and step % cfg.sample_every == 0 and accelerator.is_main_process:
                samples = _sample(pipe, cfg, run_dir / "samples", step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                if accelerator.is_main_process:
                    save_checkpoint(
                        run_dir,
                        step,
                        {
                            "weights": trained_weights(),
                            "optimizer": optimizer.state_dict(),
                            "lr_scheduler": lr_scheduler.state_dict(),
                            "config": config_to_dict(cfg),
                        },
                        keep=cfg.keep_checkpoints,
                        metadata={"studio.method": "dreambooth"},
                    )
                accelerator.wait_for_everyone()
            reporter.step(step, loss=mean_loss, lr=lr_scheduler.get_last_lr()[0], samples=samples)
        reporter.close()

        # 8. Save: the LoRA into the library (kohya layout, full metadata) or the fine-tuned model as a folder.
        accelerator.wait_for_everyone()
        effective = config_to_dict(cfg)
        result: AdapterInfo | FineTunedModel
        if cfg.mode == "lora":
            if accelerator.is_main_process:
                created = utc_now()
                triggers = [cfg.token, f"{cfg.token} {cfg.class_noun}"]
                header = kohya_lora_header(
                    family,
                    name=name,
                    rank=cfg.rank,
                    alpha=float(cfg.alpha),
                    base_model=base.name,
                    trigger_words=triggers,
                    resolution=int(cfg.resolution),
                    created=created,
                    training={
                        "ss_learning_rate": cfg.lr,
                        "ss_unet_lr": cfg.lr,
                        "ss_text_encoder_lr": cfg.text_encoder_lr if cfg.train_text_encoder else 0.0,
                        "ss_max_train_steps": cfg.steps,
                        "ss_num_train_images": len(dataset),
                        "ss_batch_size_per_device": cfg.batch_size // world,
                        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                        "ss_seed": cfg.seed,
                        "ss_prior_loss_weight": cfg.prior_loss_weight if cfg.prior_preservation else 0.0,
                        "ss_min_snr_gamma": cfg.min_snr_gamma or 0.0,
                        "ss_tag_frequency": _tag_frequency(images_dir, captions),
                        "ss_training_comment": f"DreamBooth LoRA; trigger words: {', '.join(triggers)}",
                    },
                )
                metadata = AdapterMetadata(
                    kind="lora",
                    family=family.name,
                    base_model=base.name,
                    base_fingerprint=fingerprint,
                    placeholder_tokens=triggers,
                    config=effective,
                    created=created,
                    extra=header,
                )
                library.add(AdapterFile(trained_weights(), metadata), name)
            accelerator.wait_for_everyone()
            result = library.show(name)
        else:
            if accelerator.is_main_process:
                _save_full(pipe, models_dir, {"base_model": base.name, "base_fingerprint": fingerprint, **effective})
            accelerator.wait_for_everyone()
            result = FineTunedModel(name=name, path=models_dir, base_model=base.name, config=effective)
        if accelerator.is_main_process:
            # The result is stored: the run's checkpoints (and any left cut short by a kill) only served a resume.
            for path in [*run_dir.glob("checkpoint-*"), *run_dir.glob(".checkpoint-*")]:
                shutil.rmtree(path, ignore_errors=True)
        return result
    finally:
        if cfg.mode == "lora":
            eject_lora(unet)
            for encoder in trained_text:
                eject_lora(encoder)
        unet.eval()
        for encoder in trained_text:
            encoder.eval()


def _uint8_chw(image: Any) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    # Longer runs, other sample or checkpoint settings are fine to change on resume; anything that shapes the
    # weights or the data order is not.
    free = {"steps", "sample_every", "sample_prompts", "sample_seeds", "sample_steps", "sample_guidance",
            "checkpoint_every", "keep_checkpoints"}  # fmt: skip
    for key, value in current.items():
        if key not in free and key in saved and saved[key] != value:
            raise InvalidInputError(
                f"cannot resume {checkpoint}: it was trained with {key} = {saved[key]!r}, this run has {value!r}"
            )


def _load_full(
    weights: dict[str, torch.Tensor], unet: Any, attrs: Sequence[str], encoders: Sequence[torch.nn.Module]
) -> None:
    unet.load_state_dict({k[len("unet.") :]: v for k, v in weights.items() if k.startswith("unet.")})
    for attr, encoder in zip(attrs, encoders, strict=False):
        prefix = f"{attr}."
        encoder.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})


def _sample(pipe: Any, cfg: DreamBoothConfig, folder: Path, step: int) -> list[Path]:
    """Images from the training pipeline with the current weights, fixed prompts and seeds, as the shared pipeline
    would make them (a fresh scheduler per image, a CPU generator per seed)."""
    from pipelines import save_png

    scheduler = pipe.scheduler
    paths = []
    try:
        for p_index, template in enumerate(cfg.sample_prompts):
            prompt = _fill(template, cfg)
            for seed in cfg.sample_seeds:
                pipe.scheduler = type(scheduler).from_config(scheduler.config)
                image = pipe(
                    prompt=prompt,
                    num_inference_steps=cfg.sample_steps,
                    guidance_scale=cfg.sample_guidance,
                    width=cfg.resolution,
                    height=cfg.resolution,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    output_type="pil",
                ).images[0]
                metadata = {"prompt": prompt, "seed": seed, "steps": cfg.sample_steps, "step": step}
                paths.append(save_png(image, folder / f"step{step:06d}-p{p_index}-s{seed}.png", metadata))
    finally:
        pipe.scheduler = scheduler
    return paths


def _save_full(pipe: Any, target: Path, info: dict[str, Any]) -> None:
    """Write the pipeline as a diffusers folder, atomically (built beside the target, then renamed); with
    ``single_file`` in ``info`` the folder also gets ``<name>.safetensors``, the original-layout checkpoint."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "studio_model.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    if info.get("single_file"):
        # Written inside the folder before the rename, so the model appears with both files or not at all.
        config = {key: value for key, value in info.items() if key not in ("base_model", "base_fingerprint")}
        metadata = {
            "studio.base_model": str(info["base_model"]),
            "studio.base_fingerprint": str(info["base_fingerprint"]),
            "studio.config": json.dumps(config, sort_keys=True, default=str),
            "modelspec.title": target.name,
        }
        save_single_file(pipe, tmp / f"{target.name}.safetensors", metadata)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)


# -- CLI ------------------------------------------------------------------------------------------------------------


def _resolve_run(spec: str, home: Any) -> Path:
    path = Path(spec).expanduser()
    for candidate in (path, home.runs / spec):
        if (candidate / RUN_FILE).is_file():
            return candidate
    raise InvalidInputError(f"expected a run folder with {RUN_FILE} (a path or a name in {home.runs}), found '{spec}'")


def _write_run_file(run_dir: Path, data: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{RUN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, run_dir / RUN_FILE)


def train_from_cli(args: Any, home: Any) -> int:
    """``studio train dreambooth``: build the config (``--config``, ``--token``/``--class-noun``, ``--set``), load
    the base model, train with a progress bar and print where the result is."""
    from studio.base_models import load_base_model

    home.ensure()
    library = AdapterLibrary(home)
    flags = {key: value for key, value in (("token", args.token), ("class_noun", args.class_noun)) if value}

    # 1. Where the run comes from: a fresh start, or an interrupted run's folder.
    if args.resume:
        run_dir = _resolve_run(args.resume, home)
        run = json.loads((run_dir / RUN_FILE).read_text())
        config = load_config(DreamBoothConfig, values={**run["config"], **flags}, overrides=args.set)
        name, images, base_spec = run["name"], run["images"], run["base"]
    else:
        if not args.images:
            raise InvalidInputError("expected --images DIR with the subject's photos, found none")
        name = sanitize_name(args.name)
        config = load_config(
            DreamBoothConfig,
            recipe=recipe_for(BASE_RECIPES, args.base),
            toml_path=args.config,
            values=flags,
            overrides=args.set,
        )
        images, base_spec = str(Path(args.images).expanduser().resolve()), args.base
        run_dir = home.runs / f"dreambooth-{name}"
        if latest_checkpoint(run_dir) is not None:
            raise AlreadyExistsError(
                f"an interrupted run of '{name}' exists in {run_dir}; continue it with --resume {run_dir} "
                "or remove that folder"
            )
    expect_image_folder(images)
    # A taken name fails now, not after training.
    if config.mode == "lora" and library.exists(name):
        raise AlreadyExistsError(f"an adapter named '{name}' already exists; choose another --name or remove it first")

    # 2. Load the base model and train.
    base = load_base_model(base_spec)
    _write_run_file(
        run_dir,
        {"method": "dreambooth", "name": name, "images": images, "base": base_spec, "config": config_to_dict(config)},
    )
    result = train_dreambooth(
        config,
        images,
        base,
        name=name,
        library=library,
        run_dir=run_dir,
        progress=[TqdmProgress(description=f"dreambooth {name}")],
        resume=bool(args.resume),
    )
    if isinstance(result, FineTunedModel):
        print(f"trained model '{result.name}': {result.path}")
    else:
        print(f"trained adapter '{result.name}': {result.path}")
    return 0
