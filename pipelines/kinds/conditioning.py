"""The conditioning seam: per-layer, per-timestep text conditioning and extra cross-attention tokens.

Some adapter kinds do not change weights or tokens but the cross-attention itself:

- NeTI gives every (timestep, cross-attention layer) its own text conditioning, and feeds the keys from the plain
  encoder states but the values from "bypassed" states (`KeyValueStates`).
- Preference adapters add tokens (a user embedding) that the U-Net attends to through a second, decoupled key/value
  projection whose output is added, scaled, to the text attention output, as IP-Adapter does (`ExtraTokens`).

How it fits together:

1. `install_conditioning` puts one `ConditionedAttnProcessor` on every cross-attention (``attn2``) layer of the U-Net,
   once, when the service starts. Each processor is built with its layer index in U-Net order (down, mid, up; from
   ``family.cross_attention_layers``), so nothing depends on call order or call counters. It wraps the processor that
   was there before and hands every call to it unchanged while no conditioning is active: a request without such
   adapters gives bit-for-bit the images of the stock pipeline.
2. A U-Net forward pre-hook records the timestep of each U-Net call in the shared `ConditioningContext`. A pre-hook
   rather than ``callback_on_step_end``: the callback runs *after* a step, so the first step's timestep would be
   unknown, and schedulers that call the U-Net several times per step (Heun, DPM2) would be misread. The hook sees
   exactly the timestep each U-Net call gets, for any scheduler and any number of steps.
3. Per request the service asks each conditioning adapter's kind to `ConditioningKind.prepare` a `ConditioningState`
   and activates it on the context for the duration of the pipeline call; it is cleared afterwards even on errors.
   Processors then ask the state, per call, for replacement key/value states and for extra tokens.

Classifier-free guidance is batched: with guidance > 1 the pipeline concatenates ``[negative; positive]`` along the
batch, so ``LayerCall.encoder_hidden_states`` has the negative rows first. A kind that conditions only the positive
prompt replaces the second half.

Kinds register by the adapter kind name written in their files: ``register_kind("neti", factory)``, where the
factory builds a `ConditioningKind` from a parsed `AdapterFile` and the service's base model once per cached adapter.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from pipelines.requests import AdapterRef
from studio.adapter_files import AdapterFile
from studio.errors import InvalidInputError

# -- what a processor asks, and what a state answers --------------------------------------------------------------


@dataclass(frozen=True)
class LayerCall:
    """One cross-attention call as a conditioning state sees it."""

    layer_index: int
    """Index of the layer in U-Net order (0 = first down-block cross-attention)."""
    layer_name: str
    """The processor name in ``unet.attn_processors`` (``...attn2.processor``)."""
    timestep: torch.Tensor | None
    """The timestep this U-Net call received (0-d or one value per batch row); ``None`` outside a U-Net call."""
    encoder_hidden_states: torch.Tensor
    """The states the pipeline passes, ``[batch, tokens, width]``; with guidance the negative rows come first."""


@dataclass(frozen=True)
class KeyValueStates:
    """Encoder states for the keys and (separately) for the values of one cross-attention call."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class ExtraTokens:
    """A decoupled cross-attention branch: queries attend to ``tokens`` through ``to_k``/``to_v``.

    The branch's attention output is multiplied by ``scale`` and added to the text attention output before the
    output projection. ``tokens`` is ``[1 or batch, n, width]``.

    With ``joint`` the branch's softmax also runs over the text keys, whose values count as zero: a query that
    attends to the prompt gives the extra tokens little weight, so the branch can act on some positions (an
    object's colour) and leave the rest, instead of adding a full convex mix of its values everywhere.

    With ``groups`` above 1 the tokens are that many equal groups (one attribute's phrase each), each attended on its
    own softmax and the outputs summed. An attribute then acts as it does alone, not at the share of the attention
    that the other groups leave it, and a zeroed group (an attribute the prompt's words decide) adds exactly
    nothing: with bias-free projections its keys and values are zero.
    """

    tokens: torch.Tensor
    to_k: nn.Module
    to_v: nn.Module
    scale: float = 1.0
    joint: bool = False
    groups: int = 1

    def __post_init__(self) -> None:
        if self.groups < 1 or self.tokens.shape[-2] % self.groups:
            raise ValueError(f"expected {self.groups} equal token groups, found {self.tokens.shape[-2]} tokens")


