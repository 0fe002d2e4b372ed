"""Textual inversion (Gal et al. 2022): learn a new word for a concept from a few images, changing nothing else.

A placeholder token such as ``<my-toy>`` gets ``num_vectors`` new rows in every text encoder's token table (SDXL:
one embedding per text encoder), initialised from an init word, and only those rows train: the U-Net, the VAE, the
text encoders and every other row of the table stay exactly as they were (`trainers.core.embeddings`). The result is
a `textual_inversion` adapter of a few KB under the family's embedding keys (``emb_params`` ``[n, width]``, or
``clip_l``/``clip_g``) that A1111, ComfyUI and diffusers read.

Options:

- ``learnable_property``: ``object`` or ``style`` prompt templates, or ``use_captions`` for the images' own
  ``.txt`` captions with the placeholder put in (in place of the init word, at ``{}``, or in front);
- ``core_weight > 0``: CoRe-style context regularisation (Wu et al. 2024): in new-context prompts, the text
  encoder's outputs for the words after the placeholder are kept close (cosine) to what they are after the init
  word, so the new word composes with prompts instead of swallowing them;
- ``pivotal``: pivotal tuning, the token trained together with a U-Net LoRA (`trainers.core.lora`), saved as one
  ``lora`` adapter carrying both (kohya's bundled-embedding keys, see `bundle_embedding_keys`).

Multi-token init words ("teddy bear") start every vector from the mean of their tokens' rows (documented choice: the
mean stays where words live in the table; refusing would push users to worse single-token words).

>>> cfg = TextualInversionConfig(placeholder_token="<my-toy>", init_word="toy", steps=200)
>>> info = train_textual_inversion(cfg, "photos/", "tiny", name="my-toy", library=lib, run_dir=run)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from studio.adapter_files import AdapterFile, AdapterMetadata
from studio.errors import AlreadyExistsError, InvalidInputError, NotFoundError
from studio.families import ModelFamily
from studio.formats import bundle_embedding_keys, split_pivotal_adapter
from studio.home import StudioHome
from studio.library import AdapterInfo, AdapterLibrary, sanitize_name
from trainers.core.caching import TensorCache, cache_latents
from trainers.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trainers.core.conditioning import encode_prompts, unet_inputs
from trainers.core.config import (
    config_to_dict,
    expect_in_range,
    expect_non_negative,
    expect_positive,
    load_config,
    recipe_for,
)
from trainers.core.data import ImageFolderDataset, expect_image_folder
from trainers.core.embeddings import (
    MAX_VECTORS,
    TrainableRows,
    add_placeholder_tokens,
    init_vector,
    table_digest,
    validate_placeholder_token,
    vector_tokens,
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
from trainers.core.progress import ProgressCallback, ProgressReporter, TqdmProgress
from trainers.core.runtime import enable_gradient_checkpointing, make_accelerator
from trainers.core.templates import CONTEXT_TEMPLATES, caption_prompt, template_prompt, templates_for

__all__ = [
    "BASE_RECIPES",
    "TextualInversionConfig",
    "bundle_embedding_keys",
    "split_pivotal_adapter",
    "train_from_cli",
    "train_textual_inversion",
]

logger = logging.getLogger(__name__)

METHOD = "textual-inversion"
RUN_STATE_FILE = "run.json"


@dataclass(frozen=True)
class TextualInversionConfig:
    """Every option of a textual-inversion run; the defaults here are the only defaults.

    >>> TextualInversionConfig(placeholder_token="<my-toy>", init_word="toy").num_vectors
    1
    """

    placeholder_token: str
    """The new word, namespaced in angle brackets so two concepts never collide: ``<my-toy>``."""
    init_word: str
    """An ordinary word the embedding starts from (usually the class: ``toy``)."""
    num_vectors: int = 1
    """Vectors (prompt positions) the token uses; more raise fidelity and cost prompt length."""
    learnable_property: Literal["object", "style"] = "object"
    """Which prompt templates surround the token while training."""
    use_captions: bool = False
    """Use the images' ``.txt`` captions (placeholder put in place of the init word) instead of templates."""
    steps: int = 1000
    """Optimizer steps (diffusers' example: 3000 at 512 px; tiny needs far fewer)."""
    lr: float = 5e-4
    """Learning rate of the embedding (diffusers' default)."""
    scale_lr: bool = False
    """Multiply ``lr`` and ``lora_lr`` by batch size x gradient accumulation x processes (diffusers' option)."""
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    resolution: int | None = None
    """Training image side in pixels; None: the base model's native size (64 on tiny, 512 on SD1.5)."""
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    weight_decay: float = 0.0
    """AdamW weight decay of the embedding (0: decay would pull the vectors towards zero, away from real words)."""
    offset_noise: float = 0.0
    snr_gamma: float | None = None
    """min-SNR weighting gamma (5.0 is the usual value); None: plain MSE."""
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    """Save a resumable checkpoint every N steps (0: never)."""
    keep_checkpoints: int = 1
    core_weight: float = 0.0
    """Weight of the CoRe context regularisation (0: off)."""
    pivotal: bool = False
    """Pivotal tuning: train a U-Net LoRA together with the token and save one ``lora`` adapter with both."""
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_lr: float = 1e-4

    def validate(self) -> None:
        """Check ranges and the placeholder's form (whether the init word is a word is checked against the tokenizer
        when training starts)."""
        validate_placeholder_token(self.placeholder_token)
        if not self.init_word.strip():
            raise InvalidInputError("config key 'init_word' expects a word (e.g. 'toy'), got ''")
        if self.init_word.strip().lower() == self.placeholder_token:
            raise InvalidInputError(f"config key 'init_word' must differ from the placeholder, got {self.init_word!r}")
        expect_in_range(self, "num_vectors", 1, MAX_VECTORS)
        expect_positive(self, "steps", "lr", "batch_size", "gradient_accumulation_steps", "lora_rank", "lora_alpha")
        expect_positive(self, "lora_lr", "keep_checkpoints")
        expect_non_negative(self, "lr_warmup_steps", "weight_decay", "offset_noise", "checkpoint_every", "core_weight")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise InvalidInputError(
                f"config key 'resolution' expects a multiple of 8 of at least 8, got '{self.resolution}'"
            )
        if self.snr_gamma is not None:
            expect_positive(self, "snr_gamma")

    @property
    def tokens(self) -> list[str]:
        """The tokenizer tokens of the placeholder (``<my-toy>``, ``<my-toy>_1``, ...)."""
        return vector_tokens(self.placeholder_token, self.num_vectors)


