"""The shared pipeline service: one warm base model per device, adapters loaded on demand and composed per request.

The UI, the CLI and the trainers' sample previews all generate through a `PipelineService`. It keeps one stock
diffusers pipeline on its device and composes adapters into it with diffusers' own mechanisms: LoRA through peft
(``load_lora_weights`` once, ``set_adapters`` per request), textual-inversion vectors as tokenizer/embedding rows,
and conditioning kinds (NeTI, preference) through attention processors installed once. Images come from the
pipeline's own ``__call__``.

One request at a time per service (a lock). The pipeline is shared mutable state: the active LoRA set and weights,
the scheduler, and the conditioning state all belong to the request being served, so two requests on one device
cannot overlap without seeing each other's adapters. Serialising costs nothing in throughput on one device (a second
request would only compete for the same GPU or CPU cores) and makes "each request gets exactly its adapters" true by
construction. Every request sets its full state at its start (adapters, scheduler, conditioning), so nothing carries
over from the previous one.

>>> from studio.base_models import BaseModel
>>> from studio.testing import build_tiny_sd1_pipeline
>>> service = PipelineService(BaseModel.from_pipeline(build_tiny_sd1_pipeline(), "tiny-random"))
>>> result = service.generate(GenerationRequest(prompt="a red circle", seeds=[1], steps=2))
>>> result.images[0].size, result.metadata[0]["seed"]
((64, 64), 1)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

import studio
from pipelines.cache import AdapterCache, CachedAdapter, library_resolver
from pipelines.kinds.conditioning import (
    ConditioningKind,
    ConditioningRequest,
    ConditioningState,
    LayerCall,
    RegionStates,
    install_conditioning,
    kind_factory,
    region_masks,
    registered_kinds,
)
from pipelines.kinds.embeddings import EmbeddingSlots, EmbeddingUse, references_of, rewrite_prompts
from pipelines.kinds.lora import DEFAULT_MAX_RESIDENT, LoraSlots
from pipelines.latent_regions import LatentRegions, region_views
from pipelines.requests import REGION_OPTION, SIZE_MULTIPLE, AdapterRef, GenerationRequest, GenerationResult
from studio.adapter_files import AdapterFile, load_adapter
from studio.errors import FamilyMismatchError, InvalidInputError, NotAvailableError, NotFoundError
from studio.home import StudioHome
from studio.library import AdapterLibrary, check_compatible

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 2 * 1024**3
"""RAM for parsed adapters: about 14 SD1.5 LoRAs of rank 128, or hundreds of small ones."""

LORA = "lora"
TEXTUAL_INVERSION = "textual_inversion"

# Request scheduler name -> (diffusers class, config overrides). Built fresh from the base model's scheduler config
# for every request, so no step counter or noise state survives from one request to the next.
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpm++_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),
}


class PipelineService:
    """Generate images with a base model and any adapters from a library, one request at a time.

    ``adapter_source`` maps adapter names to files: an `studio.library.AdapterLibrary`, a folder of
    ``<name>.safetensors`` files, or a callable ``name -> Path``. ``cache_bytes`` bounds the RAM held by parsed
    adapters; ``max_resident_loras`` bounds the LoRAs kept loaded in the pipeline. ``loader`` reads one adapter file
    (tests count calls through it).
    """

    def __init__(
        self,
        base_model: Any,
        device: str | torch.device = "cpu",
        *,
        adapter_source: Any = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_resident_loras: int = DEFAULT_MAX_RESIDENT,
        loader: Callable[[Path], AdapterFile] = load_adapter,
    ) -> None:
        self.base_model = base_model
        self.family = base_model.family
        self.device = torch.device(device)
        # The fingerprint hashes the weights: take it before embeddings or LoRA layers are added to the pipeline.
        self.fingerprint = base_model.fingerprint
        self.pipeline = base_model.pipeline.to(self.device)
        self.pipeline.set_progress_bar_config(disable=True)
        self._scheduler_class = type(self.pipeline.scheduler)
        self._scheduler_config = dict(self.pipeline.scheduler.config)
        self._lock = threading.Lock()
        self._seam = install_conditioning(self.pipeline.unet, self.family.cross_attention_layers(self.pipeline.unet))
        self._loras = LoraSlots(self.pipeline, max_resident=max_resident_loras)
        self._embeddings = EmbeddingSlots(self.pipeline, self.family)
        self._kinds: dict[str, ConditioningKind] = {}
        self._checked: set[tuple[str, str]] = set()
        self._resolve = library_resolver(adapter_source) if adapter_source is not None else _no_adapters
        self.cache = AdapterCache(self._resolve, budget_bytes=cache_bytes, loader=loader, on_evict=self._forget)

    # -- public API ------------------------------------------------------------------------------------------------

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Cross-attention processor names in layer-index order (what conditioning kinds index)."""
        return self._seam.layer_names

    @property
    def default_size(self) -> int:
        """The base model's native image side in pixels."""
        return int(self.pipeline.unet.config.sample_size) * int(self.pipeline.vae_scale_factor)

    @property
    def min_side(self) -> int:
        """The smallest image side the U-Net can take: one latent pixel at its deepest level."""
        levels = len(self.pipeline.unet.config.block_out_channels) - 1
        return max(SIZE_MULTIPLE, int(self.pipeline.vae_scale_factor) * 2**levels)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Make one image per seed of ``request``, with exactly its adapters. Raises `StudioError` for bad requests.

        A failed request leaves the service ready for the next one.
        """
        request.validate(min_side=self.min_side)
        with self._lock:
            return self._generate(request)

    def resident_loras(self) -> list[str]:
        """Library names of the LoRAs currently loaded in the pipeline."""
        with self._lock:
            return self._loras.resident()

    def close(self) -> None:
        """Evict every adapter from the pipeline and the cache and remove the conditioning processors."""
        with self._lock:
            self.cache.clear()
            self._seam.remove()

    # -- one request -----------------------------------------------------------------------------------------------

    def _generate(self, request: GenerationRequest) -> GenerationResult:
        started = time.perf_counter()
        # 1. Resolve the adapters: parsed from the cache (a file is read only on a miss), checked against the base.
        names = [ref.name for ref in request.adapters]
        entries = [self._resolve_adapter(ref.name, pinned=names) for ref in request.adapters]
        resolved = time.perf_counter()

        # 2. Make exactly this request's adapters active.
        loras = []
        uses = []
        for ref, entry in zip(request.adapters, entries, strict=True):
            if entry.kind == LORA:
                lora, bundled = entry.parts()
                self._loras.ensure(entry.name, lora, keep=names)
                loras.append((entry.name, ref.weight))
                if bundled is not None and ref.weight != 0:
                    # A pivotal-tuning LoRA carries its placeholder's embedding: that token is part of the concept.
                    tokens = self._embeddings.ensure(entry.name, bundled)
                    uses.append(EmbeddingUse(entry.name, references_of(entry.name, bundled), tokens))
            elif entry.kind == TEXTUAL_INVERSION and ref.weight != 0:
                tokens = self._embeddings.ensure(entry.name, entry.adapter)
                uses.append(EmbeddingUse(entry.name, references_of(entry.name, entry.adapter), tokens))
        self._loras.activate(loras)
        # With regions every part of the prompt is rewritten and encoded on its own; the pipeline gets the first.
        parts = request.region_prompts() or [request.prompt]
        base_part = request.region_base()
        rewritten, warnings = rewrite_prompts([*parts, base_part, request.negative_prompt], uses)
        parts, base_part, negative_prompt = rewritten[:-2], rewritten[-2], rewritten[-1]
        prompt = base_part or parts[0]
        conditioning = [
            (ref, entry)
            for ref, entry in zip(request.adapters, entries, strict=True)
            if entry.kind not in (LORA, TEXTUAL_INVERSION)
        ]
        # Kinds prepare on the prompt as written (what its own words decide); the pipeline encodes it with the words
        # the adapters add.
        states = [
            (entry.name, self._prepare_kind(entry, ref, request, prompt, negative_prompt))
            for ref, entry in conditioning
        ]
        parts = [self._prompt_words(part, conditioning) for part in parts]
        base_part = self._prompt_words(base_part, conditioning)
        prompt = base_part or parts[0]
        named = [("prompt", part) for part in [base_part, *parts] if part] + [("negative prompt", negative_prompt)]
        warnings += self._truncation_warnings(named)
        width = request.width or self.default_size
        height = request.height or self.default_size
        views: AbstractContextManager[Any] = nullcontext()
        if request.regions is not None:
            if any(entry.kind == "neti" for entry in entries):
                raise NotAvailableError("regions together with a NeTI adapter are not available yet")
            if request.region_mode == "latent":
                if states:
                    raise NotAvailableError(
                        f"latent regions together with the conditioning adapter '{states[0][0]}' "
                        "are not available yet; use region_mode 'attention'"
                    )
                views = self._latent_regions(request, parts, entries, width, height)
            else:
                base = (base_part, request.base_ratio) if base_part else None
                states.append(("regions", self._region_state(request.regions, parts, base, width, height)))
        if not self._seam.is_installed():
            logger.warning("the conditioning processors were replaced; installing them again")
            self._seam.reinstall()
        activated = time.perf_counter()

        # 3. Generate, one seed at a time: an image depends only on its own seed, not on the others in the request.
        scheduler_name = request.scheduler if request.scheduler not in (None, "default") else self._default_name()
        images = []
        with self._seam.context.activate(states), views:
            for seed in request.seeds:
                self.pipeline.scheduler = self._fresh_scheduler(request.scheduler)
                # A CPU generator: the same seed gives the same starting noise on every device.
                generator = torch.Generator("cpu").manual_seed(seed)
                output = self.pipeline(
                    prompt=prompt,
                    negative_prompt=negative_prompt or None,
                    num_inference_steps=request.steps,
                    guidance_scale=request.guidance,
                    width=width,
                    height=height,
                    generator=generator,
                    output_type="pil",
                )
                images.extend(output.images)
        finished = time.perf_counter()

        for warning in warnings:
            logger.warning(warning)
        adapters = [
            {**ref.describe(), "kind": entry.kind, "sha256": entry.sha256, "placeholder_tokens": _placeholders(entry)}
            for ref, entry in zip(request.adapters, entries, strict=True)
        ]
        metadata = [
            {
                "prompt": request.prompt,
                "negative_prompt": request.negative_prompt,
                "seed": seed,
                "steps": request.steps,
                "guidance": request.guidance,
                "width": width,
                "height": height,
                "scheduler": scheduler_name,
                "base_model": self.base_model.name,
                "base_fingerprint": self.fingerprint,
                "family": self.family.name,
                "adapters": adapters,
                **(
                    {"regions": request.regions, "base_ratio": request.base_ratio, "region_mode": request.region_mode}
                    if request.regions
                    else {}
                ),
                "studio_version": studio.__version__,
            }
            for seed in request.seeds
        ]
        timings = {
            "resolve_s": resolved - started,
            "activate_s": activated - resolved,
            "generate_s": finished - activated,
            "total_s": finished - started,
        }
        return GenerationResult(images=images, metadata=metadata, timings=timings, warnings=warnings)

    def _resolve_adapter(self, name: str, *, pinned: list[str]) -> CachedAdapter:
        entry = self.cache.get(name, pinned=pinned)
        meta = entry.adapter.metadata
        if (name, entry.sha256) not in self._checked:
            # Family first (its message names both families), then LoRA shapes and embedding widths: a clear error
            # here rather than a failure deep inside peft. Once per file content, not per request.
            if meta.family != self.family.name:
                raise FamilyMismatchError(
                    f"adapter '{name}' is for {meta.family} but the base model '{self.base_model.name}' is "
                    f"{self.family.name}"
                )
            check_compatible(entry.adapter, self.base_model, source=f"adapter '{name}'")
            self._checked.add((name, entry.sha256))
        if meta.kind not in (LORA, TEXTUAL_INVERSION) and kind_factory(meta.kind) is None:
            known = ", ".join([LORA, TEXTUAL_INVERSION, *registered_kinds()])
            raise NotAvailableError(
                f"adapter '{name}' is a {meta.kind} adapter; this studio can generate with {known} adapters"
            )
        if meta.base_fingerprint and meta.base_fingerprint != self.fingerprint:
            logger.info(
                "adapter '%s' was trained on base %s (%s); using it with %s (%s)",
                name,
                meta.base_model or "?",
                meta.base_fingerprint,
                self.base_model.name,
                self.fingerprint,
            )
        return entry

    def _kind(self, entry: CachedAdapter) -> ConditioningKind:
        kind = self._kinds.get(entry.name)
        if kind is None:
            factory = kind_factory(entry.kind)
            if factory is None:  # unregistered since it was resolved
                raise NotAvailableError(f"adapter '{entry.name}' is a {entry.kind} adapter, which is not available")
            kind = factory(entry.adapter, self.base_model)
            self._kinds[entry.name] = kind
        return kind

    def _prompt_words(self, text: str, adapters: Sequence[tuple[Any, CachedAdapter]]) -> str:
        """``text`` with the words that conditioning adapters write into a prompt (`ConditioningKind`'s optional
        ``rewrite_prompt``: a preference's guided size, on `tiny`), in request order."""
        for ref, entry in adapters:
            rewrite = getattr(self._kind(entry), "rewrite_prompt", None)
            if rewrite is not None and text:
                text = rewrite(text, ref)
        return text

    def _prepare_kind(
        self, entry: CachedAdapter, ref: Any, request: GenerationRequest, prompt: str, negative_prompt: str
    ) -> ConditioningState:
        kind = self._kind(entry)
        unet = self.pipeline.unet
        return kind.prepare(
            ConditioningRequest(
                ref=ref,
                prompt=prompt,
                negative_prompt=negative_prompt,
                pipeline=self.pipeline,
                family=self.family,
                layer_names=self.layer_names,
                device=self.device,
                dtype=unet.dtype,
                steps=request.steps,
                guidance=request.guidance,
                classifier_free_guidance=request.guidance > 1.0,
            )
        )

    def _region_state(
        self, layout: str, parts: list[str], base: tuple[str, float] | None, width: int, height: int
    ) -> ConditioningState:
        """Each part's positive states (encoded as the pipeline encodes a prompt) and the stripes they apply to;
        a base part covers the whole image with its ratio, the stripes share the rest."""
        prompts = parts + ([base[0]] if base else [])
        states = [encoded[0] for encoded in self._encode_parts(prompts)]
        scale = int(self.pipeline.vae_scale_factor)
        stripes = region_masks(layout, len(parts), height // scale, width // scale)
        if base is None:
            return _Regions(RegionStates(states, stripes))
        ratio = base[1]

        def masks(length: int) -> torch.Tensor:
            inner = stripes(length) * (1.0 - ratio)
            return torch.cat([inner, torch.full_like(inner[:1], ratio)])

        return _Regions(RegionStates(states, masks))

    def _latent_regions(
        self, request: GenerationRequest, parts: list[str], entries: Sequence[CachedAdapter], width: int, height: int
    ) -> LatentRegions:
        """One U-Net view per region (`pipelines.latent_regions`), with each region's LoRA when LoRAs have regions."""
        loras: list[AdapterRef] = []
        for ref, entry in zip(request.adapters, entries, strict=True):
            if REGION_OPTION in ref.options and entry.kind != LORA:
                raise InvalidInputError(
                    f"adapter '{ref.name}' is a {entry.kind} adapter; the option {REGION_OPTION} is for LoRA adapters "
                    "(put a token in a region by writing it in that region's part of the prompt)"
                )
            if entry.kind == LORA and ref.weight != 0:
                loras.append(ref)
        lora_names: list[str | None] | None = None
        if any(REGION_OPTION in ref.options for ref in loras):
            # peft's mixed batches give each row one adapter: a region runs with at most one LoRA.
            lora_names = []
            for number in range(1, len(parts) + 1):
                here = [ref.name for ref in loras if int(ref.options.get(REGION_OPTION, number)) == number]
                if len(here) > 1:
                    raise NotAvailableError(
                        f"region {number} would use the LoRAs {', '.join(here)}; when LoRAs are given regions, "
                        "more than one LoRA in one region is not available yet"
                    )
                lora_names.append(self._loras.pipeline_name(here[0]) if here else None)
            in_text = {
                name
                for component, names in self.pipeline.get_list_adapters().items()
                if component.startswith("text_encoder")
                for name in names
            }
            for ref in loras:
                if REGION_OPTION in ref.options and self._loras.pipeline_name(ref.name) in in_text:
                    raise NotAvailableError(
                        f"LoRA '{ref.name}' also changes the text encoder; giving such a LoRA a region is not "
                        "available yet"
                    )
        encodings = self._encode_parts(parts)
        states = [encoded[0] for encoded in encodings]
        pooled = [encoded[2] if len(encoded) > 2 else None for encoded in encodings]  # SDXL's pooled embedding
        scale = int(self.pipeline.vae_scale_factor)
        unet = self.pipeline.unet
        views = region_views(
            request.regions or "columns",
            len(parts),
            height=height // scale,
            width=width // scale,
            native=int(unet.config.sample_size),
        )
        guided = request.guidance > 1.0 and getattr(unet.config, "time_cond_proj_dim", None) is None
        return LatentRegions(unet, views, states, guided=guided, pooled=pooled, lora_names=lora_names)

    def _encode_parts(self, prompts: list[str]) -> list[tuple[Any, ...]]:
        """Each prompt encoded as the pipeline encodes a positive prompt: ``encode_prompt``'s tuple, no CFG half."""
        with torch.no_grad():
            return [
                self.pipeline.encode_prompt(
                    prompt=prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
                )
                for prompt in prompts
            ]

    def _truncation_warnings(self, named: list[tuple[str, str]]) -> list[str]:
        warnings = []
        tokenizer = self.family.tokenizers(self.pipeline)[0]
        limit = int(tokenizer.model_max_length)
        for what, text in named:
            count = len(tokenizer(text, truncation=False).input_ids)
            if count > limit:
                warnings.append(f"the {what} is {count} tokens; the text encoder reads {limit}, the rest is ignored")
        return warnings

    def _fresh_scheduler(self, name: str | None) -> Any:
        if name in (None, "default"):
            return self._scheduler_class.from_config(self._scheduler_config)
        cls, overrides = SCHEDULERS[name]
        return cls.from_config(self._scheduler_config, **overrides)

    def _default_name(self) -> str:
        for name, (cls, overrides) in SCHEDULERS.items():
            if cls is self._scheduler_class and not overrides:
                return name
        return self._scheduler_class.__name__

    def _forget(self, entry: CachedAdapter) -> None:
        """Called by the cache when an adapter leaves RAM: take it out of the pipeline as well."""
        self._loras.remove(entry.name)
        self._embeddings.release(entry.name)
        self._kinds.pop(entry.name, None)
        self._checked = {key for key in self._checked if key[0] != entry.name}


# device -> (base model spec, home root, service): one warm base model per device in this process.
_SHARED: dict[str, tuple[str, str, PipelineService]] = {}
_SHARED_LOCK = threading.Lock()


def default_device() -> str:
    """The device a service uses when none is named: the first CUDA GPU if there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def shared_service(base_model: str, home: StudioHome, *, device: str | None = None) -> PipelineService:
    """The warm service of a device in this process, for base model spec ``base_model`` and ``home``'s library.

    The UI, the CLI and sample previews ask here instead of building their own, so the base model is loaded once
    and adapters stay cached between requests. Asking for another base model on the same device replaces the
    service (one base model per device keeps memory bounded).
    """
    from studio.base_models import load_base_model  # heavy; only when a service is first made

    device_key = str(torch.device(device or default_device()))
    with _SHARED_LOCK:
        current = _SHARED.get(device_key)
        if current is not None and current[:2] == (base_model, str(home.root)):
            return current[2]
        if current is not None:
            current[2].close()
            del _SHARED[device_key]
        service = PipelineService(load_base_model(base_model), device_key, adapter_source=AdapterLibrary(home))
        _SHARED[device_key] = (base_model, str(home.root), service)
        return service


def _placeholders(entry: CachedAdapter) -> list[str]:
    return list(entry.adapter.metadata.placeholder_tokens)


def _no_adapters(name: str) -> Path:
    raise NotFoundError(f"expected an adapter named '{name}', but this pipeline has no adapter library")


class _Regions(ConditioningState):
    """Regional prompting for one request: the same region states for every cross-attention call."""

    def __init__(self, regions: RegionStates) -> None:
        self.regions = regions

    def region_states(self, call: LayerCall) -> RegionStates | None:
        """Every call of the request reads the regions."""
        return self.regions
