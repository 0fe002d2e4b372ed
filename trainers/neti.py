"""NeTI: a concept as a neural space-time mapper (Alaluf et al. 2023, "A Neural Space-Time Representation for
Text-to-Image Personalization"), trained with nested dropout so one file offers a fidelity/editability dial.

The concept is a small network, the mapper, that gives the placeholder token a different input embedding for every
(denoising timestep ``t``, cross-attention layer ``l``) pair, plus a "textual bypass" vector added to the text
encoder's output at the placeholder position. Nothing of the diffusion model is trained.

Mapper (`NetiMapper`), for inputs ``(t, l)`` with ``t`` the raw timestep (0..999) and ``l`` the layer index:

1. Random Fourier features: ``v = [sin(w @ [t, l]), cos(w @ [t, l])]``, L2-normalised, with ``w`` ``[1024, 2]``
   drawn from N(0, 1) and its time column scaled by ``sigma_t`` (0.03), its layer column by ``sigma_l`` (2.0).
2. ``Linear(2048 -> time_anchors * n_layers)`` whose weight rows start as the encodings of the anchors
   ``(t, l)`` for ``t`` in 0, 100, ..., 900 (outer) and every layer ``l`` (inner); trainable.
3. ``Linear(-> 128), LayerNorm, LeakyReLU, Linear(128, 128), LayerNorm, LeakyReLU``: the 128-wide hidden ``h``.
4. Nested dropout on ``h``: in training, with probability 0.5 per batch, each row zeroes ``h[idx:]`` for its own
   ``idx`` uniform in [0, 128); at generation a ``truncation`` zeroes ``h[truncation:]``.
5. ``Linear(128 -> 2 * sum(widths))``: the token's input embedding for each text encoder, then the bypass vector
   for each text encoder's output. Each embedding is rescaled to the L2 norm of the super-category word's input
   embedding in that encoder. (The reference code normalises the concatenated [embedding, bypass] vector instead;
   the bypass is renormalised by the bypass formula anyway, so we give the embedding itself the word's norm.)

Textual bypass, at the placeholder position only, with ``h`` the text-encoder state there and ``b`` the bypass
vector: ``h' = h + alpha * ||h|| * b / ||b||`` (``alpha`` 0.2). For SD1.x/SD2.x ``h`` is the last encoder layer's
output *before* the final layer norm, and both the plain and the bypassed states then go through the final layer
norm, as in the reference code's text transformer. SDXL feeds the U-Net the penultimate layer's states, which have no
final layer norm; there the bypass is added to those states directly (per text encoder, each with its own norm).
In cross-attention the keys come from the plain states and the values from the bypassed states.

Training: all layers' conditionings come from ONE batched call per text encoder per step: each of the ``B`` prompts
is repeated ``n_layers`` times with that row's mapper output spliced in at the placeholder position
(`ConditioningEncoder`); with ``conditioning_groups`` G < B, the batch's images share G (prompt, timestep) pairs
and the call has ``G * n_layers`` rows. The U-Net then reads its per-layer states through the shared pipeline's
conditioning seam (`pipelines.kinds.conditioning`): each processor knows its layer index. ``t`` uniform over the
training steps; AdamW, lr 1e-3 times the effective batch, weight decay 1e-2, constant schedule; textual-inversion
prompt templates.

Options beyond the reference, all off by default (see `NetiConfig`): ``num_vectors`` (the placeholder takes k
positions, each with its own mapper output, as multi-vector textual inversion does), ``norm_scale`` (output norm as
a multiple of the word's), ``init_from_super_category`` / ``freeze_super_category`` (the output starts at, or stays
anchored to, the super-category word so a low truncation returns towards it), ``context_weight`` (a CoRe-style
context regularisation: the mapper may not swallow the words after the placeholder) and ``context_dial`` (that
regularisation weighted by the truncation, strongest at the dial's low end and off at full truncation). On the small
`tiny` model one reference token at the word's norm barely moves the images; bench/eval_neti.py documents the tiny
recipe.

>>> cfg = load_config(NetiConfig, overrides=["placeholder_token=<my-toy>", "super_category=toy", "steps=2"])
>>> cfg.sigma_t, cfg.hidden_width
(0.03, 128)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from studio.adapter_files import AdapterFile, AdapterMetadata
from studio.errors import CorruptFileError, InvalidInputError
from trainers.core.config import config_to_dict, expect_in_range, expect_positive, load_config, recipe_for
from trainers.core.data import expect_image_folder
from trainers.core.embeddings import init_vector, validate_placeholder_token
from trainers.core.progress import ProgressEvent

logger = logging.getLogger(__name__)

__all__ = [
    "ENCODER_OUTPUTS",
    "ConditioningEncoder",
    "EncoderOutput",
    "MapperOutput",
    "MapperSpec",
    "NetiConfig",
    "NetiMapper",
    "BASE_RECIPES",
    "apply_bypass",
    "build_mapper",
    "context_dial_weights",
    "context_preservation_loss",
    "fourier_features",
    "mapper_from_adapter",
    "neti_adapter",
    "train_from_cli",
    "train_neti",
]

KEY_MAPPER = "neti.mapper"
"""Header key: JSON of the `MapperSpec` (scales, anchors, widths, placeholder, super-category, norms, family)."""
TENSOR_W = "neti.fourier_w"
"""Tensor key of the Fourier matrix ``w`` (``[features, 2]``, scales applied)."""
TENSOR_PREFIX = "neti.mapper."
"""Tensor key prefix of the mapper's weights (its ``state_dict`` keys follow)."""


