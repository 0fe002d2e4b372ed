"""Preference training: learn a user's taste from their A/B picks with the Diffusion-DPO loss.

Modes (``PreferenceConfig.mode``):

- ``user``: one user's pairs (4 to a few hundred) train that user's embedding, a few tokens of the U-Net's
  cross-attention width that every cross-attention layer reads through a decoupled key/value branch
  (`pipelines.kinds.preference`). Only the tokens train (optionally also the branch projections).
- ``population`` (PPD): pairs of many users train the shared branch projections and an encoder that maps a set of a
  user's pairs (image features of the preferred and the other image, from a pluggable `ImageFeatures`) to that
  user's tokens. A new user then needs no training: `embed_user` (``mode = "embed"`` on the CLI) turns 4 of their
  pairs into a ``user`` adapter. With ``population_encoder = "attributes"`` the population is each training user's
  Bradley-Terry utilities over candidate attributes, and a new user's picks weigh them by Bayes' rule.
- ``branch``: the decoupled projections, trained once per base model by distillation (`train_attribute_branch`) so
  that an attribute's tokens ("red", "black background") act on the image as its words in the prompt would. Copies of
  the text projections (the default) spread a phrase over the whole picture; user adapters that start from
  attributes (``init_attributes`` with ``init_reader``, the attributes read in the pair images) should use one.

The loss (Wallace et al., Diffusion-DPO): for each pair, one timestep and one noise shared by the two images; the
reference is the same U-Net with the branch off, so the user embedding learns only what moves the model away from
the base towards the preferred images. Implicit accuracy (share of pairs whose DPO margin is positive) is logged.

>>> from studio.base_models import load_base_model  # doctest: +SKIP
>>> pairs = load_pairs("picks.jsonl", user="alice")  # doctest: +SKIP
>>> adapter = train_user_preference(PreferenceConfig(steps=200), pairs, load_base_model("tiny"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from diffusers import DDPMScheduler
from PIL import Image
from torch import nn

from pipelines.kinds.conditioning import ConditioningSeam, install_conditioning
from pipelines.kinds.preference import (
    DEFAULT_ATTRIBUTE_SCALE,
    ENCODER_PREFIX,
    KIND,
    LAYER_PREFIX,
    TOKENS_KEY,
    PreferenceBranches,
    UserTokensState,
    attribute_nouns,
    attribute_slot,
    attribute_token_mask,
    branch_attention,
)
from studio.adapter_files import AdapterFile, AdapterMetadata
from studio.errors import InvalidInputError, NotAvailableError
from studio.preferences import PreferencePair
from trainers.core.caching import encode_latents
from trainers.core.config import config_to_dict, expect_in_range, expect_non_negative, expect_positive
from trainers.core.noise import sample_noise, sample_timesteps, training_target
from trainers.core.progress import ProgressEvent, ProgressReporter

logger = logging.getLogger(__name__)

Mode = Literal["user", "population", "embed", "branch"]


@dataclass(frozen=True)
class PreferenceConfig:
    """Every option of preference training, with its one default."""

    mode: Mode = "user"
    tokens: int = 4
    """User tokens (each of the U-Net's cross-attention width)."""
    beta: float = 5000.0
    """DPO's KL weight. Large because per-pair errors differ by little (PPD and Diffusion-DPO use 5000 on SD)."""
    steps: int | None = None
    """Training steps. Unset: 0 in user mode with an ``init_from`` start (the start alone, no DPO: what
    `bench/eval_preference.py` measured best; DPO from the start lowered dev users' win rates), else
    ``DEFAULT_STEPS``."""
    batch_size: int = 8
    """Pairs per step (population mode: pairs per user per step)."""
    lr: float = 3e-2
    """Learning rate of the user tokens (user mode) or of the encoder (population mode)."""
    projection_lr: float = 1e-4
    train_projections: bool = False
    """User mode: also train the branch projections (population mode always trains them)."""
    init_attributes: tuple[str, ...] = ()
    """User mode: candidate visual attributes (``red``, ``black background``, ``large``, ...). When given, the user
    tokens start from the text encoding of the candidates that best explain the user's picks (lowest DPO loss on
    their pairs with the branch reading those tokens: the diffusion model as a zero-shot classifier of the taste),
    not from zero; DPO then refines them. Zero tokens start the branch as the base model, and DPO moves them only a
    little (its KL weight keeps the model near the base), so most held-out images come out alike for the user."""
    token_norm: float = 0.0
    """User mode: 0 trains the tokens freely (from zero unless ``init_attributes`` start them). Above 0 each token
    row is a trained direction times ``token_norm`` times the median row norm of the pairs' text states, so the
    branch speaks as loudly as a prompt word from the first step and DPO can only turn it, not mute it (free tokens
    from zero end far smaller than text states, and the images barely move). Off by default: with the attribute
    start it changed colour or background in most held-out comparisons but won only 0.521 (-11.5 compliance points,
    `bench/eval_preference.py`); from a random direction 0.531 on dev users 100-103."""
    init_reader: str = ""
    """User mode, with ``init_attributes``: how the start is chosen. ``""`` scores candidates with the diffusion
    model itself (DPO implicit accuracy, `choose_attributes`); ``judge`` reads the candidates in the pair images with
    an attribute reader (`AttributeReader`; the shapes world's judge) and fits a Bradley-Terry model of the picks over
    them (`reader_start`): per slot (colour, background, size...) the best-liked attribute joins if it beats the
    slot's average by ``init_margin``. With an attribute ``branch`` and a population prior (``init_from=tiny``
    sets all of it, and is the default on `tiny`), the start alone (``steps=0``) won 0.755 [0.741, 0.768] against
    the base over 80 simulated users never used in development, with +12.2 compliance points (16 picks each,
    `bench/eval_preference.py`; the zero start with DPO, ``init_from=none``: 0.542)."""
    init_l2: float = 3.0
    """With ``init_reader``: the ridge weight of the Bradley-Terry fit (16 picks name about as many attributes)."""
    init_from: str = "auto"
    """User mode: start from an ``attributes`` population model, in one key: a file, or ``tiny`` for the one
    shipped with the embedded base model (`SHIPPED_STARTS`). Its candidates, attribute reader, branch and prior
    become ``init_attributes``, ``init_reader``, ``branch`` and ``init_prior``. ``auto``: the start shipped for the
    base model being trained on, if the studio ships one and none of those four keys is set (`resolve_start`);
    ``none``: no start (zero tokens, DPO)."""
    init_prior: str = ""
    """With ``init_reader``: an ``attributes`` population model file (``population_encoder = "attributes"``). Its
    users' utilities give the per-user fit a Gaussian prior (`UtilityPrior`: their mean and covariance) in place of
    the ridge, so that attributes people like together (the warm colours, the textured backgrounds) are read
    together from few picks. Its candidates must be ``init_attributes``."""
    population_l2: float = 0.1
    """Population mode, ``attributes`` encoder: the ridge weight of each training user's fit. Lighter than
    ``init_l2``: the population is a prior over many users, not one user's answer. On `tiny` 0.1 over 400 users with
    about 196 picks each beat 0.3 in both modes (``bench/eval_preference.py``)."""
    init_margin: float = 0.05
    """With ``init_reader``: how far (in Bradley-Terry utility) an attribute must beat its slot's average to join."""
    branch: str = ""
    """User mode: an attribute-branch file (`train_attribute_branch`): the decoupled projections start from it, so
    the user's attribute tokens act as the attributes' words in the prompt would. The adapter carries them."""
    branch_lr: float = 2e-3
    """Branch mode: learning rate of the projections (``steps`` and ``batch_size`` as in the other modes)."""
    branch_attention: Literal["separate", "joint"] = "separate"
    """Branch mode: ``separate`` attends over the attribute tokens alone (IP-Adapter's decoupled attention); ``joint``
    spans the prompt's keys too, with zero values there (`ExtraTokens.joint`), so an attribute can act on some
    positions only. Recorded in the file; users trained on a branch, and populations built on one, inherit it.
    Measured on `tiny` (800 steps, 1500 lessons each): held-out distillation error 0.00027 joint against 0.00060
    separate; purple tokens drew a purple object in 0.69 of colour-open images against 0.33. But the shipped start
    rebuilt on it (same population utilities) won no more: dev users 100-107 0.797 against 0.794, held-out users
    7301-7308 0.740 against 0.734, users 8501-8508 0.703 against 0.708 (compliance +9.9, +11.2, +15.4 points
    against +12.8, +12.8, +12.0). So the shipped branch stays ``separate``: the wins are limited by what 16 picks
    tell and by ties where the base already draws what a user likes, more than by how an attribute is drawn."""
    guided_attributes: tuple[str, ...] = ()
    """User mode with ``init_reader``, and ``attributes`` populations: scales of taste the tokens do not draw,
    each as ``word/opposite`` (``large/small``). The picks are read on each pole as well (`read_guided`), and the
    word of the pole they favour goes into the user adapter as a prompt word (``prompt_words``): generation
    writes it into the prompt where the prompt leaves its slot open ("a large red circle";
    `pipelines.kinds.preference.insert_words`). Unset: the start's or population's (header `GUIDED_KEY`; `tiny`'s
    guides size, which its branch's tokens cannot draw: they shrink the object whatever the attribute). Session 16
    applied the pole as a ViPer term at 0.85 instead (16 picks: 0.765 against 0.747 without; 4 picks: no gain); the
    prompt word is the stronger instrument, as `bench/eval_preference.py` records."""
    guided_scale: float | None = None
    """0 leaves the guided attributes out; any other value writes them in (a prompt word has no scale of its own).
    Unset: the start's, else on."""
    init_top: int = 2
    """At most this many attributes are chosen (greedily; one joins only if it lowers the loss further)."""
    init_draws: int = 4
    """(timestep, noise) draws per pair when scoring a candidate; every candidate sees the same draws."""
    empty_prompt_prob: float = 0.0
    """Share of pairs trained with the empty prompt (the taste then holds without the prompt, too)."""
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 25
    # population mode
    users_per_step: int = 8
    context_pairs: int = 4
    """Pairs the encoder reads per user (what a new user must give)."""
    hidden: int = 256
    population_encoder: Literal["network", "attributes"] = "network"
    """``network``: PPD's learned encoder and projections, trained with DPO. ``attributes``: each training user's
    Bradley-Terry utilities over ``init_attributes`` (read by ``init_reader``) form the population; a new user's
    picks weigh the population users by how well each explains them (Bayes' rule), and the expected utilities choose
    the new user's attribute tokens, read through the ``branch`` projections (`embed_user`)."""
    image_encoder: str = "judge"
    """``judge`` (the shapes world's judge CNN) or the folder of a local CLIP vision model."""
    # embed mode
    population_model: str = ""
    """Library name of a population model (``mode = "embed"``), or ``tiny`` for the one shipped with the embedded
    base model when the library holds no adapter of that name (`population_model`)."""

    def validate(self) -> None:
        """Ranges of the options."""
        expect_positive(self, "tokens", "beta", "batch_size", "lr", "users_per_step", "context_pairs")
        # No DPO loop runs for a user's start alone or for an attributes population: there steps may be 0.
        # (User mode's ``init_from=auto`` with no shipped start is caught when it resolves: `resolve_start`.)
        start_only = self.mode == "user" and (self.init_attributes or self.init_from not in ("", "none"))
        if not (start_only or (self.mode == "population" and self.population_encoder == "attributes")):
            expect_positive(self, "steps")
        expect_non_negative(self, "steps")
        expect_positive(self, "hidden", "log_every", "max_grad_norm", "init_top", "init_draws", "branch_lr")
        expect_non_negative(self, "projection_lr", "token_norm", "init_l2", "init_margin", "population_l2")
        if self.guided_scale is not None:
            expect_non_negative(self, "guided_scale")
        guided_poles(self.guided_attributes)
        if self.mode == "population" and self.population_encoder == "attributes":
            missing = [key for key in ("init_attributes", "init_reader", "branch") if not getattr(self, key)]
            if missing:
                raise InvalidInputError(
                    f"population_encoder 'attributes' expects config keys {', '.join(missing)} to be set, got none"
                )
        if self.init_prior and not self.init_reader:
            raise InvalidInputError(
                f"config key 'init_prior' expects 'init_reader' to be set, got none (init_prior={self.init_prior!r})"
            )
        if self.init_reader and not self.init_attributes:
            raise InvalidInputError(
                f"config key 'init_reader' expects candidate attributes in 'init_attributes', got none "
                f"(init_reader={self.init_reader!r})"
            )
        expect_in_range(self, "empty_prompt_prob", 0.0, 1.0)
        if self.mode == "embed" and not self.population_model:
            raise InvalidInputError("config key 'population_model' expects a library name in mode 'embed', got ''")


# -- the loss -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DpoResult:
    """The DPO loss of a batch of pairs, its implicit accuracy, and the per-pair margins (``inside``)."""

    loss: torch.Tensor
    accuracy: float
    inside: torch.Tensor


def diffusion_dpo_loss(
    model_preferred: torch.Tensor,
    model_other: torch.Tensor,
    ref_preferred: torch.Tensor,
    ref_other: torch.Tensor,
    target_preferred: torch.Tensor,
    target_other: torch.Tensor,
    beta: float,
) -> DpoResult:
    """Diffusion-DPO: ``-logsigmoid(-beta/2 * ((err_w - err_l) - (ref_err_w - ref_err_l)))``, averaged over pairs.

    ``err`` is the mean squared error over channels and pixels of each image's prediction; the reference errors
    carry no gradient.

    >>> zero, one = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    >>> round(float(diffusion_dpo_loss(zero, one, one, one, zero, zero, beta=1.0).loss), 4)
    0.4741
    """

    def err(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))

    model_diff = err(model_preferred, target_preferred) - err(model_other, target_other)
    with torch.no_grad():
        ref_diff = err(ref_preferred, target_preferred) - err(ref_other, target_other)
    inside = -0.5 * beta * (model_diff - ref_diff)
    loss = -F.logsigmoid(inside).mean()
    return DpoResult(loss=loss, accuracy=float((inside > 0).float().mean()), inside=inside.detach())