@dataclass(frozen=True)
class RegionStates:
    """Regional prompting: each region's encoder states and where in the image it applies.

    ``states[i]`` is ``[1, tokens, width]`` (the positive prompt of region ``i``); ``masks(length)`` gives
    ``[regions, length, 1]`` weights over the query positions of a call whose flattened feature map has ``length``
    positions, summing to 1 at every position. Negative rows keep the pipeline's negative-prompt states.
    """

    states: Sequence[torch.Tensor]
    masks: Callable[[int], torch.Tensor]


class ConditioningState:
    """What one request's conditioning adapter supplies to the processors. Override one or more methods.

    Both are called for every cross-attention call of every U-Net call; return ``None`` to leave that call alone.
    """

    def key_value_states(self, call: LayerCall) -> KeyValueStates | None:
        """Replacement encoder states for this call's keys and values, or ``None`` for the pipeline's states."""
        return None

    def extra_tokens(self, call: LayerCall) -> ExtraTokens | None:
        """An extra token branch for this call, or ``None``."""
        return None

    def region_states(self, call: LayerCall) -> RegionStates | None:
        """Per-region encoder states for this call (regional prompting), or ``None``."""
        return None


@dataclass(frozen=True)
class ConditioningRequest:
    """What a kind gets to prepare one request: the adapter reference and the request's settings."""

    ref: AdapterRef
    prompt: str
    """The prompt after placeholder rewriting (what the pipeline encodes)."""
    negative_prompt: str
    pipeline: Any
    family: Any
    """The base model's `studio.families.ModelFamily`."""
    layer_names: tuple[str, ...]
    """Cross-attention processor names in U-Net order; ``layer_names[i]`` has layer index ``i``."""
    device: torch.device
    dtype: torch.dtype
    steps: int
    guidance: float
    classifier_free_guidance: bool
    """Whether the pipeline batches ``[negative; positive]`` (guidance > 1)."""


class ConditioningKind(Protocol):
    """An adapter of a conditioning kind, built once per cached adapter by its registered factory.

    A kind may also define ``rewrite_prompt(prompt: str, ref: AdapterRef) -> str``: words it writes into the prompt
    the pipeline encodes (each region's part too). ``prepare`` still sees the prompt as the user wrote it."""

    def prepare(self, request: ConditioningRequest) -> ConditioningState:
        """Build this request's state (for example: run the mapper for every timestep and layer at once)."""
        ...


KindFactory = Callable[[AdapterFile, Any], ConditioningKind]
"""``factory(adapter_file, base_model) -> ConditioningKind``."""

_KINDS: dict[str, KindFactory] = {}
_KINDS_LOCK = threading.Lock()


def register_kind(kind: str, factory: KindFactory) -> None:
    """Make adapters whose files say ``studio.kind = kind`` usable in requests through ``factory``.

    Registering a kind again replaces its factory (tests register fakes).

    >>> register_kind("example", lambda adapter, base_model: None)
    >>> "example" in registered_kinds()
    True
    >>> unregister_kind("example")
    """
    with _KINDS_LOCK:
        _KINDS[kind] = factory


def unregister_kind(kind: str) -> None:
    """Forget a registered kind (no error when it is unknown)."""
    with _KINDS_LOCK:
        _KINDS.pop(kind, None)


def registered_kinds() -> dict[str, KindFactory]:
    """The registered conditioning kinds by name."""
    with _KINDS_LOCK:
        return dict(_KINDS)


def kind_factory(kind: str) -> KindFactory | None:
    """The factory registered for ``kind``, or ``None``."""
    with _KINDS_LOCK:
        return _KINDS.get(kind)


# -- the per-service context --------------------------------------------------------------------------------------


class _CombinedState(ConditioningState):
    """Several adapters' states in one request: one provider of key/value or region states at most (`activate`
    checks), extra token branches summed."""

    def __init__(self, states: Sequence[ConditioningState]) -> None:
        self.states = list(states)

    def key_value_states(self, call: LayerCall) -> KeyValueStates | None:
        return next((kv for state in self.states if (kv := state.key_value_states(call)) is not None), None)

    def extra_tokens_all(self, call: LayerCall) -> list[ExtraTokens]:
        return [extra for state in self.states if (extra := state.extra_tokens(call)) is not None]

    def region_states(self, call: LayerCall) -> RegionStates | None:
        return next((regions for state in self.states if (regions := state.region_states(call)) is not None), None)


def _overrides(state: ConditioningState, method: str) -> bool:
    return getattr(type(state), method) is not getattr(ConditioningState, method)


