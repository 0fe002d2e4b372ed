"""The ``neti`` adapter kind: a NeTI mapper conditioning every (timestep, cross-attention layer) of a generation.

How a request with a NeTI concept runs (see `trainers.neti` for the mapper itself):

1. `NetiKind.prepare` reads the request's options (``name:truncation=64,encode_steps=3``; defaults: the full 128
   and `DEFAULT_ENCODE_STEPS`) and returns a `NetiState` for the prompt, unless the prompt does not mention the
   placeholder (then nothing changes). ``encode_steps``: the text encoder runs exactly at this many timesteps of the
   grid (its ends included); the others blend them; 0 = every timestep. Those timesteps are called anchors below (not
   the mapper's own ``MapperSpec.time_anchors``, the timesteps its first layer is initialised at).
2. On the first cross-attention call of the first U-Net call, the scheduler has set its timestep grid. The state
   picks ``encode_steps`` anchor timesteps of that grid (spread evenly over it by index, both ends included; all of
   them when ``encode_steps`` is 0 or at least the grid's length), evaluates the mapper for every ``(anchor, layer)``
   in ONE batched call and runs each text encoder ONCE on that batch (anchors x layers prompts).
3. Each `ConditionedAttnProcessor` then asks for its layer's states at the current timestep: keys from the plain states,
   values from the bypassed states, in the positive rows only. At an anchor these are the exact encodings; at a timestep
   between anchors they are an affine blend of all anchor rows' states (any anchor and layer; weights summing to 1, see
   `NetiState.blend_weights`). A timestep outside the anchors' range (or any timestep in exact mode that is not in the
   grid) is encoded exactly, for its layers only, when first seen. With classifier-free guidance the pipeline batches
   ``[negative; positive]``; the negative rows keep the pipeline's own negative-prompt states.

Why anchors: the text encoder is causal, so the steps x layers rows differ from the placeholder on and cost a full
encoding each (20 steps x 7 layers on ``tiny``: 1.45-1.67x the base generation); 2 anchors x 7 layers: about 1.05x. Why
blend by the mapper and not linearly in t: a trained mapper is NOT smooth on a sampling grid (sigma_t = 0.03 gives
Fourier periods down to ~60 timesteps; its output moves ~10% between two steps of a 20-step grid, in no consistent
direction), so linear interpolation in t errs by about as much as the states vary. The mapper itself is cheap, so its
exact outputs at every (t, layer) are known, and the text encoder sees nothing but them: the blend weights are those
whose affine combination of the anchor rows' mapper outputs best matches the mapper output at (t, layer) (least
squares), and the same combination of the anchor rows' states stands in for the encoder's output. Using every layer's
anchors, not only the layer's own, matters: on trained ``tiny`` concepts at 2 anchors the images' mean difference from
the exact ones is 1.7-3.1/255 with all rows, 6.5-13 with the layer's own, 5-16 linear in t; numbers per K are in
`bench/bench_neti.py`.

Results are cached per adapter by (prompt, truncation, text-encoder state) and hold the EXACT states of every timestep
encoded so far; blended states are derived per request and never cached, so the cache does not depend on
``encode_steps`` (a request with other anchors reuses the anchors it shares and encodes only the missing ones) and an
image never depends on what earlier requests left in the cache. A repeated request (same prompt, concept, truncation,
timestep grid, anchors) runs neither the text encoder nor the mapper (the blend weights are kept per grid). The
text-encoder state covers what else can change the text encoder's output for the same prompt: the embedding rows of any
textual-inversion tokens in it and the active text-encoder LoRAs and their scales. LoRAs on the U-Net and
textual-inversion tokens compose without special handling: the processors use the (LoRA-wrapped) projections and the
prompt's TI tokens are encoded with their rows. The cache is bounded by bytes (`CACHE_BYTES`), least recently used
entries first.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines.kinds.conditioning import (
    ConditioningRequest,
    ConditioningState,
    KeyValueStates,
    LayerCall,
    register_kind,
)
from studio.adapter_files import AdapterFile
from studio.errors import FamilyMismatchError, InvalidInputError
from trainers.neti import ConditioningEncoder, NetiMapper, mapper_from_adapter

logger = logging.getLogger(__name__)

KIND = "neti"
OPTIONS = ("truncation", "encode_steps")
DEFAULT_ENCODE_STEPS = 2
"""Timesteps per layer encoded exactly for a new prompt (the rest blended from them); 0 = every timestep. Chosen on
``tiny`` (`bench/bench_neti.py`, 20 steps): 2 (the grid's ends) costs about 1.05x the base generation with images
1.7-3.1/255 from the exact ones; 3 gives 0.7-1.4/255 but about 1.09x, at the 1.10x target under background load.
Not the mapper's own ``MapperSpec.time_anchors`` (the timesteps its first layer is initialised at)."""
CROSS_RIDGE = 1e-3
"""Ridge of the cross-layer blend, relative to the anchor rows' mean squared spread (see `NetiState.blend_weights`);
chosen on a trained ``tiny`` concept: 1e-3 to 1e-2 fit best, 1 falls back most of the way to the layer's own anchors."""
BLEND_CACHE_SIZE = 16
"""Blend weights kept per adapter, by (blend, truncation, anchors, grid); tiny (steps x layers x anchors values)."""
CACHE_BYTES = 1024**3
"""Budget of the per-adapter cache; an entry holds steps x layers x 77 x width values (SD1.5, 50 steps: 95 MB in fp16;
SDXL's 70 layers at 2048 wide: 1.1 GB, so one entry at a time)."""


def anchor_indices(length: int, anchors: int) -> list[int]:
    """Indices of the ``anchors`` grid positions encoded exactly: spread evenly by index, both ends included.

    All of ``range(length)`` when ``anchors`` is 0 (exact) or at least ``length``.

    >>> anchor_indices(20, 3)
    [0, 10, 19]
    """
    if anchors == 0 or anchors >= length:
        return list(range(length))
    # Round half up (not Python's half-to-even) so the spread does not depend on the parity of the midpoints.
    return [int(index * (length - 1) / (anchors - 1) + 0.5) for index in range(anchors)]


def _timestep_key(timestep: torch.Tensor | float) -> float:
    value = timestep if isinstance(timestep, float) else float(torch.as_tensor(timestep).reshape(-1)[0])
    # Rounded: the same grid must map to the same keys whether the value arrives as float32, float64 or int.
    return round(value, 3)


@dataclass
class _Conditionings:
    """Per-timestep states of one (prompt, truncation, text state).

    ``plain[t]`` is ``[L, T, D]``. The bypassed states differ from the plain ones only at the placeholder positions
    ``slots`` (the bypass and the final layer norm act per token), so only those rows are kept: ``bypass[t]``
    ``[L, len(slots), D]``. That halves the memory of an entry.
    """

    slots: torch.Tensor
    plain: dict[float, torch.Tensor] = field(default_factory=dict)
    bypass: dict[float, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes held."""
        tensors = [*self.plain.values(), *self.bypass.values()]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class NetiKind:
    """A loaded NeTI adapter in a `pipelines.service.PipelineService` (built once per cached adapter).

    >>> from pipelines import AdapterRef, GenerationRequest  # doctest: +SKIP
    >>> service.generate(GenerationRequest(prompt="a <my-toy> on the beach",  # doctest: +SKIP
    ...                                    adapters=[AdapterRef("my-toy", options={"truncation": 64})]))
    """

    def __init__(self, adapter: AdapterFile, base_model: Any, *, name: str = "the NeTI adapter") -> None:
        self.mapper: NetiMapper = mapper_from_adapter(adapter, name)
        spec = self.mapper.spec
        pipeline, family = base_model.pipeline, base_model.family
        # 1. The mapper must fit this base model: family, text-encoder widths and number of cross-attention layers.
        if spec.family != family.name:
            raise FamilyMismatchError(
                f"{name} is for {spec.family} but the base model '{base_model.name}' is {family.name}"
            )
        widths = tuple(int(width) for width in family.embedding_widths(pipeline))
        n_layers = len(family.cross_attention_layers(pipeline.unet))
        if spec.widths != widths or spec.n_layers != n_layers:
            raise InvalidInputError(
                f"{name} was trained for text widths {list(spec.widths)} and {spec.n_layers} cross-attention layers "
                f"but the base model '{base_model.name}' has {list(widths)} and {n_layers}"
            )
        self.spec = spec
        self.text = ConditioningEncoder(
            pipeline, family, spec.placeholder_token, spec.super_category, spec.bypass_alpha, spec.num_vectors
        )
        self._cache: OrderedDict[tuple[Any, ...], _Conditionings] = OrderedDict()
        self._lock = threading.Lock()
        self.text_encoder_calls = 0
        """Batched text-encoder passes run so far (tests and benchmarks read it)."""
        self._blend_cache: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
        self.blend = "mapper"
        """How a timestep between anchors combines the anchors' states (`NetiState.blend_weights`): ``mapper`` (all
        anchor rows, weights fitted to the mapper's outputs), or, kept to compare in the bench, ``layer`` (the layer's
        own anchors, fitted) and ``linear`` (linear in t between the layer's two neighbouring anchors)."""

    @classmethod
    def from_adapter(cls, adapter: AdapterFile, base_model: Any) -> NetiKind:
        """The factory registered for ``neti`` files."""
        return cls(adapter, base_model, name=f"adapter '{adapter.metadata.name or KIND}'")

    def _check_options(self, options: dict[str, float], name: str) -> None:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InvalidInputError(
                f"adapter '{name}' is a NeTI adapter with options {', '.join(OPTIONS)}; found {', '.join(unknown)}"
            )

    def truncation_of(self, options: dict[str, float], name: str) -> int | None:
        """The request's truncation (``None`` = full), checked: an int in [1, hidden width]."""
        self._check_options(options, name)
        if "truncation" not in options:
            return None
        value, width = options["truncation"], self.spec.hidden_width
        if value != int(value) or not 1 <= value <= width:
            raise InvalidInputError(
                f"NeTI truncation of adapter '{name}' expects an int in [1, {width}], got {value:g}"
            )
        return None if int(value) == width else int(value)

    def encode_steps_of(self, options: dict[str, float], name: str) -> int:
        """The request's ``encode_steps`` (timesteps of the grid encoded exactly, its ends included; 0 = every
        timestep), checked: 0 or an int >= 2 (default `DEFAULT_ENCODE_STEPS`)."""
        self._check_options(options, name)
        value = options.get("encode_steps", DEFAULT_ENCODE_STEPS)
        if value != int(value) or not (value == 0 or value >= 2):
            raise InvalidInputError(
                f"NeTI encode_steps of adapter '{name}' expects 0 (every timestep exact) or an int >= 2 "
                f"(both ends of the grid are encoded), got {value:g}"
            )
        return int(value)

    def prepare(self, request: ConditioningRequest) -> ConditioningState:
        """This request's state; a no-op state when the weight is 0 or the prompt lacks the placeholder."""
        ref = request.ref
        truncation = self.truncation_of(dict(ref.options), ref.name)
        encode_steps = self.encode_steps_of(dict(ref.options), ref.name)
        if ref.weight == 0:
            return ConditioningState()
        if self.spec.placeholder_token not in request.prompt:
            logger.warning(
                "adapter '%s' is in the request but its placeholder %s is not in the prompt; it has no effect",
                ref.name,
                self.spec.placeholder_token,
            )
            return ConditioningState()
        prompts = self.text.tokenize([request.prompt])
        if not prompts.has_placeholder():
            logger.warning("the placeholder %s is past the text encoder's token limit", self.spec.placeholder_token)
            return ConditioningState()
        key = (request.prompt, truncation, self._text_state(prompts))
        slots = torch.stack(prompts.slots).any(dim=0)[0].nonzero().flatten()
        with self._lock:
            entry = self._cache.pop(key, None) or _Conditionings(slots=slots)
            self._cache[key] = entry
            # Least recently used first; the current entry stays even when it alone is over the budget.
            while len(self._cache) > 1 and sum(item.nbytes() for item in self._cache.values()) > CACHE_BYTES:
                self._cache.popitem(last=False)
        return NetiState(self, request, prompts, truncation, entry, encode_steps)

    @torch.no_grad()
    def _mapper_on_grid(self, timesteps: Sequence[float], truncation: int | None) -> Any:
        """The mapper's outputs for every ``(t, layer)``, timestep-major (row ``i * L + l``), in one call."""
        n_layers = self.spec.n_layers
        device = next(self.mapper.parameters()).device
        times = torch.tensor(list(timesteps), dtype=torch.float32, device=device).repeat_interleave(n_layers)
        layers = torch.arange(n_layers, dtype=torch.float32, device=device).repeat(len(timesteps))
        return self.mapper(times, layers, truncation)

    def compute(
        self,
        prompts: Any,
        timesteps: Sequence[float],
        truncation: int | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """States ``[len(timesteps), L, T, D]`` (plain, bypassed): one mapper call and one call per text encoder."""
        n_layers = self.spec.n_layers
        self.mapper.to(device)
        outputs = self._mapper_on_grid(timesteps, truncation)
        with torch.no_grad():
            plain, bypassed = self.text.encode(prompts, outputs, len(timesteps) * n_layers)
        self.text_encoder_calls += 1
        shape = (len(timesteps), n_layers, *plain.shape[1:])
        return plain.to(dtype).reshape(shape), bypassed.to(dtype).reshape(shape)

    def mapper_features(self, timesteps: Sequence[float], truncation: int | None) -> torch.Tensor:
        """The mapper's outputs ``[len(timesteps), L, F]`` (every encoder's embeddings then bypass vectors, flattened),
        float64 on the CPU: what `NetiState.blend_weights` fits."""
        outputs = self._mapper_on_grid(timesteps, truncation)
        rows = len(timesteps) * self.spec.n_layers
        parts = [tensor.reshape(rows, -1) for tensor in (*outputs.embeddings, *outputs.bypass)]
        return torch.cat(parts, dim=-1).double().cpu().reshape(len(timesteps), self.spec.n_layers, -1)

    def _text_state(self, prompts: Any) -> str:
        """A digest of what else shapes the text encoders' output: TI rows in the prompt and text-encoder LoRAs."""
        digest = hashlib.sha256()
        for index, encoder in enumerate(self.text.encoders):
            vocab = int(getattr(self.text.tokenizers[index], "vocab_size", 0))
            ids = prompts.input_ids[index][0]
            added = sorted({int(i) for i in ids.tolist() if i >= vocab})
            if added:
                rows = encoder.get_input_embeddings().weight.detach()[added].float().cpu().contiguous()
                digest.update(str(added).encode())
                digest.update(rows.numpy().tobytes())
            for module_name, module in encoder.named_modules():
                scaling = getattr(module, "scaling", None)
                if isinstance(scaling, dict) and hasattr(module, "active_adapters"):
                    active = list(module.active_adapters) if not getattr(module, "disable_adapters", False) else []
                    state = [(name, scaling.get(name)) for name in active if name in scaling]
                    if state:
                        digest.update(f"{module_name}:{state}:{getattr(module, 'merged', False)}".encode())
        return digest.hexdigest()


class NetiState(ConditioningState):
    """One request's NeTI conditioning: the grid's anchors encoded on first use, the rest blended or looked up."""

    def __init__(
        self,
        kind: NetiKind,
        request: ConditioningRequest,
        prompts: Any,
        truncation: int | None,
        entry: _Conditionings,
        encode_steps: int = DEFAULT_ENCODE_STEPS,
    ) -> None:
        self.kind = kind
        self.pipeline = request.pipeline
        self.prompts = prompts
        self.truncation = truncation
        self.entry = entry
        self.encode_steps = encode_steps
        self.device = request.device
        self.dtype = request.dtype
        self.guidance = request.classifier_free_guidance
        self.anchors: list[float] | None = None
        """This request's anchor timesteps, ascending (set on first use; the whole grid in exact mode)."""
        self.interpolating = False
        self._stacked: tuple[torch.Tensor, torch.Tensor] = (torch.empty(0), torch.empty(0))
        """Every anchor row's plain states ``[K * L, T * D]`` and bypassed rows ``[K * L, S * D]`` (row ``k * L + l``:
        anchor k, layer l), float32."""
        self._weights: dict[float, torch.Tensor] = {}
        self._rows: tuple[float, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        """The current U-Net call's timestep, its states and every layer's keys and values (`_all_layer_rows`)."""

    def _encode(self, timesteps: Sequence[float]) -> None:
        """Encode (exactly) the timesteps the entry lacks, in one batch."""
        missing = list(dict.fromkeys(t for t in timesteps if t not in self.entry.plain))
        if not missing:
            return
        plain, bypassed = self.kind.compute(self.prompts, missing, self.truncation, self.device, self.dtype)
        slots = self.entry.slots.to(bypassed.device)
        for index, t in enumerate(missing):
            self.entry.plain[t] = plain[index]
            self.entry.bypass[t] = bypassed[index][:, slots].clone()

    def _start(self, timestep: float) -> None:
        """First use in this request: pick the anchors of the scheduler's grid and encode them in one batch."""
        grid_values = getattr(self.pipeline.scheduler, "timesteps", None)
        grid = list(dict.fromkeys(_timestep_key(t) for t in grid_values)) if grid_values is not None else []
        chosen = [grid[index] for index in anchor_indices(len(grid), self.encode_steps)]
        self.interpolating = len(chosen) < len(grid)
        if timestep not in grid:
            chosen.append(timestep)
        self._encode(chosen)
        self.anchors = sorted(set(chosen))
        if self.interpolating:
            # Every anchor row, anchor-major ([K * L, rest], float32: fp16 arithmetic is not on every CPU build), so
            # one matrix product blends a timestep's layers from any of them.
            self._stacked = tuple(
                torch.stack([table[t].float() for t in self.anchors]).flatten(2).flatten(0, 1)
                for table in (self.entry.plain, self.entry.bypass)
            )
            between = [t for t in grid if t not in self.anchors and self.anchors[0] < t < self.anchors[-1]]
            # One mapper call and one solve for the whole grid; they do not depend on the prompt, so kept per kind.
            key = (self.kind.blend, self.truncation, tuple(self.anchors), tuple(between))
            with self.kind._lock:
                weights = self.kind._blend_cache.pop(key, None)
            if weights is None:
                weights = self.blend_weights(between) if between else torch.empty(0)
            with self.kind._lock:
                self.kind._blend_cache[key] = weights
                while len(self.kind._blend_cache) > BLEND_CACHE_SIZE:
                    self.kind._blend_cache.popitem(last=False)
            self._weights = dict(zip(between, weights, strict=True))

    def states_at(self, timestep: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain states ``[L, T, D]`` and the bypassed rows at the placeholder ``[L, S, D]`` for a timestep key.

        Exact at an anchor or outside the anchors' range; otherwise the anchors' states blended with
        `blend_weights`.
        """
        if self.anchors is None:
            self._start(timestep)
        anchors = self.anchors or []
        if timestep in anchors or not self.interpolating or not anchors[0] < timestep < anchors[-1]:
            self._encode([timestep])
            return self.entry.plain[timestep], self.entry.bypass[timestep]
        if timestep not in self._weights:
            self._weights[timestep] = self.blend_weights([timestep])[0]
        weights = self._weights[timestep].to(self._stacked[0].device, self._stacked[0].dtype)  # [L, K * L]
        exact_plain, exact_bypass = self.entry.plain[anchors[0]], self.entry.bypass[anchors[0]]
        plain, bypass = (weights @ stacked for stacked in self._stacked)
        return plain.reshape(exact_plain.shape).to(exact_plain.dtype), bypass.reshape(exact_bypass.shape).to(
            exact_bypass.dtype
        )

    def blend_weights(self, timesteps: Sequence[float]) -> torch.Tensor:
        """Per timestep and layer, the weights ``[len(timesteps), L, K * L]`` (summing to 1) of the anchor rows' states
        (row ``k * L + l``: anchor k, layer l).

        The text encoder sees only the mapper's output m(t, l) (embeddings and bypass vectors,
        `NetiKind.mapper_features`), not t or l, so any anchor row can stand in for any (t, l). ``mapper`` (the
        default): start from the ``layer`` weights, then the affine combination of ALL anchor rows' m closest (least
        squares) to m(t, l), with a small ridge (`CROSS_RIDGE`) pulling towards the ``layer`` weights; the same
        combination of the rows' encoder states stands in for the encoding at (t, l). ``layer``: the same fit over the
        layer's own K anchors only. ``linear``: the linear interpolation in t between the layer's two neighbouring
        anchors. A mapper constant in t gets exact states from the two mapper blends.
        """
        anchors = self.anchors or []
        count, n_layers = len(anchors), self.kind.spec.n_layers
        rows = count * n_layers
        own = torch.zeros(len(timesteps), n_layers, count, dtype=torch.float64)
        features = None
        if self.kind.blend == "linear":
            for row, t in enumerate(timesteps):
                upper = next(index for index, anchor in enumerate(anchors) if anchor > t)
                share = (t - anchors[upper - 1]) / (anchors[upper] - anchors[upper - 1])
                own[row, :, upper - 1], own[row, :, upper] = 1 - share, share
        else:
            features = self.kind.mapper_features([*anchors, *timesteps], self.truncation)  # [K + M, L, F]
            origin = features[0]  # [L, F]
            directions = (features[1:count] - origin).transpose(0, 1)  # [L, K-1, F]
            targets = (features[count:] - origin).transpose(0, 1)  # [L, M, F]
            gram = directions @ directions.transpose(1, 2)
            # A vanishing ridge keeps the solve defined when anchors coincide (a mapper constant in t: anchor 0).
            scale = gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)[:, None, None]
            ridge = 1e-9 * scale * torch.eye(count - 1, dtype=gram.dtype)
            steps = torch.linalg.solve(gram + ridge, directions @ targets.transpose(1, 2)).permute(2, 0, 1)
            own = torch.cat([1 - steps.sum(dim=-1, keepdim=True), steps], dim=-1)  # [M, L, K]
        # Spread over all anchor rows: layer l's own anchors are rows k * L + l.
        weights = torch.zeros(len(timesteps), n_layers, count, n_layers, dtype=torch.float64)
        weights.diagonal(dim1=1, dim2=3).copy_(own.transpose(1, 2))
        weights = weights.reshape(len(timesteps), n_layers, rows)
        if self.kind.blend != "mapper" or features is None:
            return weights
        # Cross-layer refinement: w = w_layer + delta with sum(delta) = 0, minimising
        # |basis^T w - m(t, l)|^2 + ridge |delta|^2 (one KKT system, the same matrix for every (t, l)).
        basis = features[:count].reshape(rows, -1)  # [K * L, F]
        residual = features[count:] - weights @ basis  # [M, L, F]
        centred = basis - basis.mean(dim=0)  # sum(delta) = 0 makes the fit blind to a common shift
        gram = centred @ centred.T
        ridge = max(CROSS_RIDGE * float(gram.trace()) / rows, 1e-30)
        kkt = torch.zeros(rows + 1, rows + 1, dtype=torch.float64)
        kkt[:rows, :rows] = gram + ridge * torch.eye(rows, dtype=torch.float64)
        kkt[:rows, rows] = 1.0
        kkt[rows, :rows] = 1.0
        rhs = torch.zeros(rows + 1, residual.shape[0] * n_layers, dtype=torch.float64)
        rhs[:rows] = centred @ residual.reshape(-1, residual.shape[-1]).T
        delta = torch.linalg.solve(kkt, rhs)[:rows].T.reshape(len(timesteps), n_layers, rows)
        return weights + delta

    def key_value_states(self, call: LayerCall) -> KeyValueStates | None:
        """Plain states for the keys and bypassed states for the values of this layer and timestep."""
        if call.timestep is None:
            return None
        timestep, states = _timestep_key(call.timestep), call.encoder_hidden_states
        # Every layer of one U-Net call brings the same timestep and states object: build all layers' rows once per
        # U-Net call (one scatter and two concatenations instead of one per layer: about 2% of a tiny generation).
        rows = self._rows
        if rows is None or rows[0] != timestep or rows[1] is not states:
            rows = (timestep, states, *self._all_layer_rows(timestep, states))
            self._rows = rows
        return KeyValueStates(rows[2][call.layer_index], rows[3][call.layer_index])

    def _all_layer_rows(self, timestep: float, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[L, B, T, D]`` of every layer for the U-Net batch ``states`` ``[B, T, D]``."""
        all_plain, all_bypass = self.states_at(timestep)
        plain = all_plain.to(states.device, states.dtype)
        bypassed = plain.clone()
        bypassed[:, self.entry.slots.to(states.device)] = all_bypass.to(states.device, states.dtype)
        batch, n_layers = states.shape[0], plain.shape[0]
        # With guidance the negative rows come first and keep the pipeline's own states.
        negative = batch // 2 if self.guidance and batch % 2 == 0 else 0
        own = states[:negative].expand(n_layers, -1, -1, -1)
        keys = torch.cat([own, plain[:, None].expand(-1, batch - negative, -1, -1)], dim=1)
        values = torch.cat([own, bypassed[:, None].expand(-1, batch - negative, -1, -1)], dim=1)
        return keys, values


register_kind(KIND, NetiKind.from_adapter)