# Options that may change when a run is resumed; any other difference would make the checkpoint meaningless.
_RESUMABLE_CHANGES = frozenset({"steps", "checkpoint_every", "keep_checkpoints"})


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


BASE_RECIPES: dict[str, dict[str, Any]] = {"tiny": {"num_vectors": 4, "lr": 5e-3, "steps": 300}}
"""Measured defaults per base model, under the TOML file, the UI's values and ``--set`` (`load_config`'s
``recipe``). The field defaults are the diffusers example's SD1.x recipe. On the embedded `tiny` (one CPU thread,
``python bench/eval_textual_inversion.py --concept C --core-weight 0`` with ``--variants 1 --steps 1000 --lr 5e-4``,
then ``--variants 4 --steps 300 --lr 5e-3``), one vector at lr 5e-4 in 1000 steps learned robot-toy not at all
(similarity 0.409, base model 0.420; 117 s) and hex-emblem to 0.551 (base 0.428; 112 s); four vectors at lr 5e-3 in
300 steps reached 0.620 and 0.531 in a third to a half of the time (34 s and 51 s)."""


def train_textual_inversion(
    config: TextualInversionConfig,
    images_dir: str | Path,
    base: Any,
    *,
    name: str,
    library: AdapterLibrary,
    run_dir: str | Path,
    progress: Sequence[ProgressCallback] | ProgressCallback | None = None,
    resume: bool = False,
) -> AdapterInfo:
    """Train a placeholder token on the images in ``images_dir`` and add the adapter to ``library`` as ``name``.

    ``base`` is a base-model spec (``"tiny"``, a folder, a file) or a loaded `studio.base_models.BaseModel`; a loaded
    one is changed (tokens added to its tokenizers), so pass one that is not in use elsewhere. Checkpoints go to
    ``run_dir``; with ``resume`` the newest complete one is continued. Nothing is written to the library unless the
    whole run succeeded. Returns the new adapter's library entry.
    """
    config.validate()
    # 1. Fail early on a name the library would refuse at the end.
    name = sanitize_name(name)
    if library.exists(name):
        raise AlreadyExistsError(f"an adapter named '{name}' already exists; choose another --name or remove it first")
    run_dir = Path(run_dir)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        raise NotFoundError(f"no complete checkpoint to resume in {run_dir}")

    # 2. Base model and device. The fingerprint hashes the weights: take it before rows are added to the tables.
    base_model = _load_base(base)
    pipe, family = base_model.pipeline, base_model.family
    fingerprint = base_model.fingerprint
    accelerator = make_accelerator(config.mixed_precision, config.gradient_accumulation_steps, seed=config.seed)
    device = accelerator.device
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.mixed_precision]

    # 3. The images, fitted to the base model's native size (center crop: one bucket, so every batch stacks).
    resolution = config.resolution or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    dataset = ImageFolderDataset(images_dir, resolution=resolution, bucket_step=8, buckets=False)

    # 4. The placeholder's rows in every text encoder, started from the init word; everything else frozen.
    encoders = family.text_encoders(pipe)
    for module in (pipe.unet, pipe.vae, *encoders):
        module.requires_grad_(False)
        module.eval()
    rows = _add_placeholder(pipe, family, config)
    # From here on the pipeline holds hooks (and the training LoRA): they come out however the run ends.
    with contextlib.ExitStack() as cleanup:
        for row in rows:
            cleanup.callback(row.remove)
        digests = [table_digest(encoder, below=row.first_id) for encoder, row in zip(encoders, rows, strict=True)]
        for frozen in (pipe.vae, pipe.unet):
            # Cast only under mixed precision: a no-op float32 cast makes diffusers warn about float32-only modules.
            frozen.to(device) if weight_dtype == torch.float32 else frozen.to(device, dtype=weight_dtype)
        for encoder, row in zip(encoders, rows, strict=True):
            encoder.to(device)
            row.to(device)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(pipe.unet)
        lora_params = _add_pivotal_lora(pipe, family, config) if config.pivotal else []
        if config.pivotal:
            cleanup.callback(eject_lora, pipe.unet)

        # 5. Latents once (the VAE is frozen and the images fixed); the VAE leaves the device afterwards.
        pixels = [dataset.pixels_uint8(i) for i in range(len(dataset))]
        latents = torch.stack(cache_latents(pipe.vae, pixels, cache=TensorCache(), model_key=fingerprint))
        pipe.vae.to("cpu")
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

        # 6. Optimizer over the new rows (and the LoRA when pivotal); diffusers' scale_lr rule.
        scale = 1
        if config.scale_lr:
            scale = config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes
        groups: list[dict[str, Any]] = [{"params": [row.weight for row in rows], "lr": config.lr * scale}]
        if lora_params:
            groups.append({"params": lora_params, "lr": config.lora_lr * scale})
        optimizer = make_optimizer(groups, config.optimizer, lr=config.lr * scale, weight_decay=config.weight_decay)
        lr_scheduler = make_lr_scheduler(
            optimizer, config.lr_scheduler, warmup_steps=config.lr_warmup_steps, total_steps=config.steps
        )
        optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)

        # 7. Resume: trained tensors, optimizer and schedule. Data order, prompts and noise are functions of
        #    (seed, step), so a resumed run continues exactly as the interrupted one would have.
        start_step = 0
        if checkpoint is not None:
            start_step = _restore(checkpoint, config, family, pipe, rows, optimizer, lr_scheduler)
            logger.info("resuming %s from step %d", run_dir, start_step)
        _write_run_state(run_dir, config, images_dir, base_model, name)

        encode = _prompt_encoder(pipe, device, resolution, weight_dtype)
        templates = templates_for(config.learnable_property)
        expanded = " ".join(config.tokens)
        trainable = [row.weight for row in rows] + lora_params
        reporter = ProgressReporter(config.steps, _callbacks(progress), start_step=start_step)

        # 8. The loop: one optimizer step per `step`, over gradient_accumulation_steps batches.
        for step in range(start_step + 1, config.steps + 1):
            for micro in range(config.gradient_accumulation_steps):
                draw = (step - 1) * config.gradient_accumulation_steps + micro
                rng = random.Random(f"{config.seed}:{draw}")
                generator = torch.Generator().manual_seed(config.seed * 1_000_003 + draw)
                indices = _batch_indices(len(dataset), config.batch_size, config.seed, draw)

                # 8a. Prompts around the placeholder: templates, or the images' captions with the placeholder put in.
                prompts = [
                    caption_prompt(dataset.captions[i], expanded, config.init_word)
                    if config.use_captions and dataset.captions[i]
                    else template_prompt(templates, expanded, rng)
                    for i in indices
                ]

                with accelerator.accumulate(*rows), accelerator.autocast():
                    # 8b. The denoising loss; only the placeholder rows (and the LoRA) receive gradients.
                    clean = latents[indices].to(device, weight_dtype)
                    noise = sample_noise(clean, generator, config.offset_noise)
                    timesteps = sample_timesteps(noise_scheduler, len(indices), generator, device=device)
                    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
                    pred = pipe.unet(noisy, timesteps, **encode(prompts)).sample
                    target = training_target(noise_scheduler, clean, noise, timesteps)
                    weights = None
                    if config.snr_gamma:
                        weights = min_snr_weights(noise_scheduler, timesteps, config.snr_gamma)
                    loss = diffusion_loss(pred, target, weights=weights)

                    # 8c. CoRe: in new contexts the words after the placeholder keep the meaning they have after the
                    #     init word, so the token composes with prompts instead of swallowing them.
                    if config.core_weight > 0:
                        contexts = [rng.choice(CONTEXT_TEMPLATES) for _ in indices]
                        tokenizer = family.tokenizers(pipe)[0]
                        loss = loss + config.core_weight * _core_loss(encode, tokenizer, contexts, config)

                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(trainable, 1.0)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

            reporter.step(step, loss=float(loss.detach()), lr=float(lr_scheduler.get_last_lr()[0]))
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                _save(run_dir, step, config, family, pipe, rows, optimizer, lr_scheduler)
        reporter.close()

        # 9. Every other row of every table is bit-identical: the table was never trained; this checks it.
        for encoder, row, digest in zip(encoders, rows, digests, strict=True):
            if table_digest(encoder, below=row.first_id) != digest:
                raise RuntimeError("the token-embedding table changed outside the placeholder rows during training")

        # 10. The adapter (read before the training LoRA leaves the U-Net), written to the library in one atomic step.
        adapter = _build_adapter(config, family, base_model, fingerprint, rows, pipe, resolution, name, len(dataset))
    return library.add(adapter, name)