# -- configuration -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetiConfig:
    """Options of a NeTI run; these defaults are the only defaults (the reference configuration)."""

    placeholder_token: str = ""
    """The new word, e.g. ``<my-toy>``."""
    super_category: str = ""
    """An ordinary word for what the concept is (``toy``): its embedding norm is the mapper's output norm."""
    learnable_property: Literal["object", "style"] = "object"
    num_vectors: int = 1
    """Token embeddings the mapper gives the placeholder (it takes that many positions in the prompt); 1 = the
    reference. Like multi-vector textual inversion: more positions give the concept more of the cross-attention."""
    steps: int = 1000
    batch_size: int = 2
    conditioning_groups: int = 0
    """Distinct (prompt, timestep) pairs per batch; the batch's images are split among them and share their
    conditionings, so the text encoder runs over ``groups x n_layers`` rows instead of ``batch_size x n_layers``
    (its forward and backward are most of a step's cost on small models). 0 = one per image (the reference)."""
    gradient_accumulation_steps: int = 4
    lr: float = 1e-3
    """Per sample; with ``scale_lr`` the optimizer uses ``lr * batch_size * gradient_accumulation_steps``."""
    scale_lr: bool = True
    weight_decay: float = 1e-2
    resolution: int = 0
    """Training image side in pixels; 0 = the base model's native size."""
    seed: int = 0
    fourier_features: int = 1024
    sigma_t: float = 0.03
    sigma_l: float = 2.0
    time_anchors: int = 10
    """Timesteps the mapper's first layer is initialised at (spread over training's range); not the generation option
    ``encode_steps`` (`pipelines.kinds.neti`)."""
    hidden_width: int = 128
    bypass_alpha: float = 0.2
    nested_dropout: float = 0.5
    """Probability per batch that nested dropout truncates the hidden vector."""
    nested_dropout_sampling: Literal["uniform", "log"] = "uniform"
    """How nested dropout draws a truncation in ``[0, hidden_width)``: ``uniform`` (the reference), or ``log``
    (log-uniform in truncation + 1: at width 128, 45% of draws fall below 8, against one in 16 for a uniform draw),
    so the dial's low end, where editability is decided, trains about as often as its high end. Not better on `tiny`
    (`bench/eval_neti.py` preset, matched in time with TI, truncations 128/32/8/2, one run each): robot-toy seeds
    0/1/2 similarity 0.506/0.424/0.427/0.439, 0.425/0.446/0.386/0.404, 0.578/0.520/0.427/0.406 (TI 0.627, 0.440,
    0.448), and full truncation lost new backgrounds (0.21, 0.54, 0.38, against 1.0, 0.67, 0.67 uniform);
    hex-emblem seed 0 0.504/0.489/0.473/0.497 (TI 0.537). So uniform stays."""
    nested_dropout_per_prompt: bool = False
    """Nested dropout draws one truncation per (prompt, timestep) group, shared by all its layers' rows, as a
    generation truncates every layer alike (False: each layer row draws its own, as the reference code does).
    On `tiny` (robot-toy, seed 0, one run each) it made the dial of ``conditioning_groups=1`` monotone in similarity
    (0.504, 0.454, 0.445, 0.437 at 128, 32, 8, 2) but lost backgrounds down to truncation 8 and cost similarity;
    with ``context_dial`` it cost more (0.438 at full), so it stays off."""
    norm_scale: float = 1.0
    """The mapper's output norm is this times the super-category word's norm (1 = the reference)."""
    init_from_super_category: bool = False
    """Start the mapper's embedding output at the super-category word: its bias is the word's row and its weights
    are scaled down (``init_weight_scale``), so the untrained concept, and every truncation's path back to the bias,
    begins at the word. False = the reference's random output layer."""
    init_weight_scale: float = 0.01
    """With ``init_from_super_category``: factor on the embedding part of the output layer's initial weights."""
    freeze_super_category: bool = False
    """With ``init_from_super_category``: keep the embedding part of the output bias at the word during training, so
    the mapper learns the concept as an offset from the word that nested dropout orders, and a low truncation
    returns towards the word itself (the most editable end of the dial)."""
    context_weight: float = 0.0
    """Weight of the context regularisation (0: off, the reference). With it, each step also encodes one new-context
    prompt ("a {} on the beach") with the mapper's outputs, in the same batched call, and keeps the text encoder's
    states after the placeholder close (cosine) to those after the super-category word: the concept then leaves the
    prompt's other words their say, as CoRe does for textual inversion (Wu et al. 2024). Measured on `tiny` (robot-toy,
    seed 0, 155 steps of the bench recipe): weight 0.5 with ``context_margin`` 0.09 drew the asked-for new backgrounds
    in 0.96 of the images instead of 0.33, at a similarity of 0.47 instead of 0.53, so it is off by default."""
    context_margin: float = 0.0
    """With ``context_weight``: the context loss counts only above this value (1 - cosine), so the concept may change
    the other words' states that much before it is penalised."""
    context_dial: float = 0.0
    """With ``context_weight``: make the context regularisation depend on the truncation, so the dial's low end
    learns to leave the prompt its say while full truncation keeps fidelity. Each context row (one per layer) is
    truncated at its own ``idx`` drawn uniform in [0, ``hidden_width``) and its loss weighted by ``(1 - idx /
    hidden_width) ** context_dial`` (1: linear; larger: only the low end). 0 = off: the context rows take nested
    dropout's draw and one even weight. Measured on `tiny` (robot-toy, training seeds 0/1/2, 230 steps with
    ``conditioning_groups=1``, matched in time with TI): 3 with weight 0.5 and margin 0.09 kept full-truncation
    similarity at 0.526 (TI 0.505; without the context term 0.556) with new backgrounds in 0.82 of the images (0.26
    without), and colour compliance rose 0.44, 0.60, 0.81, 0.94 over truncations 128, 32, 8, 2 (similarity 0.526,
    0.536, 0.495, 0.406). Without the margin (power 1 or 3, weight 0.02 to 1) or with power 2, every truncation
    collapsed towards the word (full-truncation similarity 0.41-0.47 on seed 0, 0.57 with this recipe).
    bench/eval_neti.py's recipe uses it."""
    checkpoint_every: int = 250
    keep_checkpoints: int = 1
    max_seconds: float = 0.0
    """Stop after this much training time (0 = no limit): for runs matched in time with another method."""

    def validate(self) -> None:
        """Ranges; the placeholder and super-category are checked when training starts (they need a tokenizer)."""
        expect_positive(
            self,
            "num_vectors",
            "steps",
            "batch_size",
            "gradient_accumulation_steps",
            "lr",
            "fourier_features",
            "sigma_t",
            "sigma_l",
            "time_anchors",
            "hidden_width",
            "norm_scale",
            "init_weight_scale",
            "checkpoint_every",
            "keep_checkpoints",
        )
        if not 0 <= self.conditioning_groups <= self.batch_size:
            raise InvalidInputError(
                f"config key 'conditioning_groups' expects 0..batch_size ({self.batch_size}), "
                f"got {self.conditioning_groups}"
            )
        expect_in_range(self, "nested_dropout", 0.0, 1.0)
        expect_in_range(self, "bypass_alpha", 0.0, 10.0)
        keys = ("resolution", "max_seconds", "weight_decay", "context_weight", "context_margin", "context_dial")
        values = [getattr(self, key) for key in keys]
        if min(values) < 0:
            raise InvalidInputError(
                f"config keys {', '.join(repr(key) for key in keys)} expect values >= 0, got "
                f"{', '.join(str(value) for value in values)}"
            )