# -- image features for the population encoder --------------------------------------------------------------------


class ImageFeatures(Protocol):
    """What the population encoder reads images through. ``name`` is recorded in the model file."""

    name: str
    dim: int

    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[len(images), dim]`` float32 features on the CPU."""
        ...


def _shipped_judge() -> Any:
    """The shapes world's judge from its shipped weights (`studio.world.judge.Judge`)."""
    from studio.world.judge import JUDGE_PATH, Judge

    if not JUDGE_PATH.is_file():
        raise NotAvailableError(
            f"the judge weights are missing ({JUDGE_PATH}); train them with `python -m studio.world.judge`"
        )
    return Judge.load()


class JudgeFeatures:
    """The shapes-world judge's CNN trunk (256 features): what the tiny world's users' tastes are visible in."""

    name = "judge"
    dim = 256

    def __init__(self, net: nn.Module | None = None) -> None:
        self.net = (net if net is not None else _shipped_judge().net).eval()

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Trunk features of each image (64x64, as the judge reads)."""
        from studio.world.judge import to_tensor

        net = self.net
        out = [net.trunk(net.pool(net.features(to_tensor(images[i : i + 128])))) for i in range(0, len(images), 128)]
        return torch.cat(out).float()


class ClipVisionFeatures:
    """A CLIP vision model from a local folder (``CLIPVisionModelWithProjection`` + its image processor)."""

    def __init__(self, path: str | Path | None) -> None:
        if not path:
            raise NotAvailableError(
                "population preference on real models needs a local CLIP vision model folder "
                "(--set image_encoder=PATH); none was given"
            )
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise NotAvailableError(f"expected a CLIP vision model folder with config.json at {folder}, found none")
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True).eval()
        self.processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        self.name = f"clip:{folder.resolve()}"
        self.dim = int(self.model.config.projection_dim)

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """CLIP image embeddings of each image."""
        inputs = self.processor(images=list(images), return_tensors="pt")
        return self.model(pixel_values=inputs["pixel_values"]).image_embeds.float()


def image_features_from_spec(spec: str) -> ImageFeatures:
    """``judge`` -> `JudgeFeatures`; ``clip:PATH`` or ``PATH`` -> `ClipVisionFeatures`."""
    if spec == "judge":
        return JudgeFeatures()
    return ClipVisionFeatures(spec.removeprefix("clip:"))


class AttributeReader(Protocol):
    """What reads visual attributes in images, for the reader start of user mode. ``name`` is recorded in the file."""

    name: str

    def presence(self, images: Sequence[Image.Image], attributes: Sequence[str]) -> torch.Tensor:
        """``[len(images), len(attributes)]`` in [0, 1]: how much each image shows each attribute."""
        ...


class JudgeAttributes:
    """The shapes world's judge as an attribute reader: object colours ("red"), backgrounds ("black background",
    "striped background"), "large" and "small" (from the covered area). It cannot see other attributes: they read 0."""

    name = "judge"

    def __init__(self, judge: Any | None = None) -> None:
        self.judge = judge if judge is not None else _shipped_judge()

    @torch.no_grad()
    def presence(self, images: Sequence[Image.Image], attributes: Sequence[str]) -> torch.Tensor:
        """One judge read per image; each attribute is then a lookup in the reading (`reading_presence`)."""
        readings = self.judge.read(list(images))
        return (
            torch.stack([reading_presence(r, attributes) for r in readings])
            if readings
            else torch.zeros(0, len(attributes))
        )


def reading_presence(reading: Any, attributes: Sequence[str]) -> torch.Tensor:
    """``[len(attributes)]``: how much one judge reading (`studio.world.judge.Reading`) shows each attribute: object
    colours ("red"), backgrounds ("black background", "striped background"), "large" and "small" (from the covered
    area); 0 for any other attribute."""
    from studio.world.scene import SIZES, background_phrase

    size = min(1.0, reading.coverage / (3.0 * SIZES["large"] ** 2))  # the covered share of one large object
    out = torch.zeros(len(attributes))
    for j, attribute in enumerate(a.strip().lower() for a in attributes):
        words = attribute.split()
        if len(words) == 2 and words[1] == "background":
            out[j] = float(background_phrase(reading.background) == words[0])
        elif attribute == "large":
            out[j] = size
        elif attribute == "small":
            out[j] = 1.0 - size
        else:
            out[j] = float(reading.colour == attribute)
    return out


def attribute_reader_from_spec(spec: str) -> AttributeReader:
    """``judge`` -> `JudgeAttributes`; no other reader yet."""
    if spec == "judge":
        return JudgeAttributes()
    raise NotAvailableError(f"attribute reader {spec!r} is not available yet; expected 'judge'")


class UserEncoder(nn.Module):
    """PPD's user encoder: a set of pairs -> user tokens, ``mean(MLP(f(preferred) - f(other)))`` then a linear map.

    The last layer starts at zero, so a fresh encoder gives zero tokens and the model starts as the base model.
    """

    def __init__(self, feature_dim: int, hidden: int, tokens: int, width: int) -> None:
        super().__init__()
        self.tokens, self.width = tokens, width
        self.pair = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.out = nn.Linear(hidden, tokens * width)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, preferred: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``[users, pairs, dim]`` features of each side -> ``[users, tokens, width]``."""
        pooled = self.pair(preferred - other).mean(dim=1)
        return self.out(pooled).view(-1, self.tokens, self.width)


# -- data ---------------------------------------------------------------------------------------------------------


@dataclass
class PairTensors:
    """The pairs as the U-Net trains on them: latents of both images and prompt states, on the CPU."""

    preferred: torch.Tensor
    other: torch.Tensor
    prompt_embeds: torch.Tensor
    empty_embeds: torch.Tensor
    users: list[str] = field(default_factory=list)


def _to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    # Centre-crop to a square, then resize to the model's side: preference data comes in any aspect ratio.
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.convert("RGB").crop((left, top, left + side, top + side))
    array = np.asarray(square.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1)


@torch.no_grad()
def _image_latents(pipeline: Any, images: Sequence[Image.Image], size: int, device: torch.device) -> torch.Tensor:
    """``[len(images), ...]`` VAE latents (float32, on the CPU), 32 images per VAE call."""
    chunks = []
    for start in range(0, len(images), 32):
        pixels = torch.stack([_to_pixels(image, size) for image in images[start : start + 32]]).to(device)
        chunks.append(encode_latents(pipeline.vae, pixels).float().cpu())
    return torch.cat(chunks)