def _load_base(base: Any) -> Any:
    from studio.base_models import BaseModel, load_base_model

    if isinstance(base, BaseModel):
        return base
    return load_base_model(str(base))


def _add_placeholder(pipe: Any, family: ModelFamily, config: TextualInversionConfig) -> list[TrainableRows]:
    """Add the placeholder's tokens to every tokenizer / text encoder pair; one `TrainableRows` per encoder."""
    rows = []
    seen: dict[int, list[int]] = {}
    for tokenizer, encoder in zip(family.tokenizers(pipe), family.text_encoders(pipe), strict=True):
        start = init_vector(tokenizer, encoder, config.init_word)
        if id(tokenizer) in seen:  # one tokenizer object shared by both encoders: its tokens exist already
            ids = seen[id(tokenizer)]
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        else:
            ids = add_placeholder_tokens(tokenizer, encoder, config.tokens, start)
            seen[id(tokenizer)] = ids
        rows.append(TrainableRows(encoder, ids, start.expand(len(ids), -1)))
    return rows


def _batch_indices(count: int, batch_size: int, seed: int, draw: int) -> list[int]:
    """Images of draw ``draw``: consecutive slices of per-epoch shuffles, so every image is seen equally often."""
    out = []
    for position in range(draw * batch_size, (draw + 1) * batch_size):
        epoch, offset = divmod(position, count)
        order = list(range(count))
        random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
        out.append(order[offset])
    return out


