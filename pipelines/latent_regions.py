"""Latent regions: one U-Net view per region of the prompt, each with its own words and its own LoRA.

Attention regions (`pipelines.kinds.conditioning`) give each stripe of the image its own cross-attention, inside
one U-Net pass over the whole image. That keeps the scene one composition, but every LoRA still changes the whole
U-Net, and a model that draws one centred subject per image keeps doing so. Latent regions work as MultiDiffusion
(Bar-Tal et al.) and the "Latent" mode of AUTOMATIC1111's Regional Prompter do: at every denoising step each region
runs the U-Net on its own window of the latent, with its own prompt, and the windows' noise predictions are averaged
where they overlap. Each subject is then drawn as the model draws a subject alone, and a LoRA given to one region
(``AdapterRef`` option ``region``) changes only that region's view.

All views share one batched U-Net call. Nothing of diffusers is replaced: a forward pre-hook on the U-Net cuts the
latent into views and gives each its prompt states, a forward hook stitches the predictions back, and, when LoRAs
are scoped to regions, pre-hooks on peft's LoRA layers pass peft's own per-sample ``adapter_names`` (its mixed-batch
inference), so each view runs with exactly its region's LoRA.

>>> [(v.left, v.width) for v in region_views("columns", 2, height=16, width=28, native=16)]
[(0, 16), (12, 16)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

BASE_ADAPTER = "__base__"
"""peft's name for "no LoRA" in a mixed batch."""


@dataclass(frozen=True)
class View:
    """A window of the latent, in latent pixels."""

    top: int
    left: int
    height: int
    width: int

    def cut(self, latent: torch.Tensor) -> torch.Tensor:
        """This window of a ``(batch, channels, height, width)`` tensor."""
        return latent[:, :, self.top : self.top + self.height, self.left : self.left + self.width]


def region_views(layout: str, count: int, *, height: int, width: int, native: int) -> list[View]:
    """Windows for ``count`` regions side by side ("columns") or stacked ("rows") over a latent of this size.

    Each window spans the whole other side and, along the split, at least the model's ``native`` latent side (a
    model draws best at the size it was trained at) and at least its share of the image. Windows are spread evenly
    from one edge to the other, so they cover the image with no gap, and overlap where the image is narrower than
    ``count`` windows: the overlaps are where neighbouring regions blend into one scene.
    """
    along = width if layout == "columns" else height
    side = min(along, max(native, math.ceil(along / count)))
    starts = [round(index * (along - side) / max(1, count - 1)) for index in range(count)]
    if layout == "columns":
        return [View(top=0, left=start, height=height, width=side) for start in starts]
    return [View(top=start, left=0, height=side, width=width) for start in starts]


class LatentRegions:
    """While entered, every U-Net call runs one view per region and returns the stitched prediction.

    ``states`` are each region's positive prompt states (``(1, tokens, width)``), ``pooled`` each region's pooled
    text embedding for families that condition on one (SDXL's ``text_embeds``), else ``None``. With classifier-free
    guidance (``guided``) the first half of the batch the pipeline passes is the unconditional half: its rows keep the
    pipeline's (negative prompt) states in every view. ``lora_names``, when given, is each region's peft adapter name
    (``None`` for no LoRA); the LoRA layers then run per view.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        views: Sequence[View],
        states: Sequence[torch.Tensor],
        *,
        guided: bool,
        pooled: Sequence[torch.Tensor | None] | None = None,
        lora_names: Sequence[str | None] | None = None,
    ) -> None:
        if len(views) != len(states):
            raise ValueError(f"expected one prompt state per view, got {len(states)} for {len(views)} views")
        self.unet = unet
        self.views = list(views)
        self.states = list(states)
        self.pooled = list(pooled) if pooled is not None else [None] * len(views)
        self.guided = guided
        self.lora_names = list(lora_names) if lora_names is not None else None
        self._handles: list[Any] = []
        self._shape: torch.Size | None = None
        self._batch_names: list[str] | None = None

    def __enter__(self) -> LatentRegions:
        self._handles.append(self.unet.register_forward_pre_hook(self._split, with_kwargs=True))
        self._handles.append(self.unet.register_forward_hook(self._stitch, with_kwargs=True))
        if self.lora_names is not None:
            from peft.tuners.lora import LoraLayer

            for module in self.unet.modules():
                if isinstance(module, LoraLayer):
                    self._handles.append(module.register_forward_pre_hook(self._name_batch, with_kwargs=True))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._shape = None
        self._batch_names = None

    # -- hooks -----------------------------------------------------------------------------------------------------

    def _split(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """Replace the latent by its views, stacked view after view, each view's rows with that region's states."""
        args, kwargs = list(args), dict(kwargs)
        sample = args[0] if args else kwargs["sample"]
        batch = sample.shape[0]
        self._shape = sample.shape
        count = len(self.views)
        conditional = slice(batch // 2, batch) if self.guided else slice(0, batch)
        hidden = kwargs["encoder_hidden_states"]
        view_states = []
        for state in self.states:
            rows = hidden.clone()
            rows[conditional] = state.to(rows.dtype).expand(rows[conditional].shape[0], -1, -1)
            view_states.append(rows)
        new_sample = torch.cat([view.cut(sample) for view in self.views])
        if args:
            args[0] = new_sample
        else:
            kwargs["sample"] = new_sample
        kwargs["encoder_hidden_states"] = torch.cat(view_states)
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if torch.is_tensor(timestep) and timestep.ndim == 1 and timestep.shape[0] == batch:
            timestep = timestep.repeat(count)
            if len(args) > 1:
                args[1] = timestep
            else:
                kwargs["timestep"] = timestep
        added = kwargs.get("added_cond_kwargs")
        if added:
            added = {
                key: value.repeat(count, *[1] * (value.ndim - 1)) if torch.is_tensor(value) else value
                for key, value in added.items()
            }
            if "text_embeds" in added:
                embeds = added["text_embeds"]
                for index, pooled in enumerate(self.pooled):
                    if pooled is not None:
                        rows = embeds[index * batch : (index + 1) * batch]
                        rows[conditional] = pooled.to(rows.dtype).expand(rows[conditional].shape[0], -1)
            kwargs["added_cond_kwargs"] = added
        if kwargs.get("timestep_cond") is not None:
            kwargs["timestep_cond"] = kwargs["timestep_cond"].repeat(count, 1)
        if self.lora_names is not None:
            self._batch_names = [name or BASE_ADAPTER for name in self.lora_names for _ in range(batch)]
        return tuple(args), kwargs

    def _stitch(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        """Put each view's prediction back in its window; where windows overlap, their mean."""
        shape, self._shape, self._batch_names = self._shape, None, None
        assert shape is not None, "the U-Net's forward hook ran without its pre-hook"
        predicted = output[0] if isinstance(output, tuple) else output.sample
        batch = shape[0]
        total = predicted.new_zeros((batch, predicted.shape[1], *shape[2:]))
        weight = predicted.new_zeros((1, 1, *shape[2:]))
        for index, view in enumerate(self.views):
            view.cut(total).add_(predicted[index * batch : (index + 1) * batch])
            view.cut(weight).add_(1.0)
        stitched = total / weight
        if isinstance(output, tuple):
            return (stitched, *output[1:])
        output.sample = stitched
        return output

    def _name_batch(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        """Tell a peft LoRA layer which adapter each row of the stacked views uses."""
        if self._batch_names is None:
            return args, kwargs
        return args, {**kwargs, "adapter_names": self._batch_names}