@torch.no_grad()
def _prompt_states(pipeline: Any, prompts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Text states of each distinct prompt (float32, on the CPU), 64 prompts per text-encoder call."""
    distinct = list(dict.fromkeys(prompts))
    states: dict[str, torch.Tensor] = {}
    for start in range(0, len(distinct), 64):
        chunk = distinct[start : start + 64]
        encoded = pipeline.encode_prompt(
            prompt=chunk, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )[0]
        states.update(zip(chunk, encoded.float().cpu(), strict=True))
    return states


@torch.no_grad()
def encode_pairs(pipeline: Any, pairs: Sequence[PreferencePair], size: int, device: torch.device) -> PairTensors:
    """VAE latents of every image (each distinct image object once) and text states of every distinct prompt."""
    images = {id(image): image for pair in pairs for image in (pair.preferred, pair.other)}
    latents = dict(zip(images, _image_latents(pipeline, list(images.values()), size, device), strict=True))
    states = _prompt_states(pipeline, [pair.prompt for pair in pairs], device)
    empty = pipeline.encode_prompt(prompt="", device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return PairTensors(
        preferred=torch.stack([latents[id(p.preferred)] for p in pairs]),
        other=torch.stack([latents[id(p.other)] for p in pairs]),
        prompt_embeds=torch.stack([states[p.prompt] for p in pairs]),
        empty_embeds=empty[0].float().cpu()[0],
        users=[p.user_id for p in pairs],
    )


# -- one DPO step -------------------------------------------------------------------------------------------------


@dataclass
class _Model:
    """The frozen base U-Net with the seam, the noise schedule and the (possibly trainable) branches."""

    unet: Any
    seam: ConditioningSeam
    scheduler: Any
    branches: PreferenceBranches
    device: torch.device
    dtype: torch.dtype


def _prepare_model(base: Any, device: torch.device) -> _Model:
    pipeline = base.pipeline.to(device)
    unet = pipeline.unet
    if getattr(unet.config, "addition_embed_type", None) is not None:
        raise NotAvailableError(
            f"preference training on {base.family.label} (U-Nets with added text/time conditioning) is not "
            "available yet"
        )
    for module in (unet, pipeline.vae, *base.family.text_encoders(pipeline)):
        module.requires_grad_(False)
    layer_names = base.family.cross_attention_layers(unet)
    seam = install_conditioning(unet, layer_names)
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    branches = PreferenceBranches.from_unet(unet, layer_names)
    return _Model(unet, seam, scheduler, branches, device, unet.dtype)


def _dpo_step(
    model: _Model,
    data: PairTensors,
    rows: Sequence[int],
    tokens: torch.Tensor,
    cfg: PreferenceConfig,
    generator: torch.Generator,
    groups: int = 1,
    windows: Sequence[tuple[float, float]] = (),
) -> DpoResult:
    """DPO loss of pairs ``rows`` with ``tokens`` (``[len(rows), n, width]``, one user per row, in ``groups``
    attribute groups attended each on its own and acting in their timestep ``windows``, as at generation)."""
    device, dtype = model.device, model.dtype
    index = torch.tensor(list(rows))
    preferred = data.preferred[index].to(device, dtype)
    other = data.other[index].to(device, dtype)
    embeds = data.prompt_embeds[index].clone()
    if cfg.empty_prompt_prob:
        drop = torch.rand(len(rows), generator=generator) < cfg.empty_prompt_prob
        embeds[drop] = data.empty_embeds
    embeds = embeds.to(device, dtype)
    count = len(rows)
    # 1. One timestep and one noise per pair, shared by its two images.
    noise = sample_noise(preferred, generator)
    timesteps = sample_timesteps(model.scheduler, count, generator, device=device)
    noisy = torch.cat([model.scheduler.add_noise(x, noise, timesteps) for x in (preferred, other)])
    targets = [training_target(model.scheduler, x, noise, timesteps) for x in (preferred, other)]
    both_t, both_embeds = torch.cat([timesteps, timesteps]), torch.cat([embeds, embeds])
    # 2. The reference: the same U-Net with the branch off (no conditioning state active).
    with torch.no_grad():
        ref = model.unet(noisy, both_t, encoder_hidden_states=both_embeds).sample
    # 3. The model: the branch on, reading each row's user tokens.
    train_timesteps = int(model.scheduler.config.num_train_timesteps)
    state = UserTokensState(
        torch.cat([tokens, tokens]).to(dtype),
        model.branches,
        1.0,
        groups=groups,
        windows=windows,
        train_timesteps=train_timesteps,
    )
    with model.seam.context.activate([("preference", state)]):
        pred = model.unet(noisy, both_t, encoder_hidden_states=both_embeds).sample
    return diffusion_dpo_loss(
        pred[:count], pred[count:], ref[:count], ref[count:], targets[0], targets[1], beta=cfg.beta
    )


def _optimise(
    result: Any,
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    max_grad_norm: float,
    losses: list[float],
    accuracies: list[float],
) -> None:
    """One optimiser step on a DPO result, recording its loss and implicit accuracy."""
    optimizer.zero_grad(set_to_none=True)
    result.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    losses.append(float(result.loss.detach()))
    accuracies.append(result.accuracy)


def _log_and_report(
    reporter: ProgressReporter, step: int, cfg: PreferenceConfig, losses: list[float], accuracies: list[float]
) -> None:
    recent = slice(-cfg.log_every, None)
    loss, accuracy = float(np.mean(losses[recent])), float(np.mean(accuracies[recent]))
    reporter.step(step, loss=loss, message=f"implicit accuracy {accuracy:.2f}")
    if step % cfg.log_every == 0 or step == cfg.steps:
        logger.info("preference step %d/%d: loss %.4f, implicit accuracy %.2f", step, cfg.steps, loss, accuracy)


def _text_row_norm(data: PairTensors) -> float:
    """The median norm of the pairs' text-state rows (the text encoder's final layer norm puts them all near one
    value; about 10.6 on tiny): how loud one prompt word is to cross-attention."""
    return float(data.prompt_embeds.float().norm(dim=-1).median())


def _metadata(base: Any, config: dict[str, Any]) -> AdapterMetadata:
    return AdapterMetadata(
        kind=KIND, family=base.family.name, base_model=base.name, base_fingerprint=base.fingerprint, config=config
    )


def _device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    from trainers.core.runtime import has_accelerator_device

    return torch.device("cuda" if has_accelerator_device() and torch.cuda.is_available() else "cpu")


# -- initialising from attributes ---------------------------------------------------------------------------------


@torch.no_grad()
def phrase_tokens(pipeline: Any, phrase: str, count: int, device: torch.device) -> torch.Tensor:
    """``[count, width]`` user tokens from a phrase: its text states after the start token (which every phrase
    shares), so the branch attends to the phrase as the prompt's own cross-attention would. Short phrases fill the
    rest with their end and padding states, which summarise the phrase (its words alone moved images far less)."""
    states = pipeline.encode_prompt(
        prompt=phrase, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )[0][0]
    return states[1 : 1 + count].float()


@dataclass
class AttributeStart:
    """Where the user tokens start: one group of ``tokens_per_attribute`` rows per chosen attribute (its phrase's
    text states), and per pair the mask that zeroes the groups its prompt's own words decide."""

    attributes: list[str]
    tokens: torch.Tensor
    masks: torch.Tensor
    nouns: list[str]
    share: float