def _prompt_encoder(
    pipe: Any, device: torch.device, resolution: int, dtype: torch.dtype
) -> Callable[[list[str]], dict[str, Any]]:
    """``prompts -> unet keyword arguments`` (with gradients), the way the U-Net is fed at inference."""

    def encode(prompts: list[str]) -> dict[str, Any]:
        text = encode_prompts(pipe, prompts, device)
        return unet_inputs(pipe.unet, text, height=resolution, width=resolution, dtype=dtype)

    return encode


def _core_loss(
    encode: Callable[[list[str]], dict[str, Any]],
    tokenizer: Any,
    contexts: list[str],
    config: TextualInversionConfig,
) -> torch.Tensor:
    """1 - cosine similarity between the text encoders' outputs for the words after the placeholder and the same
    words after the init word, in new-context prompts ("a {} on the beach").

    Positions before the concept are equal in both prompts anyway (CLIP's attention is causal), so only the shared
    suffix (the words after the concept, through the end token) is compared; the init-word prompt is the fixed
    target. The outputs compared are what the U-Net reads (both encoders' on SDXL).
    """
    expanded = " ".join(config.tokens)
    with_token = [context.format(expanded) for context in contexts]
    with_word = [context.format(config.init_word) for context in contexts]
    hidden = encode(with_token)["encoder_hidden_states"]
    with torch.no_grad():
        target = encode(with_word)["encoder_hidden_states"]
    limit = hidden.shape[1]
    losses = []
    for row, (a, b) in enumerate(zip(with_token, with_word, strict=True)):
        ids_a, ids_b = tokenizer(a).input_ids, tokenizer(b).input_ids
        if max(len(ids_a), len(ids_b)) > limit:
            continue  # truncated: the suffixes no longer line up (never the case for the short context prompts)
        shared = _shared_suffix(ids_a, ids_b)
        cos = F.cosine_similarity(
            hidden[row, len(ids_a) - shared : len(ids_a)].float(),
            target[row, len(ids_b) - shared : len(ids_b)].float(),
            dim=-1,
        )
        losses.append(1.0 - cos.mean())
    if not losses:
        return hidden.sum() * 0.0
    return torch.stack(losses).mean()


