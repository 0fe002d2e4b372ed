"""How each adapter kind enters the shared pipeline.

- `pipelines.kinds.lora`: LoRA through diffusers/peft (`LoraSlots`).
- `pipelines.kinds.embeddings`: textual-inversion vectors under service-owned tokens (`EmbeddingSlots`).
- `pipelines.kinds.conditioning`: the seam for kinds that change cross-attention per layer and timestep (NeTI) or
  add cross-attention tokens (preference); they plug in with `register_kind`.
"""

# Built-in conditioning kinds register themselves on import, so the service finds them by the kind in a file.
from pipelines.kinds import neti as _neti  # noqa: F401
from pipelines.kinds import preference as _preference  # noqa: F401
from pipelines.kinds.conditioning import (
    ConditioningKind,
    ConditioningRequest,
    ConditioningState,
    ExtraTokens,
    KeyValueStates,
    LayerCall,
    register_kind,
    registered_kinds,
    unregister_kind,
)

__all__ = [
    "ConditioningKind",
    "ConditioningRequest",
    "ConditioningState",
    "ExtraTokens",
    "KeyValueStates",
    "LayerCall",
    "register_kind",
    "registered_kinds",
    "unregister_kind",
]