@dataclass
class ConditioningContext:
    """Shared by the processors of one U-Net: the active request's state and the current timestep.

    The service serialises requests on its device, so one context per U-Net is enough; `activate` makes sure a
    state never outlives its request.
    """

    state: _CombinedState | None = None
    timestep: torch.Tensor | None = None
    calls: int = field(default=0)
    """Number of conditioned attention calls served (for tests and benchmarks)."""

    @contextlib.contextmanager
    def activate(self, states: Sequence[tuple[str, ConditioningState]]) -> Iterator[None]:
        """Make ``states`` (``(adapter name, state)`` pairs) active for the duration of the block."""
        providers = [
            name
            for name, state in states
            if _overrides(state, "key_value_states") or _overrides(state, "region_states")
        ]
        if len(providers) > 1:
            raise InvalidInputError(
                f"expected at most one adapter (or regions) that replaces cross-attention states per request, found "
                f"{len(providers)}: {', '.join(providers)}"
            )
        self.state = _CombinedState([state for _, state in states]) if states else None
        self.timestep = None
        try:
            yield
        finally:
            self.state = None
            self.timestep = None


class ConditionedAttnProcessor:
    """A cross-attention processor that knows its layer and asks the active conditioning state, if any.

    With no active state it calls the wrapped processor (the stock ``AttnProcessor2_0``) with the same arguments, so
    results are bit-identical to the stock pipeline.
    """

    def __init__(self, layer_index: int, layer_name: str, context: ConditioningContext, base: Any) -> None:
        self.layer_index = layer_index
        self.layer_name = layer_name
        self.context = context
        self.base = base

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        state = self.context.state
        if state is None or encoder_hidden_states is None:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        call = LayerCall(self.layer_index, self.layer_name, self.context.timestep, encoder_hidden_states)
        extras = state.extra_tokens_all(call)
        regions = state.region_states(call)
        if regions is not None:
            self.context.calls += 1
            return _attend_regions(attn, hidden_states, encoder_hidden_states, regions, extras, attention_mask, temb)
        states = state.key_value_states(call)
        if states is None and not extras:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        self.context.calls += 1
        if states is None:
            states = KeyValueStates(encoder_hidden_states, encoder_hidden_states)
        return _attend(attn, hidden_states, states, extras, attention_mask, temb)