def _shared_suffix(ids_a: list[int], ids_b: list[int]) -> int:
    """How many tokens two prompts share at their end (the words after the concept and the end token)."""
    count = 0
    while count < min(len(ids_a), len(ids_b)) - 1 and ids_a[-1 - count] == ids_b[-1 - count]:
        count += 1
    return count


def _add_pivotal_lora(pipe: Any, family: ModelFamily, config: TextualInversionConfig) -> list[torch.nn.Parameter]:
    """Pivotal tuning: a U-Net LoRA (kept in float32, the master weights) trained together with the token."""
    inject_lora(
        pipe.unet, rank=config.lora_rank, alpha=config.lora_alpha, targets=family.unet_lora_targets, seed=config.seed
    )
    params = lora_parameters(pipe.unet)
    for param in params:
        param.data = param.data.float()
    return params


def _save(
    run_dir: Path,
    step: int,
    config: TextualInversionConfig,
    family: ModelFamily,
    pipe: Any,
    rows: list[TrainableRows],
    optimizer: Any,
    lr_scheduler: Any,
) -> None:
    weights = {f"rows.{i}": row.weight for i, row in enumerate(rows)}
    if config.pivotal:
        weights.update(kohya_state_dict(family, pipe.unet))
    state = {
        "weights": weights,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "config": config_to_dict(config),
    }
    save_checkpoint(run_dir, step, state, keep=config.keep_checkpoints)


def _restore(
    checkpoint: Path,
    config: TextualInversionConfig,
    family: ModelFamily,
    pipe: Any,
    rows: list[TrainableRows],
    optimizer: Any,
    lr_scheduler: Any,
) -> int:
    state = load_checkpoint(checkpoint)
    saved = dict(state.get("config", {}))
    current = config_to_dict(config)
    changed = sorted(key for key in current if key not in _RESUMABLE_CHANGES and saved.get(key) != current[key])
    if changed:
        raise InvalidInputError(
            f"resuming {checkpoint.parent} expects the run's own config, but {', '.join(changed)} differ "
            f"(only {', '.join(sorted(_RESUMABLE_CHANGES))} may change)"
        )
    step = int(state["step"])
    if step >= config.steps:
        raise InvalidInputError(
            f"the run in {checkpoint.parent} is at step {step}; resuming expects more steps, got steps={config.steps}"
        )
    weights = state["weights"]
    with torch.no_grad():
        for i, row in enumerate(rows):
            row.weight.copy_(weights[f"rows.{i}"])
    if config.pivotal:
        load_kohya_state_dict(family, {k: v for k, v in weights.items() if not k.startswith("rows.")}, pipe.unet)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    return step


