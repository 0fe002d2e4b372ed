"""The ``neti`` adapter kind: a NeTI mapper conditioning every (timestep, cross-attention layer) of a generation.

How a request with a NeTI concept runs (see `trainers.neti` for the mapper itself):

1. `NetiKind.prepare` reads the request's ``truncation`` option (``name:truncation=64``; default the full 128) and
   returns a `NetiState` for the prompt, unless the prompt does not mention the placeholder (then nothing changes).
2. On the first cross-attention call of the first U-Net call, the scheduler has set its timestep grid. The state
   then evaluates the mapper for every ``(t, layer)`` of that grid in ONE batched call and runs each text encoder
   ONCE on the whole batch of distinct conditionings (steps x layers prompts). A timestep outside the grid (a
   scheduler that calls the U-Net in between) is computed the same way, for its layers only, when first seen.
3. Each `ConditionedAttnProcessor` then asks for its layer's states at the current timestep: keys from the plain
   states, values from the bypassed states, in the positive rows only. With classifier-free guidance the pipeline
   batches ``[negative; positive]``; the negative rows keep the pipeline's own negative-prompt states.

Results are cached per adapter by (prompt, truncation, text-encoder state) and hold every timestep computed so far,
so a repeated request (same prompt, concept, truncation, timestep grid) calls neither the mapper nor the text
encoder. The text-encoder state covers what else can change the text encoder's output for the same prompt: the
embedding rows of any textual-inversion tokens in it and the active text-encoder LoRAs and their scales. LoRAs on the
U-Net and textual-inversion tokens compose without special handling: the processors use the (LoRA-wrapped)
projections and the prompt's TI tokens are encoded with their rows. The cache is bounded by bytes (`CACHE_BYTES`),
least recently used entries first.
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
OPTIONS = ("truncation",)
CACHE_BYTES = 1024**3
"""Budget of the per-adapter cache; an entry holds steps x layers x 77 x width values (SD1.5, 50 steps: 95 MB in fp16;
SDXL's 70 layers at 2048 wide: 1.1 GB, so one entry at a time)."""


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

    @classmethod
    def from_adapter(cls, adapter: AdapterFile, base_model: Any) -> NetiKind:
        """The factory registered for ``neti`` files."""
        return cls(adapter, base_model, name=f"adapter '{adapter.metadata.name or KIND}'")

    def truncation_of(self, options: dict[str, float], name: str) -> int | None:
        """The request's truncation (``None`` = full), checked: an int in [1, hidden width]."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InvalidInputError(
                f"adapter '{name}' is a NeTI adapter with options {', '.join(OPTIONS)}; found {', '.join(unknown)}"
            )
        if "truncation" not in options:
            return None
        value, width = options["truncation"], self.spec.hidden_width
        if value != int(value) or not 1 <= value <= width:
            raise InvalidInputError(
                f"NeTI truncation of adapter '{name}' expects an int in [1, {width}], got {value:g}"
            )
        return None if int(value) == width else int(value)

    def prepare(self, request: ConditioningRequest) -> ConditioningState:
        """This request's state; a no-op state when the weight is 0 or the prompt lacks the placeholder."""
        ref = request.ref
        truncation = self.truncation_of(dict(ref.options), ref.name)
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
        return NetiState(self, request, prompts, truncation, entry)

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
        times = torch.tensor(list(timesteps), dtype=torch.float32, device=device).repeat_interleave(n_layers)
        layers = torch.arange(n_layers, dtype=torch.float32, device=device).repeat(len(timesteps))
        with torch.no_grad():
            outputs = self.mapper(times, layers, truncation)
            plain, bypassed = self.text.encode(prompts, outputs, len(timesteps) * n_layers)
        self.text_encoder_calls += 1
        shape = (len(timesteps), n_layers, *plain.shape[1:])
        return plain.to(dtype).reshape(shape), bypassed.to(dtype).reshape(shape)

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
    """One request's NeTI conditioning: computed for the whole timestep grid on first use, then looked up."""

    def __init__(
        self,
        kind: NetiKind,
        request: ConditioningRequest,
        prompts: Any,
        truncation: int | None,
        entry: _Conditionings,
    ) -> None:
        self.kind = kind
        self.pipeline = request.pipeline
        self.prompts = prompts
        self.truncation = truncation
        self.entry = entry
        self.device = request.device
        self.dtype = request.dtype
        self.guidance = request.classifier_free_guidance

    def _ensure(self, timestep: float) -> None:
        if timestep in self.entry.plain:
            return
        # First use in this request: everything the scheduler will ask for, in one batch.
        grid = getattr(self.pipeline.scheduler, "timesteps", None)
        wanted = [_timestep_key(t) for t in grid] if grid is not None else []
        if timestep not in wanted:
            wanted.append(timestep)
        missing = list(dict.fromkeys(t for t in wanted if t not in self.entry.plain))
        plain, bypassed = self.kind.compute(self.prompts, missing, self.truncation, self.device, self.dtype)
        slots = self.entry.slots.to(bypassed.device)
        for index, t in enumerate(missing):
            self.entry.plain[t] = plain[index]
            self.entry.bypass[t] = bypassed[index][:, slots].clone()

    def key_value_states(self, call: LayerCall) -> KeyValueStates | None:
        """Plain states for the keys and bypassed states for the values of this layer and timestep."""
        if call.timestep is None:
            return None
        timestep = _timestep_key(call.timestep)
        self._ensure(timestep)
        states = call.encoder_hidden_states
        plain = self.entry.plain[timestep][call.layer_index].to(states.device, states.dtype)
        bypassed = plain.clone()
        bypassed[self.entry.slots.to(states.device)] = self.entry.bypass[timestep][call.layer_index].to(states.dtype)
        batch = states.shape[0]
        # With guidance the negative rows come first and keep the pipeline's own states.
        negative = batch // 2 if self.guidance and batch % 2 == 0 else 0
        positive = batch - negative
        keys = torch.cat([states[:negative], plain.expand(positive, -1, -1)])
        values = torch.cat([states[:negative], bypassed.expand(positive, -1, -1)])
        return KeyValueStates(keys, values)


register_kind(KIND, NetiKind.from_adapter)