def _heads(tensor: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    return tensor.view(batch, -1, heads, tensor.shape[-1] // heads).transpose(1, 2)


def _attend(
    attn: Any,
    hidden_states: torch.Tensor,
    states: KeyValueStates,
    extras: Sequence[ExtraTokens],
    attention_mask: torch.Tensor | None,
    temb: torch.Tensor | None,
) -> torch.Tensor:
    """Scaled-dot-product cross-attention with separate key/value sources and extra token branches.

    Follows the steps of diffusers' ``AttnProcessor2_0`` (the tests check that with the pipeline's own states and
    no extras the result is bit-identical to it); the difference is only where keys and values come from.
    """
    # 1. Input layout and norms, as the stock processor does them.
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
    batch = hidden_states.shape[0]
    keys_in, values_in = states.keys, states.values
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, keys_in.shape[1], batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        keys_in = attn.norm_encoder_hidden_states(keys_in)
        values_in = attn.norm_encoder_hidden_states(values_in)

    # 2. Projections: keys and values from their own sources.
    query = _heads(attn.to_q(hidden_states), batch, attn.heads)
    key = _heads(attn.to_k(keys_in), batch, attn.heads)
    value = _heads(attn.to_v(values_in), batch, attn.heads)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)

    # 3. Attention, plus each decoupled branch over its own tokens (same queries), scaled and added.
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
    for extra in extras:
        tokens = extra.tokens.to(device=hidden_states.device, dtype=hidden_states.dtype)
        tokens = tokens.expand(batch, -1, -1) if tokens.shape[0] == 1 else tokens
        extra_keys = _heads(extra.to_k(tokens), batch, attn.heads).chunk(extra.groups, dim=2)
        extra_values = _heads(extra.to_v(tokens), batch, attn.heads).chunk(extra.groups, dim=2)
        for extra_key, extra_value in zip(extra_keys, extra_values, strict=True):
            if extra.joint:
                extra_key = torch.cat([key, extra_key], dim=2)
                extra_value = torch.cat([torch.zeros_like(value), extra_value], dim=2)
            out = out + extra.scale * F.scaled_dot_product_attention(query, extra_key, extra_value)
    out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(query.dtype)

    # 4. Output projection and layout back.
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch, channels, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _attend_regions(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    regions: RegionStates,
    extras: Sequence[ExtraTokens],
    attention_mask: torch.Tensor | None,
    temb: torch.Tensor | None,
) -> torch.Tensor:
    """Cross-attention once per region, blended by the region masks over the query positions.

    Blending the finished outputs is the same as blending the attention results: the output projection is affine and
    the masks sum to 1 at every position. With guidance the negative rows (first half) read the pipeline's negative
    states in every region, so their output is the stock one.
    """
    batch = hidden_states.shape[0]
    length = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
    negative = batch // 2 if encoder_hidden_states.shape[0] == batch and batch % 2 == 0 else 0
    masks = regions.masks(length).to(hidden_states.device, hidden_states.dtype)
    blended: torch.Tensor | None = None
    for index, region in enumerate(regions.states):
        region = region.to(encoder_hidden_states.device, encoder_hidden_states.dtype)
        states = torch.cat([encoder_hidden_states[:negative], region.expand(batch - negative, -1, -1)])
        out = _attend(attn, hidden_states, KeyValueStates(states, states), extras, attention_mask, temb)
        weight = masks[index] if out.ndim == 3 else masks[index].reshape(1, 1, *hidden_states.shape[2:])
        if blended is None:
            blended = out.clone()
            blended[negative:] = out[negative:] * weight
        else:
            blended[negative:] += out[negative:] * weight
    assert blended is not None  # RegionStates always holds two or more regions
    return blended


def region_masks(layout: str, count: int, height: int, width: int) -> Callable[[int], torch.Tensor]:
    """``masks(length)`` for ``count`` equal stripes ("columns": side by side, "rows": stacked) of a latent of
    ``height`` x ``width``: a U-Net level with ``length`` positions has the latent's aspect ratio, downsampled."""

    def masks(length: int) -> torch.Tensor:
        scale = (height * width / length) ** 0.5
        rows, cols = max(1, round(height / scale)), max(1, round(width / scale))
        if rows * cols != length:
            raise ValueError(f"a feature map of {length} positions does not fit a {height}x{width} latent")
        along = cols if layout == "columns" else rows
        index = (torch.arange(along) * count) // along  # the region of each column (or row)
        grid = index.view(1, cols) if layout == "columns" else index.view(rows, 1)
        grid = grid.expand(rows, cols).reshape(-1)
        return torch.stack([(grid == r).float() for r in range(count)]).unsqueeze(-1)

    return masks


# -- installation -------------------------------------------------------------------------------------------------


@dataclass
class ConditioningSeam:
    """The installed processors and timestep hook of one U-Net; `remove` restores the previous processors."""

    unet: Any
    context: ConditioningContext
    processors: list[ConditionedAttnProcessor]
    _hook: Any
    _previous: dict[str, Any]

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Cross-attention processor names in layer-index order."""
        return tuple(processor.layer_name for processor in self.processors)

    def is_installed(self) -> bool:
        """Whether every cross-attention layer still has its conditioned processor (nothing replaced them)."""
        current = self.unet.attn_processors
        return all(current.get(processor.layer_name) is processor for processor in self.processors)

    def reinstall(self) -> None:
        """Put the conditioned processors back (after something replaced them), keeping their layer indices."""
        processors = dict(self.unet.attn_processors)
        processors.update({processor.layer_name: processor for processor in self.processors})
        self.unet.set_attn_processor(processors)

    def remove(self) -> None:
        """Restore the processors found at installation and remove the timestep hook."""
        processors = dict(self.unet.attn_processors)
        processors.update(self._previous)
        self.unet.set_attn_processor(processors)
        self._hook.remove()


def install_conditioning(unet: Any, layer_names: Sequence[str]) -> ConditioningSeam:
    """Install a `ConditionedAttnProcessor` on each named cross-attention layer, in order, and the timestep hook.

    ``layer_names`` come from ``family.cross_attention_layers(unet)``; the position of a name is its layer index.
    """
    context = ConditioningContext()
    current = dict(unet.attn_processors)
    missing = [name for name in layer_names if name not in current]
    if missing:
        raise ValueError(f"the U-Net has no attention processors named {missing}")
    previous = {name: current[name] for name in layer_names}
    processors = [
        ConditionedAttnProcessor(index, name, context, previous[name]) for index, name in enumerate(layer_names)
    ]
    current.update({processor.layer_name: processor for processor in processors})
    unet.set_attn_processor(current)

    def record_timestep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        context.timestep = None if timestep is None else torch.as_tensor(timestep)

    hook = unet.register_forward_pre_hook(record_timestep, with_kwargs=True)
    return ConditioningSeam(unet=unet, context=context, processors=processors, _hook=hook, _previous=previous)