def _build_adapter(
    config: TextualInversionConfig,
    family: ModelFamily,
    base_model: Any,
    fingerprint: str,
    rows: list[TrainableRows],
    pipe: Any,
    resolution: int,
    name: str,
    image_count: int,
) -> AdapterFile:
    """``textual_inversion``: the vectors under the family's embedding keys. Pivotal: a ``lora`` adapter with the
    kohya LoRA and the vectors under kohya's bundled-embedding keys."""
    vectors = [row.weight.detach().to("cpu", torch.float32).clone() for row in rows]
    settings = {**config_to_dict(config), "method": METHOD, "image_count": image_count}
    metadata = AdapterMetadata(
        kind="lora" if config.pivotal else "textual_inversion",
        family=family.name,
        base_model=base_model.name,
        base_fingerprint=fingerprint,
        placeholder_tokens=[config.placeholder_token],
        config=settings,
        name=name,
    )
    if not config.pivotal:
        return AdapterFile(dict(zip(family.embedding_keys, vectors, strict=True)), metadata)
    tensors = kohya_state_dict(family, pipe.unet)
    tensors.update(zip(bundle_embedding_keys(family, config.placeholder_token), vectors, strict=True))
    metadata.extra = kohya_lora_header(
        family,
        name=name,
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        base_model=base_model.name,
        trigger_words=[config.placeholder_token],
        resolution=resolution,
        created=metadata.created,
        training={"ss_learning_rate": config.lora_lr, "ss_max_train_steps": config.steps},
    )
    return AdapterFile(tensors, metadata)


def _write_run_state(run_dir: Path, config: TextualInversionConfig, images_dir: Any, base: Any, name: str) -> None:
    """What ``--resume RUN`` needs to continue without the original command line."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "method": METHOD,
        "name": name,
        "images": str(Path(images_dir).resolve()),
        "base": str(base.source) if getattr(base, "source", None) else base.name,
        "config": config_to_dict(config),
    }
    (run_dir / RUN_STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))


def _callbacks(progress: Sequence[ProgressCallback] | ProgressCallback | None) -> list[ProgressCallback]:
    if progress is None:
        return []
    if callable(progress):
        return [progress]
    return list(progress)


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def train_from_cli(args: argparse.Namespace, home: StudioHome) -> int:
    """``studio train textual-inversion --images DIR --token "<my-toy>" --init-word toy [--num-vectors N]
    [--config f.toml] [--set k=v] [--resume RUN]``: train and add the adapter to the home's library."""
    home.ensure()
    library = AdapterLibrary(home)
    values: dict[str, Any] = {}
    if args.resume:
        run_dir = Path(args.resume).expanduser()
        if not run_dir.is_dir():
            run_dir = home.runs / str(args.resume)
        state_file = run_dir / RUN_STATE_FILE
        if not state_file.is_file():
            raise NotFoundError(f"expected a textual-inversion run folder with {RUN_STATE_FILE}, found {args.resume}")
        state = json.loads(state_file.read_text())
        if state.get("method") != METHOD:
            raise InvalidInputError(f"run {run_dir} is a {state.get('method')!r} run, not {METHOD!r}")
        values.update(state["config"])
        images, base, name = state["images"], state["base"], state["name"]
    else:
        images, base, name = args.images, args.base, args.name
        if not images:
            raise InvalidInputError("expected --images DIR (a folder of training images), found none")
        run_dir = home.runs / f"{METHOD}-{sanitize_name(name)}"
        if latest_checkpoint(run_dir) is not None:
            raise AlreadyExistsError(
                f"run folder {run_dir} holds an interrupted run; continue it with --resume {run_dir} or remove it"
            )
    for option, key in (("token", "placeholder_token"), ("init_word", "init_word"), ("num_vectors", "num_vectors")):
        if getattr(args, option, None) is not None:
            values[key] = getattr(args, option)
    if "placeholder_token" not in values or "init_word" not in values:
        raise InvalidInputError('expected --token "<my-toy>" and --init-word WORD for textual inversion')
    config = load_config(
        TextualInversionConfig,
        recipe=recipe_for(BASE_RECIPES, base),
        toml_path=args.config,
        values=values,
        overrides=args.set or [],
    )
    expect_image_folder(images)  # before the base model loads
    info = train_textual_inversion(
        config,
        images,
        base,
        name=name,
        library=library,
        run_dir=run_dir,
        progress=TqdmProgress(description=name),
        resume=bool(args.resume),
    )
    print(f"added {info.kind} adapter '{info.name}' ({info.size_bytes} bytes); use it as {config.placeholder_token}")
    return 0