BASE_RECIPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "steps": 225,
        "num_vectors": 4,
        "norm_scale": 3.0,
        "init_from_super_category": True,
        "freeze_super_category": True,
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "conditioning_groups": 1,
        "context_weight": 0.5,
        "context_margin": 0.09,
        "context_dial": 1.0,
        "hidden_width": 32,
    },
}
"""Measured defaults per base model, under the TOML file, the UI's values and ``--set`` (`load_config`'s
``recipe``). The field defaults are the paper's SD1.4 recipe; on the embedded `tiny` one token at the word's norm
barely moves the images, so `tiny` has its own, measured against textual inversion in bench/eval_neti.py (why each
key, and the curves): about half a minute on a laptop CPU."""


@dataclass(frozen=True)
class MapperSpec:
    """Everything needed to rebuild a mapper and use it, stored as JSON in the file header (`KEY_MAPPER`)."""

    n_layers: int
    widths: tuple[int, ...]
    """Width of each text encoder (token embedding = hidden state width for CLIP)."""
    target_norms: tuple[float, ...]
    """L2 norm of the super-category word's input embedding, per text encoder."""
    placeholder_token: str
    super_category: str
    family: str
    fourier_features: int = 1024
    sigma_t: float = 0.03
    sigma_l: float = 2.0
    time_anchors: int = 10
    """Timesteps the mapper's first layer is initialised at (spread over training's range); not the generation option
    ``encode_steps`` (`pipelines.kinds.neti`)."""
    num_train_timesteps: int = 1000
    hidden_width: int = 128
    bypass_alpha: float = 0.2
    num_vectors: int = 1
    """Embeddings (and bypass vectors) per text encoder; files written before this key existed have 1."""

    @property
    def anchor_count(self) -> int:
        """Width of the anchor layer: time anchors x layers (160 on SD1.x)."""
        return self.time_anchors * self.n_layers

    def to_json(self) -> str:
        """The header value."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "the file") -> MapperSpec:
        """Parse a header value; `CorruptFileError` when it is not a mapper spec."""
        try:
            data = json.loads(text)
            data["widths"] = tuple(int(width) for width in data["widths"])
            data["target_norms"] = tuple(float(norm) for norm in data["target_norms"])
            return cls(**data)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"{source}: {KEY_MAPPER} is not a NeTI mapper description ({exc})") from None


# -- the mapper ----------------------------------------------------------------------------------------------------


def fourier_matrix(spec: MapperSpec, generator: torch.Generator) -> torch.Tensor:
    """``w`` ``[features, 2]`` from N(0, 1), time column times ``sigma_t``, layer column times ``sigma_l``."""
    w = torch.randn(spec.fourier_features, 2, generator=generator)
    return w * torch.tensor([spec.sigma_t, spec.sigma_l])


def fourier_features(w: torch.Tensor, timesteps: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
    """``[N, 2 * features]``: ``[sin(w @ x), cos(w @ x)]`` for ``x = [t, l]``, each row L2-normalised.

    >>> fourier_features(torch.ones(4, 2), torch.tensor([0.0]), torch.tensor([1.0])).shape
    torch.Size([1, 8])
    """
    x = torch.stack([timesteps.float(), layers.float()], dim=-1)  # [N, 2]
    phase = x @ w.float().T  # [N, features]
    v = torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1)
    return v / v.norm(dim=-1, keepdim=True)


@dataclass(frozen=True)
class MapperOutput:
    """Mapper outputs for N rows: per text encoder, the token embeddings ``[N, w_i]`` and bypass vectors.

    With several vectors per placeholder (``num_vectors`` k > 1) each tensor is ``[N, k, w_i]``.
    """

    embeddings: tuple[torch.Tensor, ...]
    bypass: tuple[torch.Tensor, ...]


class NetiMapper(nn.Module):
    """The space-time mapper: ``(t, l) -> (token embedding, bypass)`` per text encoder. See the module docstring.

    >>> spec = MapperSpec(n_layers=2, widths=(8,), target_norms=(1.0,), placeholder_token="<x>",
    ...                   super_category="toy", family="sd1", fourier_features=16, hidden_width=4)
    >>> mapper = NetiMapper(spec, fourier_matrix(spec, torch.Generator().manual_seed(0)))
    >>> out = mapper(torch.tensor([10.0]), torch.tensor([1.0]))
    >>> round(float(out.embeddings[0].norm()), 4), tuple(out.bypass[0].shape)
    (1.0, (1, 8))
    """

    def __init__(self, spec: MapperSpec, w: torch.Tensor) -> None:
        super().__init__()
        if tuple(w.shape) != (spec.fourier_features, 2):
            raise ValueError(f"expected w of shape [{spec.fourier_features}, 2], got {list(w.shape)}")
        self.spec = spec
        self.register_buffer("w", w.detach().float().clone())
        self.register_buffer("target_norms", torch.tensor(spec.target_norms, dtype=torch.float32))
        width = spec.hidden_width
        self.input_layer = nn.Linear(2 * spec.fourier_features, spec.anchor_count)
        with torch.no_grad():
            self.input_layer.weight.copy_(self.anchor_encodings())
        self.trunk = nn.Sequential(
            nn.Linear(spec.anchor_count, width),
            nn.LayerNorm(width),
            nn.LeakyReLU(),
            nn.Linear(width, width),
            nn.LayerNorm(width),
            nn.LeakyReLU(),
        )
        self.output_layer = nn.Linear(width, 2 * spec.num_vectors * sum(spec.widths))

    def anchor_encodings(self) -> torch.Tensor:
        """``[time_anchors * n_layers, 2 * features]``: encodings of t in 0, T/A, ... (outer) x every layer."""
        spec = self.spec
        stride = spec.num_train_timesteps // spec.time_anchors
        times = torch.arange(spec.time_anchors, dtype=torch.float32) * stride
        layers = torch.arange(spec.n_layers, dtype=torch.float32)
        grid_t, grid_l = torch.meshgrid(times, layers, indexing="ij")
        return fourier_features(self.w, grid_t.reshape(-1), grid_l.reshape(-1))

    def hidden(self, timesteps: torch.Tensor, layers: torch.Tensor) -> torch.Tensor:
        """The 128-wide hidden vector before nested dropout, ``[N, hidden_width]``."""
        return self.trunk(self.input_layer(fourier_features(self.w, timesteps, layers)))

    def nested_dropout(
        self, h: torch.Tensor, truncation: int | None, p: float, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Training: with probability ``p`` each row keeps ``h[:idx]`` for its own random idx. Else truncation.

        ``rows`` (training only, ``[N]`` integers): a row with a value >= 0 keeps ``h[:value]`` whatever the draw, so
        a loss weighted by the truncation (``context_dial``) knows the truncation its rows were given.
        """
        width = h.shape[-1]
        keep: torch.Tensor | None = None
        if self.training:
            idx: torch.Tensor | None = None
            if p > 0 and float(torch.rand(())) < p:
                idx = torch.randint(0, width, (h.shape[0], 1), device=h.device)
            if rows is not None:
                fixed = rows.to(h.device).long()[:, None]
                idx = torch.where(fixed >= 0, fixed, width if idx is None else idx)
            if idx is not None:
                keep = torch.arange(width, device=h.device) < idx
        elif truncation is not None and truncation < width:
            keep = (torch.arange(width, device=h.device) < truncation).expand_as(h)
        return h if keep is None else h * keep.to(h.dtype)

    def forward(
        self,
        timesteps: torch.Tensor,
        layers: torch.Tensor,
        truncation: int | None = None,
        *,
        dropout: float = 0.5,
        row_truncations: torch.Tensor | None = None,
    ) -> MapperOutput:
        """Mapper outputs for rows ``(timesteps[i], layers[i])``; ``truncation`` applies in eval mode only.

        ``row_truncations`` (training only): per-row truncations that override nested dropout's draw where >= 0.
        With ``num_vectors`` k > 1 each tensor is ``[N, k, width]`` (vector j for the placeholder's j-th position).
        """
        h = self.nested_dropout(self.hidden(timesteps, layers), truncation, dropout, row_truncations)
        out = self.output_layer(h)
        k = self.spec.num_vectors
        widths = [k * width for width in self.spec.widths]
        parts = [part if k == 1 else part.unflatten(-1, (k, -1)) for part in torch.split(out, widths + widths, dim=-1)]
        embeddings = tuple(
            F.normalize(part, dim=-1) * self.target_norms[i] for i, part in enumerate(parts[: len(widths)])
        )
        return MapperOutput(embeddings=embeddings, bypass=tuple(parts[len(widths) :]))