@torch.no_grad()
def choose_attributes(
    model: _Model, pipeline: Any, data: PairTensors, prompts: Sequence[str], cfg: PreferenceConfig
) -> AttributeStart | None:
    """Greedily the candidates of ``cfg.init_attributes`` whose tokens, read by the branch, move the most pairs' DPO
    margin the user's way; ``None`` when no candidate does on more than half of them.

    Each chosen attribute is a group of tokens, zeroed for a pair whose prompt decides what it is about (as at
    generation), so an attribute acts only where it may. The score is the implicit accuracy (share of pairs x draws
    with a positive margin; a zero margin, where every group is masked, counts half), not the loss: a phrase changes
    the predictions by far more than DPO's KL weight expects, so its loss is the size of its few wrong margins,
    while the share says how consistently it points the user's way.
    """
    rows = list(range(len(data.preferred)))
    candidates = _candidates(cfg)
    nouns = attribute_nouns(candidates)
    phrases = {c: phrase_tokens(pipeline, c, cfg.tokens, model.device) for c in candidates}

    def start_of(attributes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return _tokens_and_masks(phrases, attributes, prompts, nouns, cfg.tokens, model.device)

    def share_of(tokens: torch.Tensor, masks: torch.Tensor) -> float:
        # The same draws for every candidate: the comparison between candidates is paired, so less noisy.
        generator = torch.Generator("cpu").manual_seed(cfg.seed + 1)
        batch = tokens.unsqueeze(0) * masks[:, :, None]
        # A pair whose prompt masks every group sees the base model (margin exactly 0): half, as a tie.
        groups = tokens.shape[0] // cfg.tokens
        margins = torch.cat(
            [_dpo_step(model, data, rows, batch, cfg, generator, groups).inside for _ in range(cfg.init_draws)]
        )
        return float(((margins > 0).float() + 0.5 * (margins == 0).float()).mean())

    best: AttributeStart | None = None
    for _ in range(cfg.init_top):
        chosen = best.attributes if best else []
        scored = []
        for candidate in (c for c in candidates if c not in chosen):
            tokens, masks = start_of([*chosen, candidate])
            scored.append((share_of(tokens, masks), candidate, tokens, masks))
        if not scored:
            break
        share, candidate, tokens, masks = max(scored, key=lambda item: item[0])
        if share <= (best.share if best else 0.5):
            break
        best = AttributeStart([*chosen, candidate], tokens, masks, nouns, share)
        logger.info("preference start: %s (implicit accuracy %.3f)", ", ".join(best.attributes), share)
    return best


def _candidates(cfg: PreferenceConfig) -> list[str]:
    return list(dict.fromkeys(a.strip() for a in cfg.init_attributes if a.strip()))


def _tokens_and_masks(
    phrases: dict[str, torch.Tensor],
    attributes: Sequence[str],
    prompts: Sequence[str],
    nouns: Sequence[str],
    tokens_per_attribute: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The start's tokens (one group per attribute) and, per pair, the mask of the groups its prompt leaves open."""
    tokens = torch.cat([phrases[a] for a in attributes])
    masks = torch.stack([attribute_token_mask(attributes, p, tokens_per_attribute, nouns) for p in prompts])
    return tokens, masks.to(device)


@dataclass(frozen=True)
class UtilityPrior:
    """A Gaussian prior over attribute utilities, learned from a population: ``mean`` ``[C]`` and ``precision``
    ``[C, C]``. Its covariance says which attributes people like together, so a pick that shows one of them moves
    the others too."""

    mean: torch.Tensor
    precision: torch.Tensor

    @classmethod
    def from_population(cls, utilities: torch.Tensor, shrink: float = 0.1) -> UtilityPrior:
        """From ``[users, C]`` utilities: their mean, and their covariance plus ``shrink`` times its average
        variance on the diagonal (so that it inverts when users are few or attributes never vary).

        >>> prior = UtilityPrior.from_population(torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.5, 0.4]]))
        >>> bool(prior.precision[0, 1] < 0)  # the two attributes go together: knowing one tells the other
        True
        """
        if utilities.dim() != 2 or utilities.shape[0] < 2:
            raise InvalidInputError(
                f"expected the utilities of at least 2 population users, found shape {list(utilities.shape)}"
            )
        u = utilities.double()
        covariance = torch.cov(u.T).reshape(u.shape[1], u.shape[1])
        scale = float(covariance.diagonal().mean()) or 1.0
        covariance = covariance + shrink * scale * torch.eye(u.shape[1], dtype=torch.float64)
        return cls(u.mean(0).float(), torch.linalg.inv(covariance).float())


def fit_attribute_utilities(differences: torch.Tensor, l2: float, prior: UtilityPrior | None = None) -> torch.Tensor:
    """Bradley-Terry utilities of attributes from picks: ``u`` maximising ``sum(log sigmoid(differences @ u)) -
    l2 / 2 * |u|^2``, where each row of ``differences`` is the preferred image's attribute presence minus the
    other's. Newton's method on this concave objective; ``l2`` > 0 keeps it unique when attributes outnumber picks.
    With a ``prior``, its Gaussian term ``1/2 (u - mean)' precision (u - mean)`` replaces the ridge.

    >>> u = fit_attribute_utilities(torch.tensor([[1.0, 0.0], [1.0, -1.0], [0.0, -1.0]]), l2=1.0)
    >>> bool(u[0] > 0 > u[1])
    True
    """
    x = differences.double()
    count = x.shape[1]
    eye = torch.eye(count, dtype=torch.float64)
    mean = prior.mean.double() if prior else torch.zeros(count, dtype=torch.float64)
    precision = prior.precision.double() if prior else max(l2, 1e-6) * eye
    if mean.shape != (count,) or precision.shape != (count, count):
        raise InvalidInputError(f"expected a utility prior over {count} attributes, found one over {len(mean)}")
    u = mean.clone()
    for _ in range(50):
        p = torch.sigmoid(x @ u)
        gradient = x.T @ (1.0 - p) - precision @ (u - mean)
        hessian = (x.T * (p * (1.0 - p))) @ x + precision
        step = torch.linalg.solve(hessian, gradient)
        u = u + step
        if float(step.abs().max()) < 1e-9:
            break
    return u.float()


def liked_attributes(candidates: Sequence[str], utilities: torch.Tensor, margin: float, top: int) -> list[str]:
    """Per slot (`attribute_slot`) the best-liked candidate, if it beats the slot's average utility by ``margin``
    (a one-candidate slot: 0), the clearest slot first, at most ``top``. A candidate that shares its word with one
    already chosen ("gray" and "gray background") gives way to its slot's next best: a gray object on a gray
    background is no object at all.

    >>> liked_attributes(["red", "blue", "large"], torch.tensor([0.5, -0.5, 0.01]), margin=0.05, top=3)
    ['red']
    >>> u = torch.tensor([0.9, -0.1, 0.4, 0.3, -0.7])
    >>> liked_attributes(["gray", "blue", "gray background", "black background", "white background"], u, 0.05, 3)
    ['gray', 'black background']
    """
    slots: dict[str, list[int]] = {}
    for index, candidate in enumerate(candidates):
        slots.setdefault(attribute_slot(candidate), []).append(index)
    ranked: list[tuple[float, list[tuple[float, str]]]] = []
    for members in slots.values():
        reference = float(utilities[members].mean()) if len(members) > 1 else 0.0
        leads = sorted(((float(utilities[i]) - reference, candidates[i]) for i in members), reverse=True)
        ranked.append((leads[0][0], [(lead, c) for lead, c in leads if lead > margin]))
    chosen: list[str] = []
    taken: set[str] = set()
    for _, options in sorted(ranked, key=lambda item: -item[0]):
        for _, candidate in options:
            words = set(candidate.lower().split()) - {attribute_slot(candidate)}
            if not words & taken:
                chosen.append(candidate)
                taken |= words
                break
    return chosen[:top]


GUIDED_KEY = "guided_attributes"
"""A start's or population's header key: ``{"attributes": ["large/small", ...], "attribute_scale": s}``, the
scales of taste its users are guided on rather than drawn with tokens (`PreferenceConfig.guided_attributes`)."""

GUIDED_PRIOR_VARIANCE = 1.0
"""Prior variance of each guided pole's utility in the picks' fit (the population prior, built without them, says
nothing about them). On `bench/proxy_preference.py`'s readings (dev users 200-499, 16 picks) the size pole read this
way had its sign right for 91% of the users whose taste weighs size."""


def guided_poles(attributes: Sequence[str]) -> list[tuple[str, str]]:
    """``word/opposite`` entries as ``(word, opposite)`` pairs; anything else is a one-line error.

    >>> guided_poles(["large/small"])
    [('large', 'small')]
    """
    poles = []
    for entry in attributes:
        word, slash, opposite = str(entry).partition("/")
        if not slash or not word.strip() or not opposite.strip() or word.strip() == opposite.strip():
            raise InvalidInputError(
                f"config key 'guided_attributes' expects entries like 'large/small' (a word and its opposite), "
                f"got {entry!r}"
            )
        poles.append((word.strip(), opposite.strip()))
    return poles


def read_guided(
    pairs: Sequence[PreferencePair],
    reader: AttributeReader,
    candidates: Sequence[str],
    prior: UtilityPrior | None,
    l2: float,
    poles: Sequence[tuple[str, str]],
    margin: float,
) -> list[str]:
    """Which pole of each guided scale the picks favour: its word, one per scale the picks decide.

    The picks are fitted over the candidates and both poles of every scale (`fit_attribute_utilities`): the
    candidates under ``prior`` (or the ridge ``l2``), the poles under an independent `GUIDED_PRIOR_VARIANCE`. A
    scale's lead is half its word's utility minus its opposite's; beyond ``margin`` the favoured pole's word is
    returned, else the scale stays out. Fitting the poles with the candidates keeps a pick that a colour
    explains from being read as a size."""
    if not poles:
        return []
    words = [word for pole in poles for word in pole]
    differences = _presence_differences(pairs, reader, [*candidates, *words])
    count = len(candidates)
    mean = torch.zeros(count + len(words))
    precision = torch.eye(count + len(words)) / GUIDED_PRIOR_VARIANCE
    if prior is not None:
        mean[:count] = prior.mean
        precision[:count, :count] = prior.precision
    else:
        precision[:count, :count] = torch.eye(count) * max(l2, 1e-6)
    utilities = fit_attribute_utilities(differences, l2, UtilityPrior(mean, precision))
    favoured: list[str] = []
    for index, (word, opposite) in enumerate(poles):
        lead = float(utilities[count + 2 * index] - utilities[count + 2 * index + 1]) / 2
        if abs(lead) > margin:
            favoured.append(word if lead > 0 else opposite)
    return favoured


def guided_config(liked: Sequence[str], scale: float) -> dict[str, Any]:
    """A user adapter's config keys for its guided attributes: the favoured poles as ``prompt_words`` (none when
    nothing is guided or ``scale`` is 0)."""
    if not liked or scale == 0.0:
        return {}
    return {"prompt_words": list(liked)}


def _per_image(
    pairs: Sequence[PreferencePair], read: Callable[[list[Image.Image]], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``read``'s rows for each pair's preferred and other image; each distinct image object is read once."""
    images = {id(image): image for pair in pairs for image in (pair.preferred, pair.other)}
    table = dict(zip(images, read(list(images.values())), strict=True))
    return torch.stack([table[id(p.preferred)] for p in pairs]), torch.stack([table[id(p.other)] for p in pairs])


def _presence_differences(
    pairs: Sequence[PreferencePair], reader: AttributeReader, candidates: Sequence[str]
) -> torch.Tensor:
    """``[len(pairs), len(candidates)]``: the preferred image's presence minus the other's (each image read once)."""
    preferred, other = _per_image(pairs, lambda images: reader.presence(images, candidates).float())
    return preferred - other


DEFAULT_STEPS = 300
"""Training steps when ``steps`` is unset and no start makes it 0."""

SHIPPED_STARTS: dict[str, Path] = {
    "tiny": Path(__file__).resolve().parent.parent / "studio/assets/tiny_preference.safetensors"
}
"""``init_from`` names of the population models shipped with the studio's embedded base models."""


def _preference_file(path: str | Path, source: str, expected: str, accepts: Callable[[Any, Any], bool]) -> AdapterFile:
    """The preference file that ``source`` (``config key 'branch'``, a command-line flag) names, if
    ``accepts(mode, encoder)`` of its header; else a one-line error naming ``source``, ``expected`` and what was
    found."""
    from studio.adapter_files import load_adapter

    file = Path(path).expanduser()
    if not file.is_file():
        raise InvalidInputError(f"{source} expects {expected} .safetensors file, found no file {file}")
    adapter = load_adapter(file)
    mode, encoder = adapter.metadata.config.get("mode"), adapter.metadata.config.get("encoder")
    if adapter.metadata.kind != KIND or not accepts(mode, encoder):
        what = f"{mode}, encoder {encoder}" if encoder else mode
        raise InvalidInputError(f"{source} expects {expected}, found {adapter.metadata.kind} ({what}) in {file}")
    return adapter


def attribute_population_file(path: str | Path, source: str) -> AdapterFile:
    """An ``attributes`` population model file, checked; ``source`` names where the path came from in the one-line
    error (``config key 'init_from'``, ``--population``)."""
    return _preference_file(
        path,
        source,
        "an 'attributes' population model",
        lambda mode, encoder: mode == "population" and encoder == "attributes",
    )


def shipped_start(base: Any) -> str:
    """The ``init_from`` name of the start shipped for ``base`` (`SHIPPED_STARTS`), or ``""``: only for the very
    weights it was built on (its header's fingerprint), since a start reads through a branch trained on them."""
    from studio.adapter_files import read_header

    path = SHIPPED_STARTS.get(getattr(base, "name", ""))
    if path is None or not path.is_file():
        return ""
    if AdapterMetadata.from_header(read_header(path), str(path)).base_fingerprint != base.fingerprint:
        return ""
    return str(base.name)


def resolve_start(cfg: PreferenceConfig, base: Any) -> PreferenceConfig:
    """User mode's ``cfg`` for ``base`` with ``init_from`` spelled out (``auto`` becomes `shipped_start` unless a
    start is configured key by key; ``none`` becomes no start) and ``steps`` set (unset: 0 with an ``init_from``
    start, else ``DEFAULT_STEPS``)."""
    init_from = cfg.init_from
    if init_from == "auto":
        by_key = cfg.init_attributes or cfg.init_reader or cfg.branch or cfg.init_prior
        init_from = "" if by_key else shipped_start(base)
    cfg = replace(cfg, init_from="" if init_from == "none" else init_from)
    if cfg.init_from:
        cfg = start_from(cfg)
    steps = cfg.steps if cfg.steps is not None else (0 if cfg.init_from else DEFAULT_STEPS)
    if steps == 0 and not cfg.init_attributes:
        raise InvalidInputError(
            "steps=0 keeps the start alone, but no start is configured (init_from or init_attributes); "
            "found init_from='none' or a base model with no shipped start"
        )
    return replace(cfg, steps=steps)


def _with_steps(cfg: PreferenceConfig) -> PreferenceConfig:
    """``cfg`` with ``steps`` set (`DEFAULT_STEPS` when unset), for the modes that have no start."""
    return cfg if cfg.steps is not None else replace(cfg, steps=DEFAULT_STEPS)


def start_from(cfg: PreferenceConfig) -> PreferenceConfig:
    """``cfg`` with ``init_from`` spelled out: the population model's candidates, reader, branch and prior."""
    path = SHIPPED_STARTS.get(cfg.init_from, Path(cfg.init_from))
    config = attribute_population_file(path, "config key 'init_from'").metadata.config
    guided = config.get(GUIDED_KEY) or {}
    return replace(
        cfg,
        init_attributes=tuple(str(c) for c in config["candidates"]),
        init_reader=str(config["attribute_reader"]),
        branch=str(path),
        init_prior=str(path),
        guided_attributes=cfg.guided_attributes or tuple(str(a) for a in guided.get("attributes", ())),
        guided_scale=cfg.guided_scale if cfg.guided_scale is not None else guided.get("attribute_scale"),
    )


def population_prior(path: str | Path, candidates: Sequence[str], reader: AttributeReader) -> UtilityPrior:
    """The `UtilityPrior` of an ``attributes`` population model file, checked against the start's candidates and
    reader."""
    population = attribute_population_file(path, "config key 'init_prior'")
    config = population.metadata.config
    if [str(c) for c in config["candidates"]] != list(candidates):
        raise InvalidInputError(
            f"init_prior expects a population over the same candidates as init_attributes ({len(candidates)}), "
            f"found {len(config['candidates'])} different ones in {path}"
        )
    if config.get("attribute_reader") != reader.name:
        raise InvalidInputError(
            f"init_prior's population read attributes through {config.get('attribute_reader')!r}, found {reader.name!r}"
        )
    return UtilityPrior.from_population(population.tensors[UTILITIES_KEY].float())


WINDOWS_KEY = "attribute_windows"
"""A branch's (or an ``attributes`` population's) header key: ``{attribute: [low, high]}``, the share of the noise
schedule in which each attribute's tokens act (`pipelines.kinds.preference.UserTokensState`), measured for the
branch by `bench/calibrate_preference.py`. Attributes it does not name act at every step."""


def group_windows(config: dict[str, Any], attributes: Sequence[str]) -> dict[str, Any]:
    """A user adapter's ``attribute_timesteps`` (one window per attribute group) from a branch header's
    `WINDOWS_KEY` table; ``{}`` when the branch has none (every group then acts at every step).

    >>> group_windows({"attribute_windows": {"red": [0.0, 0.6]}}, ["red", "black background"])
    {'attribute_timesteps': [[0.0, 0.6], [0.0, 1.0]]}
    """
    table = config.get(WINDOWS_KEY) or {}
    if not table:
        return {}
    return {"attribute_timesteps": [[float(v) for v in table.get(a, [0.0, 1.0])] for a in attributes]}


@torch.no_grad()
def reader_start(
    pipeline: Any,
    pairs: Sequence[PreferencePair],
    cfg: PreferenceConfig,
    reader: AttributeReader,
    device: torch.device,
) -> AttributeStart | None:
    """The user tokens' start read from the pair images: which of ``cfg.init_attributes`` the user likes.

    The reader says how much each image shows each candidate; a Bradley-Terry model with a ridge prior
    (`fit_attribute_utilities`) explains the picks by the presence differences. Candidates are grouped into slots
    (`attribute_slot`: a subject has one colour, an image one background), and per slot the best-liked candidate
    joins if it beats the slot's average by ``cfg.init_margin`` (a one-candidate slot: if it beats 0 by that), the
    clearest first, at most ``cfg.init_top``. ``None`` when no candidate does. Cheap (one read per image, no U-Net),
    and, unlike scoring candidates through the diffusion model, it sees what is in the images the user compared.
    """
    candidates = _candidates(cfg)
    differences = _presence_differences(pairs, reader, candidates)
    prior = population_prior(cfg.init_prior, candidates, reader) if cfg.init_prior else None
    utilities = fit_attribute_utilities(differences, cfg.init_l2, prior)
    chosen = liked_attributes(candidates, utilities, cfg.init_margin, cfg.init_top)
    logger.info(
        "preference start (%s reader%s): %s; utilities %s",
        reader.name,
        ", population prior" if prior else "",
        ", ".join(chosen) or "nothing",
        ", ".join(f"{c}={float(u):+.2f}" for c, u in zip(candidates, utilities, strict=True)),
    )
    if not chosen:
        return None
    # How many picks the chosen attributes alone explain (a tie counts half): the start's fit, logged and stored.
    margins = differences[:, [candidates.index(c) for c in chosen]] @ utilities[[candidates.index(c) for c in chosen]]
    share = float(((margins > 0).float() + 0.5 * (margins == 0).float()).mean())
    nouns = attribute_nouns(candidates)
    phrases = {c: phrase_tokens(pipeline, c, cfg.tokens, device) for c in chosen}
    tokens, masks = _tokens_and_masks(phrases, chosen, [pair.prompt for pair in pairs], nouns, cfg.tokens, device)
    return AttributeStart(chosen, tokens, masks, nouns, share)


def _user_guided(pairs: Sequence[PreferencePair], reader: AttributeReader, cfg: PreferenceConfig) -> dict[str, Any]:
    """The user adapter's guided attributes (`read_guided` under the start's prior), as config keys."""
    scale = DEFAULT_ATTRIBUTE_SCALE if cfg.guided_scale is None else cfg.guided_scale
    poles = guided_poles(cfg.guided_attributes)
    if not poles or scale == 0.0:
        return {}
    candidates = _candidates(cfg)
    prior = population_prior(cfg.init_prior, candidates, reader) if cfg.init_prior else None
    liked = read_guided(pairs, reader, candidates, prior, cfg.init_l2, poles, cfg.init_margin)
    logger.info("preference guided attributes: %s", ", ".join(liked) or "none")
    return guided_config(liked, scale)


# -- per-user mode ------------------------------------------------------------------------------------------------


def train_user_preference(
    cfg: PreferenceConfig,
    pairs: Sequence[PreferencePair],
    base: Any,
    *,
    user_id: str | None = None,
    device: str | torch.device | None = None,
    progress: Sequence[Callable[[ProgressEvent], None]] = (),
    attribute_reader: AttributeReader | None = None,
) -> AdapterFile:
    """Train one user's tokens (and, with ``train_projections``, the branch projections) on their pairs.

    ``attribute_reader`` reads the start's attributes when ``cfg.init_reader`` asks for one (default: that reader)."""
    # 1. Check the data.
    users = sorted({pair.user_id for pair in pairs})
    if len(users) != 1:
        raise InvalidInputError(
            f"expected the pairs of one user in per-user mode, found {len(users)} users ({', '.join(users[:5])}); "
            "pick one with --user, or train all with --set mode=population"
        )
    if len(pairs) < 2:
        raise InvalidInputError(f"expected at least 2 preference pairs, found {len(pairs)}")
    user_id = user_id or users[0]

    cfg = resolve_start(cfg, base)

    # 2. Model and data.
    torch.manual_seed(cfg.seed)
    model = _prepare_model(base, _device(device))
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    try:
        size = int(model.unet.config.sample_size) * int(base.pipeline.vae_scale_factor)
        data = encode_pairs(base.pipeline, pairs, size, model.device)

        # 3. What trains: the user tokens, starting at zero (the branch then adds exactly nothing: base model).
        width = model.branches.width
        prompts = [pair.prompt for pair in pairs]
        start = None
        guided: dict[str, Any] = {}
        if cfg.init_attributes and cfg.init_reader:
            reader = attribute_reader or attribute_reader_from_spec(cfg.init_reader)
            start = reader_start(base.pipeline, pairs, cfg, reader, model.device)
            guided = _user_guided(pairs, reader, cfg)
        elif cfg.init_attributes:
            start = choose_attributes(model, base.pipeline, data, prompts, cfg)
        masks = start.masks if start else torch.ones(len(pairs), cfg.tokens, device=model.device)
        attribute_groups = len(start.attributes) if start else 1
        # With token_norm the parameter is each row's direction (a random one unless the attributes start it).
        norm = cfg.token_norm * _text_row_norm(data) if cfg.token_norm > 0 else 0.0
        if start:
            initial = start.tokens.clone()
        elif norm:
            initial = torch.randn(cfg.tokens, width, generator=generator)
        else:
            initial = torch.zeros(cfg.tokens, width)
        weights = nn.Parameter(initial.to(model.device))

        def current() -> torch.Tensor:
            return norm * F.normalize(weights, dim=-1) if norm else weights

        windows: dict[str, Any] = {}
        if cfg.branch:
            branch = load_branch(cfg.branch)
            model.branches.load_layer_tensors(branch.tensors)
            model.branches.joint = branch_attention(branch.metadata.config) == "joint"
            if start:
                windows = group_windows(branch.metadata.config, start.attributes)
        group_timesteps = [tuple(w) for w in windows.get("attribute_timesteps", [])]
        groups: list[dict[str, Any]] = [{"params": [weights], "lr": cfg.lr}]
        model.branches.to(model.device).requires_grad_(cfg.train_projections)
        if cfg.train_projections:
            groups.append({"params": list(model.branches.parameters()), "lr": cfg.projection_lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        params = [p for group in groups for p in group["params"]]

        # 4. The loop.
        reporter = ProgressReporter(cfg.steps, progress)
        losses: list[float] = []
        accuracies: list[float] = []
        for step in range(1, cfg.steps + 1):
            rows = [rng.randrange(len(pairs)) for _ in range(cfg.batch_size)]
            # Each pair's mask zeroes the attribute groups its prompt decides, as generation will.
            row_tokens = current().unsqueeze(0) * masks[torch.tensor(rows)][:, :, None]
            result = _dpo_step(model, data, rows, row_tokens, cfg, generator, attribute_groups, group_timesteps)
            _optimise(result, optimizer, params, cfg.max_grad_norm, losses, accuracies)
            _log_and_report(reporter, step, cfg, losses, accuracies)
        reporter.close()
    finally:
        model.seam.remove()

    # 5. The adapter: tokens (and trained projections), with what made them.
    tokens = current().detach()
    tensors = {TOKENS_KEY: tokens.float().cpu()}
    groups: dict[str, Any] = {}
    if start:
        groups = {
            "attribute_groups": start.attributes,
            "attribute_nouns": start.nouns,
            "tokens_per_attribute": cfg.tokens,
            **windows,
        }
    if cfg.train_projections or cfg.branch:
        tensors.update({k: v.float().cpu() for k, v in model.branches.layer_tensors().items()})
    config = {
        "mode": "user",
        "user_id": user_id,
        "tokens": int(tokens.shape[0]),
        "branch_attention": "joint" if model.branches.joint else "separate",
        "beta": cfg.beta,
        "pairs": len(pairs),
        **groups,
        **guided,
        "initial_attributes": start.attributes if start else [],
        "initial_fit": round(start.share, 4) if start else None,
        "final_loss": round(float(np.mean(losses[-cfg.log_every :])), 5) if losses else None,
        "final_implicit_accuracy": round(float(np.mean(accuracies[-cfg.log_every :])), 4) if accuracies else None,
        "training": config_to_dict(cfg),
    }
    return AdapterFile(tensors, _metadata(base, config))


# -- the attribute branch -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttributeExample:
    """One lesson for the attribute branch: ``prompt`` leaves a slot open, ``attribute`` fills it (``red``, ``black
    background``), ``expanded`` is the prompt with the attribute in its words, and ``image`` shows ``expanded``.

    ``expanded`` None: the lesson's target is ``image`` itself (the noise added to it), not the base model's
    prediction on words. For attributes the base model does not draw when its prompt names them (`tiny` and object
    size), distilling from its words would teach the branch to draw them as weakly as the words do."""

    prompt: str
    attribute: str
    expanded: str | None
    image: Image.Image


def load_branch(path: str | Path) -> AdapterFile:
    """An attribute-branch file (``mode`` ``branch``, or an ``attributes`` population model, which carries the
    branch it was built on), checked."""
    return _preference_file(
        path,
        "config key 'branch'",
        "a preference attribute branch",
        lambda mode, encoder: mode == "branch" or (mode == "population" and encoder == "attributes"),
    )


def train_attribute_branch(
    cfg: PreferenceConfig,
    examples: Sequence[AttributeExample],
    base: Any,
    *,
    device: str | torch.device | None = None,
    progress: Sequence[Callable[[ProgressEvent], None]] = (),
) -> AdapterFile:
    """The decoupled projections, trained once per base model, that make an attribute's tokens (`phrase_tokens`)
    act as its words in the prompt would: the U-Net on ``prompt`` with the branch reading ``attribute``'s tokens
    learns to predict what it predicts on ``expanded`` (distillation, on ``image`` noised at a random timestep).

    The projections start as copies of each layer's own ``to_k``/``to_v``. Those read a phrase's tokens with no
    place to put the rest of the picture's attention, so the copy recolours everything; trained, the branch learns
    where an attribute belongs. Per-user adapters then start from it (``PreferenceConfig.branch``). Logged: the
    held-out distillation error with the branch against the plain prompt's (the gap the branch closes).
    """
    cfg = _with_steps(cfg)
    if len(examples) < 2 * cfg.batch_size:
        raise InvalidInputError(f"expected at least {2 * cfg.batch_size} attribute examples, found {len(examples)}")
    torch.manual_seed(cfg.seed)
    model = _prepare_model(base, _device(device))
    pipeline = base.pipeline
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    try:
        # 1. Data: latents of the images, text states of both prompts, tokens of each attribute (all encoded once).
        size = int(model.unet.config.sample_size) * int(pipeline.vae_scale_factor)
        latents = _image_latents(pipeline, [e.image for e in examples], size, model.device).to(model.device)
        texts = [text for e in examples for text in (e.prompt, e.expanded) if text is not None]
        states = {text: state.to(model.device) for text, state in _prompt_states(pipeline, texts, model.device).items()}
        tokens = {a: phrase_tokens(pipeline, a, cfg.tokens, model.device) for a in {e.attribute for e in examples}}
        held_out = list(range(len(examples) - max(1, len(examples) // 16), len(examples)))
        train_rows = list(range(held_out[0]))

        def errors(rows: Sequence[int], noise_generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            """Distillation error with the branch, and the plain prompt's error against the same teacher."""
            clean = latents[torch.tensor(list(rows))].to(model.dtype)
            noise = sample_noise(clean, noise_generator)
            timesteps = sample_timesteps(model.scheduler, len(rows), noise_generator, device=model.device)
            noisy = model.scheduler.add_noise(clean, noise, timesteps)
            plain_states = torch.stack([states[examples[i].prompt] for i in rows]).to(model.dtype)
            with torch.no_grad():
                # A lesson without words to distil from learns from its image: the target is the added noise.
                expanded = torch.stack([states[examples[i].expanded or examples[i].prompt] for i in rows])
                teacher = model.unet(noisy, timesteps, encoder_hidden_states=expanded.to(model.dtype)).sample
                from_image = torch.tensor([examples[i].expanded is None for i in rows], device=model.device)
                target = training_target(model.scheduler, clean, noise, timesteps).to(teacher.dtype)
                teacher = torch.where(from_image[:, None, None, None], target, teacher)
                plain = model.unet(noisy, timesteps, encoder_hidden_states=plain_states).sample
            state = UserTokensState(torch.stack([tokens[examples[i].attribute] for i in rows]), model.branches, 1.0)
            with model.seam.context.activate([("preference", state)]):
                student = model.unet(noisy, timesteps, encoder_hidden_states=plain_states).sample
            return F.mse_loss(student.float(), teacher.float()), F.mse_loss(plain.float(), teacher.float())

        def held_out_errors() -> tuple[float, float]:
            with torch.no_grad():
                fixed = torch.Generator("cpu").manual_seed(cfg.seed + 1)
                pairs = [
                    errors(held_out[i : i + cfg.batch_size], fixed) for i in range(0, len(held_out), cfg.batch_size)
                ]
            return float(np.mean([float(a) for a, _ in pairs])), float(np.mean([float(b) for _, b in pairs]))

        # 2. The loop: only the projections train.
        model.branches.joint = cfg.branch_attention == "joint"
        model.branches.to(model.device).requires_grad_(True)
        params = list(model.branches.parameters())
        optimizer = torch.optim.AdamW(params, lr=cfg.branch_lr, weight_decay=0.0)
        before = held_out_errors()
        reporter = ProgressReporter(cfg.steps, progress)
        losses: list[float] = []
        for step in range(1, cfg.steps + 1):
            loss, _ = errors([rng.choice(train_rows) for _ in range(cfg.batch_size)], generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
            reporter.step(step, loss=float(np.mean(losses[-cfg.log_every :])))
            if step % cfg.log_every == 0:
                logger.info(
                    "attribute branch step %d/%d: loss %.5f", step, cfg.steps, np.mean(losses[-cfg.log_every :])
                )
        reporter.close()
        after = held_out_errors()
    finally:
        model.seam.remove()
    logger.info(
        "attribute branch: held-out error %.5f -> %.5f (the plain prompt's: %.5f)", before[0], after[0], after[1]
    )
    tensors = {k: v.float().cpu() for k, v in model.branches.layer_tensors().items()}
    config = {
        "mode": "branch",
        "branch_attention": cfg.branch_attention,
        "examples": len(examples),
        "attributes": sorted(tokens),
        "tokens_per_attribute": cfg.tokens,
        "held_out_error": round(after[0], 6),
        "held_out_error_untrained": round(before[0], 6),
        "held_out_error_plain_prompt": round(after[1], 6),
        "training": config_to_dict(cfg),
    }
    return AdapterFile(tensors, _metadata(base, config))


# -- population mode ----------------------------------------------------------------------------------------------


def _features_by_image(pairs: Sequence[PreferencePair], encoder: ImageFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    return _per_image(pairs, encoder.features)


def train_population(
    cfg: PreferenceConfig,
    pairs: Sequence[PreferencePair],
    base: Any,
    *,
    image_features: ImageFeatures | None = None,
    device: str | torch.device | None = None,
    progress: Sequence[Callable[[ProgressEvent], None]] = (),
    attribute_reader: AttributeReader | None = None,
) -> AdapterFile:
    """PPD: train the shared branch projections and the user encoder over the pairs of many users at once (or, with
    ``population_encoder`` ``attributes``, fit the population's attribute utilities; see `_attribute_population`)."""
    cfg = _with_steps(cfg)
    # 1. Group the pairs by user; each user needs context pairs for the encoder and target pairs for the loss.
    by_user: dict[str, list[int]] = {}
    for index, pair in enumerate(pairs):
        by_user.setdefault(pair.user_id, []).append(index)
    minimum = cfg.context_pairs + 1
    usable = {user: rows for user, rows in by_user.items() if len(rows) >= minimum}
    if len(usable) < 2:
        raise InvalidInputError(
            f"expected at least 2 users with {minimum} or more pairs for population mode, found {len(usable)}"
        )
    if cfg.population_encoder == "attributes":
        reader = attribute_reader or attribute_reader_from_spec(cfg.init_reader)
        return _attribute_population(cfg, pairs, base, {user: usable[user] for user in sorted(usable)}, reader)
    features = image_features or image_features_from_spec(cfg.image_encoder)

    # 2. Model, data and features.
    torch.manual_seed(cfg.seed)
    model = _prepare_model(base, _device(device))
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    users = sorted(usable)
    try:
        size = int(model.unet.config.sample_size) * int(base.pipeline.vae_scale_factor)
        data = encode_pairs(base.pipeline, pairs, size, model.device)
        feat_preferred, feat_other = _features_by_image(pairs, features)
        encoder = UserEncoder(features.dim, cfg.hidden, cfg.tokens, model.branches.width).to(model.device)
        model.branches.to(model.device).requires_grad_(True)
        optimizer = torch.optim.AdamW(
            [
                {"params": list(encoder.parameters()), "lr": cfg.lr},
                {"params": list(model.branches.parameters()), "lr": cfg.projection_lr},
            ],
            weight_decay=0.0,
        )
        params = [*encoder.parameters(), *model.branches.parameters()]

        # 3. The loop: per step, some users; per user, context pairs -> tokens, then DPO on other pairs of theirs.
        reporter = ProgressReporter(cfg.steps, progress)
        losses: list[float] = []
        accuracies: list[float] = []
        for step in range(1, cfg.steps + 1):
            chosen = rng.sample(users, min(cfg.users_per_step, len(users)))
            contexts, rows, owners = [], [], []
            for slot, user in enumerate(chosen):
                shuffled = rng.sample(usable[user], len(usable[user]))
                contexts.append(shuffled[: cfg.context_pairs])
                targets = shuffled[cfg.context_pairs :]
                picked = [targets[rng.randrange(len(targets))] for _ in range(cfg.batch_size)]
                rows.extend(picked)
                owners.extend([slot] * len(picked))
            context = torch.tensor(contexts)
            user_tokens = encoder(feat_preferred[context].to(model.device), feat_other[context].to(model.device))
            result = _dpo_step(model, data, rows, user_tokens[torch.tensor(owners)], cfg, generator)
            _optimise(result, optimizer, params, cfg.max_grad_norm, losses, accuracies)
            _log_and_report(reporter, step, cfg, losses, accuracies)
        reporter.close()
    finally:
        model.seam.remove()

    tensors = {k: v.float().cpu() for k, v in model.branches.layer_tensors().items()}
    tensors.update({f"{ENCODER_PREFIX}{k}": v.detach().float().cpu() for k, v in encoder.state_dict().items()})
    config = {
        "mode": "population",
        "tokens": cfg.tokens,
        "beta": cfg.beta,
        "image_encoder": features.name,
        "feature_dim": features.dim,
        "hidden": cfg.hidden,
        "context_pairs": cfg.context_pairs,
        "users": len(users),
        "pairs": len(pairs),
        "final_loss": round(float(np.mean(losses[-cfg.log_every :])), 5),
        "final_implicit_accuracy": round(float(np.mean(accuracies[-cfg.log_every :])), 4),
        "training": config_to_dict(cfg),
    }
    return AdapterFile(tensors, _metadata(base, config))


UTILITIES_KEY = "preference.population.utilities"
PHRASES_KEY = "preference.population.phrases"


@torch.no_grad()
def _attribute_population(
    cfg: PreferenceConfig,
    pairs: Sequence[PreferencePair],
    base: Any,
    users: dict[str, list[int]],
    reader: AttributeReader,
) -> AdapterFile:
    """The population as data: each training user's Bradley-Terry utilities over the candidates (from all their
    pairs), the candidates' tokens, and the attribute branch's projections. No diffusion step: what the U-Net needs
    to draw an attribute is in the branch, and what a user likes is in the utilities."""
    candidates = _candidates(cfg)
    branch = load_branch(cfg.branch)
    differences = _presence_differences(pairs, reader, candidates)
    utilities = torch.stack([fit_attribute_utilities(differences[rows], cfg.population_l2) for rows in users.values()])
    device = _device(None)
    phrases = torch.stack([phrase_tokens(base.pipeline, c, cfg.tokens, device).cpu() for c in candidates])
    tensors = {k: v for k, v in branch.tensors.items() if k.startswith(LAYER_PREFIX)}
    tensors.update({UTILITIES_KEY: utilities, PHRASES_KEY: phrases})
    config = {
        "mode": "population",
        "encoder": "attributes",
        "branch_attention": branch_attention(branch.metadata.config),
        "attribute_reader": reader.name,
        "candidates": candidates,
        "tokens": cfg.tokens,
        "users": len(users),
        "pairs": len(pairs),
        "init_margin": cfg.init_margin,
        "init_top": cfg.init_top,
        **({WINDOWS_KEY: branch.metadata.config[WINDOWS_KEY]} if WINDOWS_KEY in branch.metadata.config else {}),
        **_guided_table(cfg, branch.metadata.config),
        "training": config_to_dict(cfg),
    }
    logger.info("attribute population: %d users over %d candidates", len(users), len(candidates))
    return AdapterFile(tensors, _metadata(base, config))


def _guided_table(cfg: PreferenceConfig, branch_config: dict[str, Any]) -> dict[str, Any]:
    """A population's `GUIDED_KEY` header: the run's guided attributes, else its branch's (a shipped start is both)."""
    inherited = branch_config.get(GUIDED_KEY) or {}
    attributes = list(cfg.guided_attributes) or [str(a) for a in inherited.get("attributes", [])]
    scale = cfg.guided_scale if cfg.guided_scale is not None else inherited.get("attribute_scale")
    if not attributes:
        return {}
    scale = DEFAULT_ATTRIBUTE_SCALE if scale is None else float(scale)
    return {GUIDED_KEY: {"attributes": attributes, "attribute_scale": scale}}


def _embed_by_attributes(
    population: AdapterFile, pairs: Sequence[PreferencePair], reader: AttributeReader | None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """A new user's tokens from an ``attributes`` population: the population users weighed by how well their
    utilities explain the new picks (Bradley-Terry likelihood, uniform prior), then `liked_attributes` of the
    expected utilities."""
    config = population.metadata.config
    reader = reader or attribute_reader_from_spec(str(config["attribute_reader"]))
    if reader.name != config["attribute_reader"]:
        raise InvalidInputError(
            f"the population model reads attributes through {config['attribute_reader']!r}, found {reader.name!r}"
        )
    candidates = [str(c) for c in config["candidates"]]
    utilities = population.tensors[UTILITIES_KEY].float()
    differences = _presence_differences(pairs, reader, candidates)
    log_likelihood = F.logsigmoid(differences @ utilities.T).sum(0)
    weights = torch.softmax(log_likelihood, dim=0)
    margin = float(config["init_margin"])
    chosen = liked_attributes(candidates, weights @ utilities, margin, int(config["init_top"]))
    phrases = population.tensors[PHRASES_KEY]
    tokens_per_attribute = int(config["tokens"])
    guided_table = config.get(GUIDED_KEY) or {}
    poles = guided_poles(guided_table.get("attributes", ()))
    liked = read_guided(pairs, reader, candidates, UtilityPrior.from_population(utilities), 0.0, poles, margin)
    scale = float(guided_table.get("attribute_scale", DEFAULT_ATTRIBUTE_SCALE))
    guided = guided_config(liked, scale)
    if not chosen:
        return torch.zeros(tokens_per_attribute, phrases.shape[-1]), {**guided, "initial_attributes": []}
    tokens = torch.cat([phrases[candidates.index(c)] for c in chosen])
    groups = {
        "attribute_groups": chosen,
        "attribute_nouns": attribute_nouns(candidates),
        "tokens_per_attribute": tokens_per_attribute,
        **group_windows(config, chosen),
        **guided,
        "initial_attributes": chosen,
        "population_users_weighed": round(float(1.0 / (weights**2).sum()), 2),
    }
    return tokens, groups


# -- the taste quiz: which pair to show a new user next ----------------------------------------------------------------


def informative_pair(
    differences: torch.Tensor,
    utilities: torch.Tensor,
    answers: Sequence[tuple[int, float]],
    asked: Collection[int],
) -> int | None:
    """The pool pair whose pick would tell the most about a new user, or ``None`` when every pair was asked.

    Query by committee over a population (BALD, Houlsby et al.): each population user (a row of ``utilities``,
    ``[N, C]``) is weighed by the likelihood of the ``answers`` so far (pair index and outcome: +1 when the first
    image was preferred, -1 when the second was, 0 for a skip), and predicts the first image of pair ``i`` with
    ``sigmoid(differences[i] @ u)`` (``differences``: ``[P, C]``, the first image's attribute presence minus the
    second's). A pick weighs by Bradley-Terry, as `embed_user` does; a skip by Davidson's tie probability (``1 /
    (2 cosh(m / 2) + 1)`` for the user's margin ``m``), so that someone who skips a pair of two colours is next asked
    about something else, not about more colours. The chosen pair maximises the mutual information between the pick
    and which user this is, ``H(E[p]) - E[H(p)]``: the committee disagrees on it, and each member is sure of its own
    answer. Pairs in ``asked`` (answered or skipped) are never chosen again.

    >>> informative_pair(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[3.0, 0.0], [-3.0, 0.0]]), [], set())
    1
    """
    log_likelihood = torch.zeros(utilities.shape[0], dtype=torch.float64)
    for index, outcome in answers:
        margin = differences[index].double() @ utilities.double().T
        if outcome == 0:
            log_likelihood -= torch.log(2 * torch.cosh(margin / 2) + 1)
        else:
            log_likelihood += F.logsigmoid(outcome * margin)
    weights = torch.softmax(log_likelihood, dim=0)
    p = torch.sigmoid(differences.double() @ utilities.double().T).clamp(1e-9, 1 - 1e-9)

    def entropy(q: torch.Tensor) -> torch.Tensor:
        return -(q * q.log() + (1 - q) * (1 - q).log())

    information = entropy(p @ weights) - entropy(p) @ weights
    open_pairs = torch.ones(len(differences), dtype=torch.bool)
    open_pairs[list(asked)] = False
    if not bool(open_pairs.any()):
        return None
    return int(torch.where(open_pairs, information, torch.tensor(-1.0, dtype=torch.float64)).argmax())


class TasteQuiz:
    """Which pairs of a fixed pool of base-model images to show a new user, so that a few picks say much.

    A pair the base model draws at random often differs in nothing the user cares about (a skip) or in what most
    people agree on; the quiz instead asks, pick by pick, the pool pair the population's users disagree on most
    given the picks so far (`informative_pair`), among pairs whose images differ in one slot at most (the object's
    colour or the background, `attribute_slot`), and only when those run out among the rest. A pick between images
    that differ in both cannot say which one it was made for, yet the committee reads it as evidence on both: on
    the no-U-Net proxy (dev users 400-599, `tiny`'s pool, 4 picks) the unrestricted quiz scored 0.720 against 0.724
    for 4 random picks, and the one-slot quiz 0.757. Through the U-Net, population mode from 4 quiz picks won 0.717
    on 88 held-out users against 0.696 from 4 random picks (`bench/eval_preference.py --quiz`). ``population`` is an
    ``attributes`` population model (the shipped start of a base model is one); ``pool`` holds (prompt, first
    image, second image); each image is read once by ``reader`` (the population's own, by default).

    >>> quiz = TasteQuiz(load_adapter(SHIPPED_STARTS["tiny"]), pool)  # doctest: +SKIP
    >>> quiz.next_pair({})  # doctest: +SKIP
    17
    """

    def __init__(
        self,
        population: AdapterFile,
        pool: Sequence[tuple[str, Image.Image, Image.Image]],
        reader: AttributeReader | None = None,
    ) -> None:
        config = population.metadata.config
        if UTILITIES_KEY not in population.tensors:
            raise InvalidInputError(
                "expected an 'attributes' population model for the taste quiz, found a "
                f"{config.get('population_encoder', config.get('mode', 'other'))!r} preference file"
            )
        reader = reader or attribute_reader_from_spec(str(config["attribute_reader"]))
        candidates = [str(c) for c in config["candidates"]]
        self.pool = list(pool)
        self.utilities = population.tensors[UTILITIES_KEY].float()
        pairs = [PreferencePair("quiz", prompt, first, second) for prompt, first, second in self.pool]
        self.differences = (
            _presence_differences(pairs, reader, candidates) if pairs else torch.zeros(0, len(candidates))
        )
        slots = sorted({attribute_slot(c) for c in candidates})
        columns = [torch.tensor([attribute_slot(c) == slot for c in candidates]) for slot in slots]
        changed = torch.stack([(self.differences[:, column] != 0).any(dim=1) for column in columns], dim=1)
        self.one_slot = changed.sum(dim=1) <= 1  # asked first
        self._mixed = {int(i) for i in torch.nonzero(~self.one_slot).flatten()}

    def next_pair(self, answers: dict[int, int | None]) -> int | None:
        """The pool index to show next, given ``answers`` so far (pool index -> 0 when the first image was picked, 1
        for the second, ``None`` for a skip); ``None`` when the pool is used up."""
        picked = [(index, 0.0 if choice is None else 1.0 if choice == 0 else -1.0) for index, choice in answers.items()]
        index = informative_pair(self.differences, self.utilities, picked, set(answers) | self._mixed)
        return index if index is not None else informative_pair(self.differences, self.utilities, picked, set(answers))


def embed_user(
    population: AdapterFile,
    pairs: Sequence[PreferencePair],
    *,
    user_id: str | None = None,
    image_features: ImageFeatures | None = None,
    attribute_reader: AttributeReader | None = None,
) -> AdapterFile:
    """A new user's ``user`` adapter from a few of their pairs and a population model, without training."""
    config = population.metadata.config
    if population.metadata.kind != KIND or config.get("mode") != "population":
        raise InvalidInputError(
            f"expected a population preference model, found a {population.metadata.kind} adapter in mode "
            f"{config.get('mode')!r}"
        )
    if not pairs:
        raise InvalidInputError("expected at least one preference pair of the new user, found none")
    extra: dict[str, Any] = {}
    if config.get("encoder") == "attributes":
        tokens, extra = _embed_by_attributes(population, pairs, attribute_reader)
    else:
        features = image_features or image_features_from_spec(str(config["image_encoder"]))
        if features.name != config["image_encoder"] or features.dim != int(config["feature_dim"]):
            raise InvalidInputError(
                f"the population model reads images through {config['image_encoder']!r} ({config['feature_dim']} "
                f"features), found {features.name!r} ({features.dim})"
            )
        encoder_state = {
            key.removeprefix(ENCODER_PREFIX): value
            for key, value in population.tensors.items()
            if key.startswith(ENCODER_PREFIX)
        }
        width = int(population.tensors[f"{LAYER_PREFIX}0.to_k.weight"].shape[1])
        encoder = UserEncoder(features.dim, int(config["hidden"]), int(config["tokens"]), width)
        encoder.load_state_dict(encoder_state)
        preferred, other = _features_by_image(pairs, features)
        with torch.no_grad():
            tokens = encoder.eval()(preferred.unsqueeze(0), other.unsqueeze(0))[0]
    user_id = user_id or pairs[0].user_id
    tensors = {key: value for key, value in population.tensors.items() if key.startswith(LAYER_PREFIX)}
    tensors[TOKENS_KEY] = tokens
    meta = population.metadata
    user_config = {
        "mode": "user",
        "user_id": user_id,
        "tokens": int(tokens.shape[0]),
        "branch_attention": branch_attention(config),
        "beta": config.get("beta"),
        "pairs": len(pairs),
        "population_model": meta.name,
        **extra,
        "training": config.get("training", {}),
    }
    return AdapterFile(
        tensors,
        AdapterMetadata(
            kind=KIND,
            family=meta.family,
            base_model=meta.base_model,
            base_fingerprint=meta.base_fingerprint,
            config=user_config,
        ),
    )


# -- CLI ----------------------------------------------------------------------------------------------------------


def population_model(name: str, library: Any) -> AdapterFile:
    """Embed mode's population model: the library's adapter ``name``, or, when the library holds none of that name,
    the population shipped with an embedded base model (``tiny``: `SHIPPED_STARTS`), so that a user of `tiny` gets
    population mode from a few picks without building one."""
    if library.exists(name) or name not in SHIPPED_STARTS:
        return library.load(name)
    population = attribute_population_file(SHIPPED_STARTS[name], "config key 'population_model'")
    population.metadata.name = population.metadata.name or f"{name}-preference"
    return population


def train_from_cli(args: Any, home: Any) -> int:
    """``studio train preference --pairs FILE_OR_DIR [--user ID] --name NAME [--set mode=population|embed ...]``."""
    from studio.base_models import load_base_model
    from studio.library import AdapterLibrary, sanitize_name
    from studio.preferences import load_pairs
    from trainers.core.config import load_config
    from trainers.core.progress import TqdmProgress

    if getattr(args, "resume", None):
        raise NotAvailableError("resuming preference training is not available; it takes minutes, start it again")
    if not args.pairs:
        raise InvalidInputError("expected --pairs FILE_OR_DIR (Pick-a-Pic .parquet/.jsonl or a preferences folder)")
    cfg = load_config(PreferenceConfig, toml_path=args.config, overrides=args.set)
    if cfg.mode == "branch":
        raise NotAvailableError(
            "training an attribute branch from the CLI is not available yet: it learns from attribute examples, not "
            "pairs (on tiny, `python bench/eval_preference.py --branch FILE` trains one)"
        )
    home.ensure()
    library = AdapterLibrary(home)
    name = sanitize_name(args.name)
    if library.exists(name):
        raise InvalidInputError(f"an adapter named '{name}' already exists; choose another --name or remove it first")
    pairs = load_pairs(args.pairs, user=args.user if cfg.mode != "population" else None)
    progress = [TqdmProgress(description=f"preference {name}")]
    if cfg.mode == "embed":
        adapter = embed_user(population_model(cfg.population_model, library), pairs, user_id=args.user)
    else:
        base = load_base_model(args.base)
        if cfg.mode == "population":
            adapter = train_population(cfg, pairs, base, progress=progress)
        else:
            adapter = train_user_preference(cfg, pairs, base, user_id=args.user, progress=progress)
    adapter.metadata.name = name
    info = library.add(adapter, name)
    summary = adapter.metadata.config
    accuracy = summary.get("final_implicit_accuracy")
    details = [f"{summary.get('pairs')} pairs", f"implicit accuracy {'n/a' if accuracy is None else accuracy}"]
    if "initial_attributes" in summary:
        details.append(f"start: {', '.join(summary['initial_attributes']) or 'nothing'}")
    print(f"trained preference '{name}' ({summary['mode']}, {'; '.join(details)}): {getattr(info, 'path', '')}")
    return 0


def win_rate_text(wins: int, n: int) -> str:
    """``"0.780 [0.64, 0.87] (39/50)"``: a win rate with its 95% Wilson interval."""
    from studio.world.evaluate import wilson_interval

    low, high = wilson_interval(wins, n)
    rate = wins / n if n else math.nan
    return f"{rate:.3f} [{low:.2f}, {high:.2f}] ({wins}/{n})"