def _per_slot(values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``[N, T, D]``: row n's vector for each position; ``values`` ``[N, D]`` (the same at every position) or
    ``[N, k, D]`` (vector j at the j-th, (k+j)-th, ... marked position of the row: k positions per placeholder)."""
    if values.dim() == 2:
        return values[:, None, :].expand(-1, slots.shape[1], -1)
    index = ((slots.long().cumsum(dim=-1) - 1).clamp(min=0) % values.shape[1])[..., None]
    return torch.gather(values, 1, index.expand(-1, -1, values.shape[-1]))


def apply_bypass(states: torch.Tensor, slots: torch.Tensor, bypass: torch.Tensor, alpha: float) -> torch.Tensor:
    """``h' = h + alpha * ||h|| * b / ||b||`` at the placeholder positions ``slots`` (``[N, T]`` bool).

    ``states`` ``[N, T, D]``, ``bypass`` ``[N, D]`` (one vector per row, added at every slot of that row) or
    ``[N, k, D]`` (vector j at each placeholder's j-th position).
    """
    direction = F.normalize(_per_slot(bypass.to(states.dtype), slots), dim=-1)
    added = alpha * states.norm(dim=-1, keepdim=True) * direction
    return states + slots[..., None].to(states.dtype) * added


# -- the text side: per-row conditionings in one batched text-encoder call -----------------------------------------


@dataclass(frozen=True)
class EncoderOutput:
    """Which text-encoder states a family's pipeline feeds the U-Net.

    ``layer_from_end`` 1 = the last layer's output followed by the final layer norm (SD1.x, SD2.x); 2 = the
    penultimate layer's output, no final layer norm (SDXL).
    """

    layer_from_end: int
    final_layer_norm: bool


ENCODER_OUTPUTS: dict[str, EncoderOutput] = {
    "sd1": EncoderOutput(layer_from_end=1, final_layer_norm=True),
    "sd2": EncoderOutput(layer_from_end=1, final_layer_norm=True),
    "sdxl": EncoderOutput(layer_from_end=2, final_layer_norm=False),
}


def _text_root(encoder: nn.Module) -> nn.Module:
    # transformers 5 flattened CLIPTextModel but not CLIPTextModelWithProjection (which keeps ``text_model``).
    return getattr(encoder, "text_model", encoder)


@dataclass(frozen=True)
class SlottedPrompts:
    """Token ids of prompts per text encoder, with the placeholder's positions marked (``[B, T]`` each)."""

    input_ids: tuple[torch.Tensor, ...]
    slots: tuple[torch.Tensor, ...]

    def has_placeholder(self) -> bool:
        """Whether every prompt kept at least one placeholder position after truncation."""
        return bool(self.slots[0].any(dim=-1).all())


class ConditioningEncoder:
    """Runs a pipeline's text encoders with mapper outputs spliced in at the placeholder positions.

    The placeholder need not be in the tokenizer: prompts are tokenized around it and its positions get a stand-in
    id (the super-category word's first token) whose embedding a hook replaces, row by row, with the mapper's
    output. Textual-inversion tokens and text-encoder LoRAs of the same pipeline apply as usual.
    """

    def __init__(
        self,
        pipeline: Any,
        family: Any,
        placeholder_token: str,
        super_category: str,
        alpha: float,
        num_vectors: int = 1,
    ) -> None:
        self.pipeline = pipeline
        self.family = family
        self.placeholder_token = placeholder_token
        self.alpha = alpha
        self.num_vectors = num_vectors
        self.output = ENCODER_OUTPUTS[family.name]
        self.encoders = family.text_encoders(pipeline)
        self.tokenizers = family.tokenizers(pipeline)
        self.slot_ids = []
        self.word_lengths: list[int] = []
        """Tokens of the super-category word per tokenizer."""
        for tokenizer in self.tokenizers:
            ids = tokenizer(super_category, add_special_tokens=False).input_ids
            if not super_category.strip() or not ids:
                raise InvalidInputError(f"expected a super-category word the tokenizer knows, got {super_category!r}")
            self.slot_ids.append(int(ids[0]))
            self.word_lengths.append(len(ids))

    def tokenize(self, prompts: Sequence[str]) -> SlottedPrompts:
        """Token ids (padded to the tokenizer's length, as the pipeline pads) and placeholder positions."""
        all_ids, all_slots = [], []
        for tokenizer, slot_id in zip(self.tokenizers, self.slot_ids, strict=True):
            length = int(tokenizer.model_max_length)
            rows, slots = [], []
            for prompt in prompts:
                content: list[int] = []
                marks: list[bool] = []
                for index, piece in enumerate(prompt.split(self.placeholder_token)):
                    if index:
                        content.extend([slot_id] * self.num_vectors)
                        marks.extend([True] * self.num_vectors)
                    piece_ids = tokenizer(piece, add_special_tokens=False).input_ids if piece.strip() else []
                    content.extend(piece_ids)
                    marks.extend([False] * len(piece_ids))
                content, marks = content[: length - 2], marks[: length - 2]
                pad = length - len(content) - 2
                rows.append([tokenizer.bos_token_id, *content, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad)
                slots.append([False, *marks, False] + [False] * pad)
            all_ids.append(torch.tensor(rows, dtype=torch.long))
            all_slots.append(torch.tensor(slots, dtype=torch.bool))
        return SlottedPrompts(tuple(all_ids), tuple(all_slots))

    @contextlib.contextmanager
    def _spliced(
        self, encoder: nn.Module, slots: torch.Tensor, rows: torch.Tensor, captured: list[torch.Tensor]
    ) -> Iterator[None]:
        def splice(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            return torch.where(slots[..., None], _per_slot(rows.to(output.dtype), slots), output)

        def capture(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)

        layer = _text_root(encoder).encoder.layers[-self.output.layer_from_end]
        handles = [
            encoder.get_input_embeddings().register_forward_hook(splice),
            layer.register_forward_hook(capture),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def encode(
        self, prompts: SlottedPrompts, outputs: MapperOutput, rows_per_prompt: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain and bypassed states ``[N, T, D]`` for ``N = B * rows_per_prompt`` mapper rows (prompt-major).

        One call per text encoder for all rows; SDXL's two encoders' states are concatenated as the pipeline does.
        """
        plains, bypassed = [], []
        for index, encoder in enumerate(self.encoders):
            device = encoder.get_input_embeddings().weight.device
            ids = prompts.input_ids[index].to(device).repeat_interleave(rows_per_prompt, dim=0)
            slots = prompts.slots[index].to(device).repeat_interleave(rows_per_prompt, dim=0)
            captured: list[torch.Tensor] = []
            with self._spliced(encoder, slots, outputs.embeddings[index].to(device), captured):
                encoder(ids)
            states = captured[-1]
            with_bypass = apply_bypass(states, slots, outputs.bypass[index].to(device), self.alpha)
            if self.output.final_layer_norm:
                norm = _text_root(encoder).final_layer_norm
                states, with_bypass = norm(states), norm(with_bypass)
            plains.append(states)
            bypassed.append(with_bypass)
        return torch.cat(plains, dim=-1), torch.cat(bypassed, dim=-1)


def context_preservation_loss(
    states: torch.Tensor, slots: torch.Tensor, target: torch.Tensor, word_length: int, *, per_row: bool = False
) -> torch.Tensor:
    """1 - mean cosine between the states after the placeholder and the same words' states after the word.

    A scalar, or with ``per_row`` one value per row ``[N]`` (the mean over that row's compared positions).

    ``states`` ``[N, T, D]``: one prompt's states under N mapper outputs; ``slots`` ``[T]``: its placeholder
    positions (one placeholder); ``target`` ``[T, D]``: the prompt with the super-category word (``word_length``
    tokens) in the placeholder's place. Positions before the placeholder are equal anyway (CLIP's attention is
    causal); after it, every position to the end is compared, padding included, because the U-Net reads them all and
    they are where a token that swallows the prompt shows: the words' meaning no longer reaches them.
    """
    nothing = states.sum(dim=(1, 2)) * 0.0 if per_row else states.sum() * 0.0
    marked = slots.nonzero().flatten()
    if marked.numel() == 0:  # the placeholder fell past the token limit: nothing to compare
        return nothing
    after, word_end = int(marked[-1]) + 1, int(marked[0]) + word_length
    count = min(states.shape[1] - after, target.shape[0] - word_end)
    if count <= 0:
        return nothing
    ours = states[:, after : after + count].float()
    theirs = target[word_end : word_end + count].float().expand_as(ours)
    cosine = F.cosine_similarity(ours, theirs, dim=-1)
    return 1.0 - (cosine.mean(dim=-1) if per_row else cosine.mean())


def context_dial_weights(truncations: torch.Tensor, width: int, power: float) -> torch.Tensor:
    """``(1 - truncation / width) ** power``: the context loss weight of a row truncated at ``truncation``.

    Full weight at truncation 0 (the most editable end of the dial), none at full truncation.

    >>> context_dial_weights(torch.tensor([0, 32, 64, 128]), 128, 1.0).tolist()
    [1.0, 0.75, 0.5, 0.0]
    """
    return (1.0 - truncations.float() / width).clamp(min=0.0) ** power


# -- files ---------------------------------------------------------------------------------------------------------


def neti_adapter(mapper: NetiMapper, *, base_model: Any = None, config: NetiConfig | None = None) -> AdapterFile:
    """The mapper as a ``neti`` adapter file value: weights, ``w`` and the spec in the header (no pickles)."""
    spec = mapper.spec
    tensors = {TENSOR_W: mapper.w.detach().cpu().contiguous().clone()}
    for key, value in mapper.state_dict().items():
        if key not in ("w", "target_norms"):
            tensors[TENSOR_PREFIX + key] = value.detach().float().cpu().contiguous().clone()
    metadata = AdapterMetadata(
        kind="neti",
        family=spec.family,
        base_model=getattr(base_model, "name", "") or "",
        base_fingerprint=getattr(base_model, "fingerprint", "") if base_model is not None else "",
        placeholder_tokens=[spec.placeholder_token],
        config=config_to_dict(config) if config is not None else {},
        extra={KEY_MAPPER: spec.to_json()},
    )
    return AdapterFile(tensors, metadata)


def mapper_from_adapter(adapter: AdapterFile, source: str = "the adapter") -> NetiMapper:
    """Rebuild the mapper of a ``neti`` adapter file (eval mode, float32, CPU)."""
    if KEY_MAPPER not in adapter.metadata.extra or TENSOR_W not in adapter.tensors:
        raise CorruptFileError(f"{source} is not a NeTI file: expected {KEY_MAPPER} and {TENSOR_W}, found neither")
    spec = MapperSpec.from_json(adapter.metadata.extra[KEY_MAPPER], source)
    mapper = NetiMapper(spec, adapter.tensors[TENSOR_W])
    state = {
        key[len(TENSOR_PREFIX) :]: value for key, value in adapter.tensors.items() if key.startswith(TENSOR_PREFIX)
    }
    state.update({"w": mapper.w, "target_norms": mapper.target_norms})
    try:
        mapper.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CorruptFileError(f"{source}: the mapper weights do not match its description ({first})") from None
    return mapper.eval()


# -- training ------------------------------------------------------------------------------------------------------


class _LayerStates:
    """A conditioning state for the training U-Net: layer ``l`` reads ``plain[:, l]`` / ``bypassed[:, l]``."""

    def __init__(self) -> None:
        self.plain: torch.Tensor | None = None
        self.bypassed: torch.Tensor | None = None

    def key_value_states(self, call: Any) -> Any:
        from pipelines.kinds.conditioning import KeyValueStates

        if self.plain is None or self.bypassed is None:
            return None
        return KeyValueStates(self.plain[:, call.layer_index], self.bypassed[:, call.layer_index])

    def extra_tokens(self, call: Any) -> None:
        return None

    def region_states(self, call: Any) -> None:
        return None


def _row_truncations(
    config: NetiConfig, prompts: int, contexts: int, n_layers: int, width: int, generator: torch.Generator
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Fixed truncations for a step's mapper rows (``prompts x n_layers``, prompt-major; -1 = the mapper's own
    nested-dropout draw), or None when every row takes that draw; and the truncations of the last ``contexts``
    prompts' rows (``contexts x n_layers``; all ``width`` when untruncated).

    ``nested_dropout_per_prompt``: with probability ``nested_dropout`` each prompt draws one truncation for all its
    layers. ``context_dial``: the context rows always carry drawn truncations (one per row, or one per prompt with
    ``nested_dropout_per_prompt``), which their loss weights refer to. Drawn from ``generator``, so a resumed run
    draws the same.
    """
    rows = torch.full((prompts, n_layers), -1, dtype=torch.long)
    per_prompt = config.nested_dropout_per_prompt
    if _draws_own_truncations(config) and float(torch.rand((), generator=generator)) < config.nested_dropout:
        shape = (prompts, 1) if per_prompt else (prompts, n_layers)
        rows[:] = draw_truncations(shape, width, config.nested_dropout_sampling, generator)
    if contexts and config.context_dial > 0:
        shape = (contexts, 1) if per_prompt else (contexts, n_layers)
        rows[prompts - contexts :] = draw_truncations(shape, width, config.nested_dropout_sampling, generator)
    context_rows = rows[prompts - contexts :].flatten()
    context_rows = torch.where(context_rows >= 0, context_rows, width)
    if not _draws_own_truncations(config) and config.context_dial <= 0:
        return None, context_rows
    return rows.flatten(), context_rows


def _draws_own_truncations(config: NetiConfig) -> bool:
    """Whether the loop draws nested dropout's truncations itself (`_row_truncations`) rather than the mapper's
    uniform per-row draw."""
    return config.nested_dropout_per_prompt or config.nested_dropout_sampling != "uniform"


def draw_truncations(
    shape: tuple[int, ...], width: int, sampling: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Nested-dropout truncations in ``[0, width)``: uniform, or ``log`` (``floor((width + 1) ** u) - 1`` for ``u``
    uniform in [0, 1): truncation + 1 is log-uniform, so each doubling of it is drawn about as often).

    >>> draw_truncations((4096,), 128, "log", torch.Generator().manual_seed(0)).lt(8).float().mean().item() > 0.4
    True
    """
    if sampling == "uniform":
        return torch.randint(0, width, shape, generator=generator)
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    return (torch.floor((width + 1.0) ** u) - 1).long().clamp(0, width - 1)


def _load_latents(pipeline: Any, images: Path, resolution: int, fingerprint: str) -> torch.Tensor:
    from trainers.core.caching import TensorCache, cache_latents
    from trainers.core.data import ImageFolderDataset

    dataset = ImageFolderDataset(images, resolution=resolution, buckets=False)
    if len(dataset) == 0:
        raise InvalidInputError(f"expected training images in {images}, found none")
    pixels = [dataset.pixels_uint8(i) for i in range(len(dataset))]
    with torch.no_grad():
        latents = cache_latents(pipeline.vae, pixels, cache=TensorCache(), model_key=fingerprint)
    return torch.stack(latents)


def build_mapper(config: NetiConfig, pipeline: Any, family: Any, n_layers: int) -> NetiMapper:
    """A fresh mapper for ``pipeline``: ``w`` from ``config.seed``, output norms from the super-category word."""
    placeholder = validate_placeholder_token(config.placeholder_token)
    encoders, tokenizers = family.text_encoders(pipeline), family.tokenizers(pipeline)
    words = [
        init_vector(tokenizer, encoder, config.super_category)
        for tokenizer, encoder in zip(tokenizers, encoders, strict=True)
    ]
    norms = tuple(float(word.norm()) * config.norm_scale for word in words)
    spec = MapperSpec(
        n_layers=n_layers,
        widths=tuple(int(width) for width in family.embedding_widths(pipeline)),
        target_norms=norms,
        placeholder_token=placeholder,
        super_category=config.super_category,
        family=family.name,
        fourier_features=config.fourier_features,
        sigma_t=config.sigma_t,
        sigma_l=config.sigma_l,
        time_anchors=config.time_anchors,
        num_train_timesteps=int(pipeline.scheduler.config.num_train_timesteps),
        hidden_width=config.hidden_width,
        bypass_alpha=config.bypass_alpha,
        num_vectors=config.num_vectors,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        mapper = NetiMapper(spec, fourier_matrix(spec, torch.Generator().manual_seed(config.seed)))
    if config.init_from_super_category:
        with torch.no_grad():
            start = 0
            for word in words:
                rows = slice(start, start + word.numel() * config.num_vectors)
                mapper.output_layer.bias[rows] = word.repeat(config.num_vectors)
                mapper.output_layer.weight[rows] *= config.init_weight_scale
                start = rows.stop
    return mapper


def train_neti(
    config: NetiConfig,
    base_model: Any,
    images: str | Path,
    *,
    run_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    callbacks: Sequence[Callable[[ProgressEvent], None]] = (),
    resume: bool = False,
) -> AdapterFile:
    """Train a NeTI mapper on the images of a folder and return it as a ``neti`` adapter file value.

    ``base_model`` is a `studio.base_models.BaseModel` (its pipeline is used frozen; the conditioning processors are
    removed again afterwards). With ``run_dir`` checkpoints are written every ``checkpoint_every`` steps, and with
    ``resume`` training continues from the newest one.

    >>> adapter = train_neti(cfg, load_base_model("tiny"), "photos/", run_dir="runs/toy")  # doctest: +SKIP
    """
    from diffusers import DDPMScheduler

    from pipelines.kinds.conditioning import install_conditioning
    from trainers.core.checkpoint import latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
    from trainers.core.conditioning import POOLED_EMBEDS, PROMPT_EMBEDS, needs_added_conditioning, unet_inputs
    from trainers.core.conditioning import encode_prompts as pipeline_prompts
    from trainers.core.noise import diffusion_loss, sample_noise, sample_timesteps, training_target
    from trainers.core.progress import ProgressReporter
    from trainers.core.runtime import seed_everything
    from trainers.core.templates import CONTEXT_TEMPLATES, template_prompt, templates_for

    # 1. Frozen base model on the device; the seam's processors give each cross-attention layer its own states.
    device = torch.device(device)
    pipeline, family = base_model.pipeline, base_model.family
    pipeline.to(device)
    for module in (pipeline.unet, pipeline.vae, *family.text_encoders(pipeline)):
        module.requires_grad_(False)
        module.eval()
    layer_names = family.cross_attention_layers(pipeline.unet)
    seed_everything(config.seed)
    mapper = build_mapper(config, pipeline, family, len(layer_names)).to(device).train()
    text = ConditioningEncoder(
        pipeline, family, mapper.spec.placeholder_token, config.super_category, config.bypass_alpha, config.num_vectors
    )
    resolution = config.resolution or int(pipeline.unet.config.sample_size) * int(pipeline.vae_scale_factor)
    latents = _load_latents(pipeline, Path(images), resolution, base_model.fingerprint).to(device)

    # 2. Optimizer: AdamW, lr scaled by the effective batch, constant.
    effective_batch = config.batch_size * config.gradient_accumulation_steps
    lr = config.lr * effective_batch if config.scale_lr else config.lr
    optimizer = torch.optim.AdamW(mapper.parameters(), lr=lr, weight_decay=config.weight_decay)
    if config.init_from_super_category and config.freeze_super_category:
        # No gradient for the bias rows that hold the word (Adam then leaves them; decay alone moves them ~lr*wd/step).
        frozen = torch.zeros_like(mapper.output_layer.bias, dtype=torch.bool)
        frozen[: mapper.spec.num_vectors * sum(mapper.spec.widths)] = True
        mapper.output_layer.bias.register_hook(lambda grad: grad.masked_fill(frozen, 0.0))
    start_step = 0
    checkpoint = latest_checkpoint(run_dir) if (resume and run_dir is not None) else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        mapper.load_state_dict({k[len(TENSOR_PREFIX) :]: v for k, v in state["weights"].items()})
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"])
        start_step = int(state["step"])
        logger.info("resuming NeTI training from %s (step %d)", checkpoint, start_step)

    # 3. The loop: one batched text-encoder call per step for all groups x n_layers conditionings (groups = B unless
    # conditioning_groups shares them among the batch's images).
    # Noise comes from a DDPM scheduler built from the pipeline's config, as in the other trainers. The pipeline's
    # own scheduler is an inference scheduler: DPMSolverMultistep's add_noise looks the timestep up in its current
    # grid (reversed, or the last entry for a timestep off the grid), so the latents would carry another timestep's
    # noise level than the one the U-Net and the mapper are given.
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    templates = templates_for(config.learnable_property)
    n_layers = len(layer_names)
    layers = torch.arange(n_layers, device=device, dtype=torch.float32)
    groups = config.conditioning_groups or config.batch_size
    group_of = torch.arange(config.batch_size, device=device) * groups // config.batch_size  # image -> its group
    states = _LayerStates()
    context_targets: dict[str, torch.Tensor] = {}
    seam = install_conditioning(pipeline.unet, layer_names)
    reporter = ProgressReporter(config.steps, callbacks, start_step=start_step)
    started = time.monotonic()
    step = start_step
    try:
        with seam.context.activate([("neti", states)]):  # type: ignore[list-item]
            while step < config.steps:
                total = 0.0
                # Data, noise and templates drawn from the step number: a resumed run sees what it would have seen.
                generator = torch.Generator("cpu").manual_seed(config.seed * 1_000_003 + step)
                rng = random.Random(f"neti:{config.seed}:{step}")
                for _ in range(config.gradient_accumulation_steps):
                    picks = torch.randint(0, latents.shape[0], (config.batch_size,), generator=generator)
                    clean = latents[picks.to(device)]
                    noise = sample_noise(clean, generator)
                    # Each group of images shares one timestep and prompt: the text encoder sees groups x layers rows.
                    group_timesteps = sample_timesteps(scheduler, groups, generator, device=device)
                    timesteps = group_timesteps[group_of]
                    noisy = scheduler.add_noise(clean, noise, timesteps)
                    prompts = [template_prompt(templates, mapper.spec.placeholder_token, rng) for _ in range(groups)]
                    # With the context regularisation, one new-context prompt joins the batched call (at the first
                    # group's timestep, every layer): n_layers more rows, no extra call with gradients. Its target,
                    # the template with the super-category word, is encoded once per template.
                    contexts = [rng.choice(CONTEXT_TEMPLATES)] if config.context_weight > 0 else []
                    row_timesteps = torch.cat([group_timesteps, group_timesteps[: len(contexts)]])
                    # With context_dial the context rows carry their own truncations (drawn here, so a resumed run
                    # draws the same) and the loss weight of each row follows its truncation.
                    truncations, context_truncations = _row_truncations(
                        config, groups + len(contexts), len(contexts), n_layers, mapper.spec.hidden_width, generator
                    )
                    dial = None
                    if contexts and config.context_dial > 0:
                        dial = context_dial_weights(context_truncations, mapper.spec.hidden_width, config.context_dial)
                    outputs = mapper(
                        row_timesteps.float().repeat_interleave(n_layers),
                        layers.repeat(len(row_timesteps)),
                        dropout=0.0 if _draws_own_truncations(config) else config.nested_dropout,
                        row_truncations=None if truncations is None else truncations.to(device),
                    )
                    placed = [context.format(mapper.spec.placeholder_token) for context in contexts]
                    tokenized = text.tokenize(prompts + placed)
                    plain, bypassed = text.encode(tokenized, outputs, n_layers)
                    context_loss = None
                    if contexts:
                        if contexts[0] not in context_targets:
                            with torch.no_grad():
                                word = contexts[0].format(config.super_category)
                                context_targets[contexts[0]] = pipeline_prompts(pipeline, [word], device)[PROMPT_EMBEDS]
                        rows = groups * n_layers
                        context_loss = context_preservation_loss(
                            plain[rows:],
                            tokenized.slots[0][groups],
                            context_targets[contexts[0]][0],
                            text.word_lengths[0],
                            per_row=dial is not None,
                        )
                        plain, bypassed = plain[:rows], bypassed[:rows]
                    states.plain = plain.unflatten(0, (groups, n_layers))[group_of]
                    states.bypassed = bypassed.unflatten(0, (groups, n_layers))[group_of]
                    # The processors replace every cross-attention's states; the U-Net's own argument only sets shapes.
                    conditioning = {PROMPT_EMBEDS: states.plain[:, 0]}
                    if needs_added_conditioning(pipeline.unet):
                        # SDXL's pooled embedding and time ids: the prompt as the pipeline encodes it (placeholder
                        # as plain text). The seam conditions cross-attention only, so generation sees the same.
                        with torch.no_grad():
                            pooled = pipeline_prompts(pipeline, prompts, device)[POOLED_EMBEDS]
                            conditioning[POOLED_EMBEDS] = pooled[group_of]
                    kwargs = unet_inputs(pipeline.unet, conditioning, height=resolution, width=resolution)
                    pred = pipeline.unet(noisy, timesteps, **kwargs).sample
                    loss = diffusion_loss(pred, training_target(scheduler, clean, noise, timesteps))
                    if context_loss is not None:
                        penalty = torch.relu(context_loss - config.context_margin)
                        penalty = penalty.mean() if dial is None else (dial.to(device) * penalty).mean()
                        loss = loss + config.context_weight * penalty
                    (loss / config.gradient_accumulation_steps).backward()
                    total += float(loss.detach()) / config.gradient_accumulation_steps
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                out_of_time = config.max_seconds > 0 and time.monotonic() - started >= config.max_seconds
                if run_dir is not None and (step % config.checkpoint_every == 0 or step == config.steps or out_of_time):
                    weights = {TENSOR_PREFIX + k: v for k, v in mapper.state_dict().items()}
                    save_checkpoint(
                        run_dir,
                        step,
                        {"weights": weights, "optimizer": optimizer.state_dict(), "config": config_to_dict(config)},
                        keep=config.keep_checkpoints,
                    )
                reporter.step(step, loss=total, lr=lr)
                if out_of_time:
                    logger.info("NeTI training stopped at step %d after %.0f s (max_seconds)", step, config.max_seconds)
                    break
    finally:
        states.plain = states.bypassed = None
        seam.remove()
        reporter.close()
    return neti_adapter(mapper.eval(), base_model=base_model, config=config)


def train_from_cli(args: argparse.Namespace, home: Any) -> int:
    """``studio train neti --images DIR --token "<my-toy>" --super-category toy --name NAME [...]``."""
    from studio.base_models import load_base_model
    from studio.library import AdapterLibrary
    from trainers.core.progress import TqdmProgress

    overrides = list(getattr(args, "set", None) or [])
    name = getattr(args, "name", None)
    run_dir: Path
    if getattr(args, "resume", None):
        run_dir = Path(args.resume) if Path(args.resume).is_dir() else home.runs / args.resume
        if not run_dir.is_dir():
            raise InvalidInputError(f"expected a run folder to resume, found nothing at {run_dir}")
        saved = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
        name = name or saved.get("name")
        values = saved.get("config", {})
        images = args.images or saved.get("images")
    else:
        run_dir = home.runs / f"neti-{name}"
        values = {}
        images = args.images
    if getattr(args, "token", None):
        overrides.append(f"placeholder_token={args.token}")
    if getattr(args, "super_category", None):
        overrides.append(f"super_category={args.super_category}")
    config = load_config(
        NetiConfig,
        recipe=recipe_for(BASE_RECIPES, args.base),
        toml_path=getattr(args, "config", None),
        values=values,
        overrides=overrides,
    )
    if not images:
        raise InvalidInputError("expected --images DIR with the concept's pictures, found none")
    if not config.placeholder_token or not config.super_category:
        raise InvalidInputError(
            f"expected --token and --super-category for NeTI, found token={config.placeholder_token!r} and "
            f"super-category={config.super_category!r}"
        )
    validate_placeholder_token(config.placeholder_token)
    if not name:
        raise InvalidInputError("expected --name NAME for the trained adapter, found none")
    expect_image_folder(images)
    home.ensure()
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "images": str(images), "base": args.base, "config": config_to_dict(config)}
    (run_dir / "run.json").write_text(json.dumps(record, indent=2))
    base = load_base_model(args.base or "tiny")
    progress = TqdmProgress(description=f"neti {name}")
    adapter = train_neti(config, base, images, run_dir=run_dir, callbacks=[progress], resume=bool(args.resume))
    info = AdapterLibrary(home).add(adapter, name)
    print(f"saved NeTI adapter '{info.name}' ({config.placeholder_token}) to the library")
    return 0
