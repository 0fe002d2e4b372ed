"""The ``preference`` adapter kind: a user's taste in the shared pipeline, through the conditioning seam.

A preference adapter file holds one of three things (``studio.config["mode"]``):

- ``user``: a user embedding, ``preference.tokens`` ``[n, width]`` (``width`` = the U-Net's cross-attention width),
  that every cross-attention layer attends to through a second, decoupled key/value projection whose output is added,
  scaled, to the text attention output (IP-Adapter's decoupled cross-attention, PPD's way in). The projections are
  ``preference.layers.<i>.to_k.weight`` / ``.to_v.weight`` when the adapter trained them, else copies of the layer's
  own ``to_k``/``to_v`` taken when the adapter is first used. Tokens that started from attribute phrases come in
  groups (``studio.config["attribute_groups"]``, ``tokens_per_attribute`` rows each); a request zeroes the group of
  an attribute its prompt's own words decide (`attribute_token_mask`), as attribute guidance leaves such attributes
  out, so the prompt wins over the taste. The branch conditions the positive (prompt) rows only;
  the unconditional rows of classifier-free guidance stay the base model's, as IP-Adapter's zero image embedding
  does, so guidance pushes towards the user's taste. What a taste says that tokens do not draw (a size, on `tiny`)
  a user file names as ``prompt_words``: each request writes them into the prompt the pipeline encodes where the
  prompt leaves their slot open (`insert_words`, `PreferenceKind.rewrite_prompt`). Files written before that name
  ``liked``/``disliked`` attributes (with ``attribute_scale``), applied as the ``attributes`` mode's guidance term
  beside the tokens (`UserTasteState`).
- ``population``: a PPD model (shared projections + an encoder from a user's pairs to their tokens). Not used for
  generation directly: `trainers.preference.embed_user` turns 4 pairs of a new user into a ``user`` adapter.
- ``attributes``: ViPer-style attribute guidance, no weights: liked and disliked attribute lists. Guidance becomes
  ``eps = eps_u + w * (eps_text + s * eps_liked - eps_u - s * eps_disliked)`` with ``s`` = ``attribute_scale``
  (0.85). See `AttributeGuidanceState` for how that is done over the stock pipeline.

Request options (``AdapterRef``): the branch scale is ``weight * strength`` (``strength`` defaults to 1; 0 gives the
base model's images bit for bit, guided attributes included); ``attribute_scale`` overrides ``s``. Two users in one
request add their branches (each with its own scale); for PPD's embedding interpolation make a mixed adapter with
`interpolate_preferences`.

Importing this module registers the kind with the seam (`register_kind`).

>>> from pipelines.requests import AdapterRef
>>> AdapterRef.parse("alice:strength=0.7").options
{'strength': 0.7}
"""

from __future__ import annotations

import hashlib
import random
import re
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pipelines.kinds.conditioning import (
    ConditionedAttnProcessor,
    ConditioningContext,
    ConditioningRequest,
    ConditioningState,
    ExtraTokens,
    KeyValueStates,
    LayerCall,
    register_kind,
)
from studio.adapter_files import AdapterFile, AdapterMetadata
from studio.errors import InvalidInputError

KIND = "preference"
TOKENS_KEY = "preference.tokens"
LAYER_PREFIX = "preference.layers."
ENCODER_PREFIX = "preference.encoder."
MODES = ("user", "population", "attributes", "branch")
DEFAULT_ATTRIBUTE_SCALE = 0.85


# -- the decoupled branches ---------------------------------------------------------------------------------------

BRANCH_ATTENTIONS = ("separate", "joint")


def branch_attention(config: dict[str, Any]) -> str:
    """How a preference file's branch attends (``studio.config["branch_attention"]``): ``separate`` (a softmax over
    the extra tokens alone, IP-Adapter's way, and the reading of files that do not say) or ``joint`` (a softmax that
    also spans the prompt's keys, `ExtraTokens.joint`)."""
    value = config.get("branch_attention", "separate")
    if value not in BRANCH_ATTENTIONS:
        raise InvalidInputError(f"expected branch_attention in {', '.join(BRANCH_ATTENTIONS)}, found {value!r}")
    return str(value)


def layer_attention(unet: nn.Module, layer_name: str) -> nn.Module:
    """The ``Attention`` module behind a cross-attention processor name (``...attn2.processor``)."""
    return unet.get_submodule(layer_name.removesuffix(".processor"))


def _base_linear(module: nn.Module) -> nn.Linear:
    # A peft-wrapped projection keeps the original weight in ``base_layer``: copy that, not the LoRA-adapted one.
    return getattr(module, "base_layer", module)


class PreferenceBranches(nn.Module):
    """One decoupled ``to_k``/``to_v`` pair per cross-attention layer, in layer-index order.

    >>> from studio.testing import build_tiny_sd1_pipeline
    >>> from studio.families import SD1
    >>> unet = build_tiny_sd1_pipeline().unet
    >>> branches = PreferenceBranches.from_unet(unet, SD1.cross_attention_layers(unet))
    >>> len(branches.to_k) == len(SD1.cross_attention_layers(unet))
    True
    """

    def __init__(self, to_k: Sequence[nn.Linear], to_v: Sequence[nn.Linear], *, joint: bool = False) -> None:
        super().__init__()
        self.to_k = nn.ModuleList(to_k)
        self.to_v = nn.ModuleList(to_v)
        # Whether the branch's softmax also runs over the prompt's keys (`ExtraTokens.joint`); a property of how the
        # projections were trained, recorded in the file header as ``branch_attention``.
        self.joint = joint

    @property
    def width(self) -> int:
        """The token width the branches read (the U-Net's cross-attention width)."""
        return int(self.to_k[0].in_features)

    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        layer_names: Sequence[str],
        tensors: dict[str, torch.Tensor] | None = None,
        *,
        joint: bool = False,
    ) -> PreferenceBranches:
        """Copies of each layer's ``to_k``/``to_v``, replaced by ``tensors[preference.layers.<i>.*]`` if given."""
        to_k, to_v = [], []
        for name in layer_names:
            attn = layer_attention(unet, name)
            for source, out in ((_base_linear(attn.to_k), to_k), (_base_linear(attn.to_v), to_v)):
                layer = nn.Linear(source.in_features, source.out_features, bias=source.bias is not None)
                layer.to(device=source.weight.device, dtype=source.weight.dtype)
                with torch.no_grad():
                    layer.weight.copy_(source.weight)
                    if source.bias is not None:
                        layer.bias.copy_(source.bias)
                out.append(layer)
        branches = cls(to_k, to_v, joint=joint).requires_grad_(False)
        if tensors:
            branches.load_layer_tensors(tensors)
        return branches

    def layer_tensors(self) -> dict[str, torch.Tensor]:
        """The projections in the adapter layout (``preference.layers.<i>.to_k.weight``, ...)."""
        out = {}
        for index, (to_k, to_v) in enumerate(zip(self.to_k, self.to_v, strict=True)):
            for part, module in (("to_k", to_k), ("to_v", to_v)):
                for param_name, value in module.named_parameters():
                    out[f"{LAYER_PREFIX}{index}.{part}.{param_name}"] = value.detach()
        return out

    def load_layer_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the projections from adapter tensors; shapes and layer count must match the U-Net."""
        own = self.layer_tensors()
        given = {key: value for key, value in tensors.items() if key.startswith(LAYER_PREFIX)}
        if set(given) != set(own):
            raise InvalidInputError(
                f"expected decoupled projections for {len(self.to_k)} cross-attention layers ({len(own)} tensors), "
                f"found {len(given)} tensors"
            )
        for key, value in given.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise InvalidInputError(
                    f"preference projection {key} is {list(value.shape)} but the base model needs "
                    f"{list(own[key].shape)}"
                )
        with torch.no_grad():
            for key, param in zip(own, self._parameters_in_order(), strict=True):
                param.copy_(given[key].to(param.dtype))

    def _parameters_in_order(self) -> list[nn.Parameter]:
        params = []
        for to_k, to_v in zip(self.to_k, self.to_v, strict=True):
            params.extend(p for _, p in to_k.named_parameters())
            params.extend(p for _, p in to_v.named_parameters())
        return params


class UserTokensState(ConditioningState):
    """The extra-token branch of one user embedding on every cross-attention layer.

    ``tokens`` is ``[n, width]`` (one user) or ``[batch, n, width]`` (one user per row, in training). With
    ``positive_rows_only`` and a batch of ``[negative; positive]`` rows, the negative rows get zero tokens: with the
    bias-free projections of SD-style U-Nets the branch then adds exactly nothing to them. ``groups``: the tokens are
    that many attribute groups, each attended on its own (`ExtraTokens`).

    ``windows`` (one per group, or none): the share of the noise schedule, ``(low, high)`` in ``[0, 1]`` of
    ``num_train_timesteps``, in which a group acts; outside it the group's tokens are zero. Denoising decides an
    image's layout and background at high noise and an object's colour and texture at low noise, and an attribute
    that acts where it is not decided disturbs what is (on `tiny`, a colour's tokens at high noise shrank the
    object and missed the colour more often; `bench/calibrate_preference.py` measures each attribute's window).
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        branches: PreferenceBranches,
        scale: float,
        *,
        positive_rows_only: bool = False,
        groups: int = 1,
        windows: Sequence[tuple[float, float]] = (),
        train_timesteps: int = 1000,
    ) -> None:
        self.tokens = tokens if tokens.dim() == 3 else tokens.unsqueeze(0)
        self.branches = branches
        self.scale = float(scale)
        self.positive_rows_only = positive_rows_only
        self.groups = groups
        if windows and len(windows) != groups:
            raise ValueError(f"expected one timestep window per attribute group ({groups}), found {len(windows)}")
        self.windows = [(float(low), float(high)) for low, high in windows]
        self._low = torch.tensor([low for low, _ in self.windows])
        self._high = torch.tensor([high for _, high in self.windows])
        self.train_timesteps = train_timesteps
        # Every cross-attention layer of one U-Net call sees the same timestep: window the tokens once per call.
        self._windowed: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _in_windows(self, tokens: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor | None:
        """``tokens`` with the groups outside their window zeroed at ``timestep`` (one value, or one per row);
        ``None`` when no group acts."""
        if self._windowed is not None and self._windowed[0] is timestep:
            return self._windowed[1]
        share = timestep.detach().reshape(-1, 1).float().cpu() / self.train_timesteps
        active = (share >= self._low) & (share <= self._high)  # [1 or rows, groups]
        windowed: torch.Tensor | None = tokens
        if not bool(active.any()):
            windowed = None
        elif not bool(active.all()):
            per_token = active.repeat_interleave(tokens.shape[-2] // self.groups, dim=1)
            windowed = tokens * per_token[..., None].to(device=tokens.device, dtype=tokens.dtype)
        self._windowed = (timestep, windowed)
        return windowed

    def extra_tokens(self, call: LayerCall) -> ExtraTokens | None:
        if self.scale == 0.0:
            return None
        tokens = self.tokens
        batch = call.encoder_hidden_states.shape[0]
        if self.positive_rows_only and batch % 2 == 0:
            tokens = tokens.expand(batch // 2, -1, -1) if tokens.shape[0] == 1 else tokens
            tokens = torch.cat([torch.zeros_like(tokens), tokens])
        if self.windows and call.timestep is not None:
            windowed = self._in_windows(tokens, call.timestep)
            if windowed is None:
                return None
            tokens = windowed
        index = call.layer_index
        return ExtraTokens(
            tokens,
            self.branches.to_k[index],
            self.branches.to_v[index],
            scale=self.scale,
            joint=self.branches.joint,
            groups=self.groups,
        )


# -- attribute guidance -------------------------------------------------------------------------------------------


def clean_attributes(liked: Sequence[str], disliked: Sequence[str]) -> tuple[list[str], list[str]]:
    """Strip, drop empties and duplicates, and drop keywords found in both lists (ViPer's rule).

    >>> clean_attributes(["red", " large ", "red", "dark"], ["dark", "small"])
    (['red', 'large'], ['small'])
    """

    def unique(items: Sequence[str]) -> list[str]:
        seen: dict[str, None] = {}
        for item in items:
            if not isinstance(item, str):
                raise InvalidInputError(f"expected attributes as text, found {item!r}")
            if item.strip():
                seen.setdefault(item.strip(), None)
        return list(seen)

    liked_set, disliked_set = unique(liked), unique(disliked)
    both = set(liked_set) & set(disliked_set)
    return [a for a in liked_set if a not in both], [a for a in disliked_set if a not in both]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower())) - _FILLER


# Words that say nothing about what an attribute is about (so they never make two phrases overlap).
_FILLER = frozenset({"a", "an", "the", "of", "on", "in", "with", "and", "at", "to", "style", "very"})


# Common colour names: a bare colour attribute ("red") is about the colour of the prompt's subject.
_COLOUR_WORDS = frozenset(
    "red orange yellow green blue purple violet pink brown black white gray grey cyan magenta teal gold silver "
    "beige turquoise".split()
)


def attributes_for_prompt(attributes: Sequence[str], prompt: str, nouns: Sequence[str] = ()) -> list[str]:
    """The attributes that do not touch what the prompt's own words decide.

    An attribute sharing a word with the prompt ("striped background" for "a circle on a blue background", "red" for
    "a red circle") is about something the prompt already names; guiding towards or away from it would override
    the prompt, so it is left out for that prompt (the prompt's words win over the taste). A bare colour ("blue")
    is about the subject's colour: it is left out when the prompt gives a colour to something other than the
    ``nouns`` that the user's other attributes are about (``background`` in "black background"), i.e. to the
    subject. Likewise a bare size ("small") is left out when the prompt names any size ("a large circle").

    >>> taste = ["black background", "large", "blue"]
    >>> attributes_for_prompt(taste, "a red circle on a white background", ["background"])
    ['large']
    >>> attributes_for_prompt(taste, "a circle on a white background", ["background"])
    ['large', 'blue']
    >>> attributes_for_prompt(taste, "a red circle", ["background"])
    ['black background', 'large']
    >>> attributes_for_prompt(["small"], "a large circle")
    []
    """
    named = _words(prompt)
    order = re.findall(r"[a-z0-9]+", prompt.lower())
    coloured = {word for colour, word in zip(order, order[1:], strict=False) if colour in _COLOUR_WORDS}
    subject_coloured = bool(coloured - set(nouns))
    kept = []
    for attribute in attributes:
        words = _words(attribute)
        if words & named or (subject_coloured and words and words <= _COLOUR_WORDS):
            continue
        if words and words <= _SIZE_WORDS and named & _SIZE_WORDS:
            continue
        kept.append(attribute)
    return kept


_SIZE_WORDS = frozenset({"large", "small", "big", "tiny", "huge"})


_ARTICLES = frozenset({"a", "an", "the"})


def insert_words(prompt: str, words: Sequence[str]) -> str:
    """``prompt`` with ``words`` as adjectives of its subject: after the article that opens the subject's phrase
    (the first article, unless its phrase is a frame such as "a photo of ..."), the article made to agree; with no
    article, in front.

    >>> insert_words("a red circle on a blue background", ["large"])
    'a large red circle on a blue background'
    >>> insert_words("an orange square", ["large"]), insert_words("A photo of an owl", ["small"])
    ('a large orange square', 'A photo of a small owl')
    >>> insert_words("red circle", ["large"]), insert_words("a circle", [])
    ('large red circle', 'a circle')
    """
    if not words:
        return prompt
    phrase = " ".join(words)
    tokens = prompt.split(" ")
    lowered = [token.lower() for token in tokens]
    at = next(
        (
            i
            for i, token in enumerate(lowered)
            if token in _ARTICLES and not (i + 2 < len(lowered) and lowered[i + 2] == "of")
        ),
        None,
    )
    if at is None:
        return f"{phrase} {prompt}"
    if lowered[at] in ("a", "an"):
        article = "an" if phrase[:1].lower() in "aeiou" else "a"
        tokens[at] = article.capitalize() if tokens[at][:1].isupper() else article
    tokens.insert(at + 1, phrase)
    return " ".join(tokens)


def attribute_slot(attribute: str) -> str:
    """What an attribute is a choice of: attributes of one slot are alternatives (a subject has one colour).

    >>> [attribute_slot(a) for a in ["red", "black background", "striped background", "large", "vintage"]]
    ['colour', 'background', 'background', 'size', 'vintage']
    """
    words = attribute.lower().split()
    if len(words) > 1:
        return words[-1]
    if words and words[0] in _COLOUR_WORDS:
        return "colour"
    if words and words[0] in _SIZE_WORDS:
        return "size"
    return attribute.lower()


def attribute_windows(config: dict[str, Any], groups: Sequence[str], source: str) -> list[tuple[float, float]]:
    """The timestep windows of ``groups`` in an adapter's ``attribute_timesteps`` (one ``[low, high]`` share of the
    noise schedule per group; absent: every group acts at every step, ``[]``), checked.

    >>> attribute_windows({"attribute_timesteps": [[0.0, 0.6], [0.5, 1.0]]}, ["red", "black background"], "x")
    [(0.0, 0.6), (0.5, 1.0)]
    """
    given = config.get("attribute_timesteps")
    if not given:
        return []
    if not isinstance(given, list) or len(given) != len(groups):
        raise InvalidInputError(
            f"expected {source}'s attribute_timesteps as one [low, high] per attribute group ({len(groups)}), "
            f"found {given!r}"
        )
    windows = []
    for window in given:
        numbers = isinstance(window, list) and len(window) == 2 and all(isinstance(v, int | float) for v in window)
        if not (numbers and 0.0 <= float(window[0]) <= float(window[1]) <= 1.0):
            raise InvalidInputError(
                f"expected {source}'s attribute_timesteps as [low, high] shares with 0 <= low <= high <= 1, "
                f"found {window!r}"
            )
        windows.append((float(window[0]), float(window[1])))
    return windows


def attribute_nouns(attributes: Sequence[str]) -> list[str]:
    """What multi-word attributes are about: their last word ("background" of "black background")."""
    return list(dict.fromkeys(attribute.split()[-1].lower() for attribute in attributes if len(attribute.split()) > 1))


def attribute_token_mask(
    attributes: Sequence[str], prompt: str, tokens_per_attribute: int, nouns: Sequence[str] = ()
) -> torch.Tensor:
    """``[len(attributes) * tokens_per_attribute]``: 1 for the token rows of attributes ``prompt`` leaves open, 0
    for those of attributes its own words decide (`attributes_for_prompt`; ``nouns`` default to the attributes').

    >>> attribute_token_mask(["black background", "red"], "a circle on a white background", 2).tolist()
    [0.0, 0.0, 1.0, 1.0]
    """
    kept = set(attributes_for_prompt(attributes, prompt, list(nouns) or attribute_nouns(attributes)))
    return torch.tensor([float(a in kept) for a in attributes for _ in range(tokens_per_attribute)])


def _shuffled(attributes: list[str], prompt: str) -> str:
    # ViPer shuffles the lists per prompt; seeding from the prompt keeps "same request, same image".
    order = list(attributes)
    random.Random(hashlib.sha256(prompt.encode()).hexdigest()).shuffle(order)
    return ", ".join(order)


class AttributeGuidanceState(ConditioningState):
    """ViPer guidance over the stock pipeline: a key/value-state change plus one extra U-Net pass per step.

    Choice (documented because it is not obvious): the pipeline is not copied. With guidance the pipeline runs the
    U-Net on ``[negative; positive]`` rows and combines ``n + w * (p - n)``.

    1. Through the seam, the cross-attention states of the positive rows get ``+ s * E(liked)`` and those of the
       negative rows ``+ s * E(disliked)`` (cross-attention is the only place the U-Net reads them), so the
       pipeline's call yields ``p = eps_text+liked`` and ``n = eps_u+disliked``.
    2. A U-Net forward hook runs the U-Net once more on the negative rows with the plain states (``eps_u``) and hands
       the pipeline ``[eps_u; eps_u + p - n]``. The pipeline's own combination then gives
       ``eps_u + w * (p - n)``, ViPer's guidance. With no disliked attributes ``n == eps_u`` and the pass is skipped.
    """

    def __init__(self, liked: torch.Tensor | None, disliked: torch.Tensor | None, scale: float) -> None:
        self.liked = liked
        self.disliked = disliked
        self.scale = float(scale)
        self.in_extra_pass = False

    @property
    def needs_extra_pass(self) -> bool:
        """Whether the unconditional prediction must be recomputed without the disliked attributes."""
        return self.disliked is not None and self.scale != 0.0

    def key_value_states(self, call: LayerCall) -> KeyValueStates | None:
        if self.in_extra_pass or self.scale == 0.0 or (self.liked is None and self.disliked is None):
            return None
        states = call.encoder_hidden_states
        half = states.shape[0] // 2
        negative, positive = states[:half], states[half:]
        if self.liked is not None:
            positive = positive + self.scale * self.liked.to(positive.dtype)
        if self.disliked is not None:
            negative = negative + self.scale * self.disliked.to(negative.dtype)
        changed = torch.cat([negative, positive])
        return KeyValueStates(changed, changed)


class UserTasteState(AttributeGuidanceState):
    """A user's tokens together with ViPer guidance for the attributes the user adapter guides rather than draws
    with tokens (``liked``/``disliked`` in a ``user`` file's config, `trainers.preference.GUIDED_KEY`): on `tiny`
    an attribute branch's tokens cannot draw a size, while guidance with its word can. The extra pass computes
    the unconditional prediction with no conditioning at all (`_ensure_guidance_hook`), so the tokens, which act
    on the positive rows only, never leak into it."""

    def __init__(
        self, user: UserTokensState, liked: torch.Tensor | None, disliked: torch.Tensor | None, scale: float
    ) -> None:
        super().__init__(liked, disliked, scale)
        self.user = user

    def extra_tokens(self, call: LayerCall) -> ExtraTokens | None:
        # The extra pass runs with no state active (`_ensure_guidance_hook`), so this is never asked there.
        return self.user.extra_tokens(call)


def combine_attribute_guidance(
    eps_u: torch.Tensor, eps_positive: torch.Tensor, eps_negative: torch.Tensor
) -> torch.Tensor:
    """The ``[uncond; text]`` rows to hand the pipeline so that ``uncond + w * (text - uncond)`` equals
    ``eps_u + w * (eps_positive - eps_negative)`` for every ``w``."""
    return torch.cat([eps_u, eps_u + eps_positive - eps_negative])


_HOOKED: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def _seam_context(unet: nn.Module, layer_names: Sequence[str]) -> ConditioningContext:
    processor = unet.attn_processors.get(layer_names[0]) if layer_names else None
    if not isinstance(processor, ConditionedAttnProcessor):
        raise InvalidInputError("attribute guidance needs the conditioning seam installed on the U-Net")
    return processor.context


def _rows(value: Any, batch: int, half: int) -> Any:
    """``value`` with its first ``half`` rows where it is batched (tensors and dicts of them), else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[:half]
    if isinstance(value, dict):
        return {key: _rows(item, batch, half) for key, item in value.items()}
    return value


def _ensure_guidance_hook(unet: nn.Module, context: ConditioningContext) -> None:
    """Put the extra-pass hook on ``unet`` once; it does nothing unless an `AttributeGuidanceState` is active."""
    if unet in _HOOKED:
        return

    def extra_pass(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        combined = context.state
        states = [s for s in getattr(combined, "states", ()) if isinstance(s, AttributeGuidanceState)]
        active = [s for s in states if s.needs_extra_pass and not s.in_extra_pass]
        if not active:
            return None
        sample = args[0] if args else kwargs["sample"]
        batch = sample.shape[0]
        if batch % 2:
            return None  # no guidance batch: nothing to recombine
        half = batch // 2
        for state in active:
            state.in_extra_pass = True
        # eps_u is the negative rows' plain prediction: no state may act in this pass (a user's tokens, composed
        # in the same request, would otherwise read the negative rows as a batch of their own and condition them).
        context.state = None
        try:
            eps_u = module(
                *[_rows(a, batch, half) for a in args], **{k: _rows(v, batch, half) for k, v in kwargs.items()}
            )
        finally:
            context.state = combined
            for state in active:
                state.in_extra_pass = False
        eps_u = eps_u[0] if isinstance(eps_u, tuple) else eps_u.sample
        predicted = output[0] if isinstance(output, tuple) else output.sample
        guided = combine_attribute_guidance(eps_u, predicted[half:], predicted[:half])
        if isinstance(output, tuple):
            return (guided, *output[1:])
        output.sample = guided
        return output

    _HOOKED[unet] = unet.register_forward_hook(extra_pass, with_kwargs=True)


def _encode_text(pipeline: Any, text: str, device: torch.device) -> torch.Tensor:
    # The pipeline's own encoder (SD1/SD2/SDXL alike); first output is the cross-attention states.
    with torch.no_grad():
        encoded = pipeline.encode_prompt(
            prompt=text, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    return encoded[0]


# -- the kind -----------------------------------------------------------------------------------------------------


def branch_scale(ref: Any) -> float:
    """A request's scale of a user's branch: ``weight * strength`` (0: the base model)."""
    return float(ref.weight) * float(dict(ref.options).get("strength", 1.0))


class PreferenceKind:
    """A preference adapter in the shared pipeline, built once per cached adapter (see the module docstring)."""

    def __init__(self, adapter: AdapterFile, base_model: Any) -> None:
        config = adapter.metadata.config
        self.mode = config.get("mode")
        if self.mode not in MODES:
            raise InvalidInputError(f"expected a preference mode in {', '.join(MODES)}, found {self.mode!r}")
        self.name = adapter.metadata.name or str(config.get("user_id", "preference"))
        self.branches: PreferenceBranches | None = None
        self.tokens: torch.Tensor | None = None
        self.groups: list[str] = []
        if self.mode == "user":
            unet = base_model.pipeline.unet
            layer_names = base_model.family.cross_attention_layers(unet)
            tokens = adapter.tensors.get(TOKENS_KEY)
            if tokens is None or tokens.dim() != 2:
                raise InvalidInputError(f"expected {TOKENS_KEY} as [tokens, width] in preference '{self.name}'")
            self.branches = PreferenceBranches.from_unet(
                unet, layer_names, _layer_tensors(adapter.tensors), joint=branch_attention(config) == "joint"
            )
            if tokens.shape[1] != self.branches.width:
                raise InvalidInputError(
                    f"preference '{self.name}' has tokens of width {tokens.shape[1]} but the base model's "
                    f"cross-attention reads width {self.branches.width}"
                )
            self.tokens = tokens
            self.groups = [str(a) for a in config.get("attribute_groups", [])]
            self.group_nouns = [str(n) for n in config.get("attribute_nouns", [])]
            self.tokens_per_attribute = int(config.get("tokens_per_attribute", 0))
            if self.groups and len(self.groups) * self.tokens_per_attribute != tokens.shape[0]:
                raise InvalidInputError(
                    f"preference '{self.name}' has {tokens.shape[0]} tokens but {len(self.groups)} attribute groups "
                    f"of {self.tokens_per_attribute}"
                )
            self.windows = attribute_windows(config, self.groups, f"preference '{self.name}'")
            self.train_timesteps = int(getattr(base_model.pipeline.scheduler.config, "num_train_timesteps", 1000))
        self.liked, self.disliked = clean_attributes(config.get("liked", []), config.get("disliked", []))
        self.attribute_scale = float(config.get("attribute_scale", DEFAULT_ATTRIBUTE_SCALE))
        self.prompt_words, _ = clean_attributes(config.get("prompt_words", []), [])

    def rewrite_prompt(self, prompt: str, ref: Any) -> str:
        """A user's ``prompt_words`` written into ``prompt`` where its own words leave their slot open
        (`attributes_for_prompt`, `insert_words`); none at strength 0 or ``attribute_scale=0``."""
        if self.mode != "user" or not self.prompt_words or branch_scale(ref) == 0.0:
            return prompt
        if float(ref.options.get("attribute_scale", 1.0)) == 0.0:
            return prompt
        return insert_words(prompt, attributes_for_prompt(self.prompt_words, prompt))

    def prepare(self, request: ConditioningRequest) -> ConditioningState:
        """This request's state: the user's token branch, or attribute guidance."""
        options = dict(request.ref.options)
        if self.mode == "population":
            raise InvalidInputError(
                f"preference '{self.name}' is a population model; embed a user from their pairs first "
                "(trainers.preference.embed_user or `studio train preference --set mode=embed`)"
            )
        if self.mode == "branch":
            raise InvalidInputError(
                f"preference '{self.name}' is an attribute branch; train a user on it first "
                "(`studio train preference --set branch=FILE ...`)"
            )
        if self.mode == "attributes":
            return self._attribute_state(request, float(options.get("attribute_scale", self.attribute_scale)))
        unknown = set(options) - {"strength", "attribute_scale"}
        if unknown:
            raise InvalidInputError(
                f"preference '{self.name}' takes the options strength and attribute_scale, found {sorted(unknown)}"
            )
        assert self.branches is not None and self.tokens is not None  # set for mode "user" in __init__
        self.branches.to(device=request.device, dtype=request.dtype)
        scale = branch_scale(request.ref)
        tokens = self.tokens
        if self.groups:
            mask = attribute_token_mask(self.groups, request.prompt, self.tokens_per_attribute, self.group_nouns)
            tokens = tokens * mask.to(tokens.dtype)[:, None]
        tokens = tokens.to(device=request.device, dtype=request.dtype)
        # Each attribute group attends on its own, as the branch learned it (one attribute per lesson).
        user = UserTokensState(
            tokens,
            self.branches,
            scale,
            positive_rows_only=request.classifier_free_guidance,
            groups=max(1, len(self.groups)),
            windows=self.windows,
            train_timesteps=self.train_timesteps,
        )
        # Guided attributes scale with the tokens (strength 0 is the base model) and need guidance to act in;
        # without it the tokens act alone.
        guided = scale * float(options.get("attribute_scale", self.attribute_scale))
        if not (self.liked or self.disliked) or guided == 0.0 or not request.classifier_free_guidance:
            return user
        liked, disliked = self._guidance_states(request)
        return UserTasteState(user, liked, disliked, guided)

    def _attribute_state(self, request: ConditioningRequest, scale: float) -> AttributeGuidanceState:
        unknown = set(request.ref.options) - {"attribute_scale"}
        if unknown:
            raise InvalidInputError(
                f"attribute preference '{self.name}' takes the option attribute_scale, found {sorted(unknown)}"
            )
        scale *= float(request.ref.weight)
        if not (self.liked or self.disliked) or scale == 0.0:
            return AttributeGuidanceState(None, None, 0.0)
        if not request.classifier_free_guidance:
            raise InvalidInputError(
                f"attribute preference '{self.name}' needs classifier-free guidance (guidance > 1), got "
                f"{request.guidance:g}"
            )
        return AttributeGuidanceState(*self._guidance_states(request), scale)

    def _guidance_states(self, request: ConditioningRequest) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The text states of the liked and disliked attributes this request's prompt leaves open (``None`` for
        an empty list), with the guidance hook in place."""
        pipeline = request.pipeline
        nouns = attribute_nouns([*self.liked, *self.disliked])
        liked_here = attributes_for_prompt(self.liked, request.prompt, nouns)
        disliked_here = attributes_for_prompt(self.disliked, request.prompt, nouns)
        liked = _encode_text(pipeline, _shuffled(liked_here, request.prompt), request.device) if liked_here else None
        disliked = (
            _encode_text(pipeline, _shuffled(disliked_here, request.prompt), request.device) if disliked_here else None
        )
        _ensure_guidance_hook(pipeline.unet, _seam_context(pipeline.unet, request.layer_names))
        return liked, disliked


def _layer_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    layers = {key: value for key, value in tensors.items() if key.startswith(LAYER_PREFIX)}
    return layers or None


register_kind(KIND, PreferenceKind)


# -- adapter values -----------------------------------------------------------------------------------------------


def attribute_preference(
    liked: Sequence[str],
    disliked: Sequence[str],
    *,
    family: str,
    user_id: str = "",
    attribute_scale: float = DEFAULT_ATTRIBUTE_SCALE,
) -> AdapterFile:
    """An ``attributes`` preference adapter (no weights) for a model family.

    >>> adapter = attribute_preference(["red", "large"], ["dark background"], family="sd1", user_id="alice")
    >>> adapter.metadata.config["liked"]
    ['red', 'large']
    """
    liked_clean, disliked_clean = clean_attributes(liked, disliked)
    config = {
        "mode": "attributes",
        "user_id": user_id,
        "liked": liked_clean,
        "disliked": disliked_clean,
        "attribute_scale": float(attribute_scale),
    }
    # safetensors files need a tensor; this one records the scale so the file is self-describing.
    tensors = {"preference.attribute_scale": torch.tensor([float(attribute_scale)])}
    return AdapterFile(tensors, AdapterMetadata(kind=KIND, family=family, config=config))


def interpolate_preferences(first: AdapterFile, second: AdapterFile, t: float) -> AdapterFile:
    """PPD's interpolation: a ``user`` adapter whose tokens are ``(1 - t) * first + t * second``.

    Both must be ``user`` adapters with the same token shape and the same projections (users of one population
    model, or per-user adapters on the base projections); ``t`` = 0 gives ``first``, 1 gives ``second`` exactly.
    """
    for adapter in (first, second):
        if adapter.metadata.kind != KIND or adapter.metadata.config.get("mode") != "user":
            raise InvalidInputError(
                f"expected two user preference adapters, found a {adapter.metadata.kind} adapter in mode "
                f"{adapter.metadata.config.get('mode')!r}"
            )
    a, b = first.tensors[TOKENS_KEY], second.tensors[TOKENS_KEY]
    if a.shape != b.shape:
        raise InvalidInputError(f"expected user tokens of one shape, found {list(a.shape)} and {list(b.shape)}")
    layers_a, layers_b = _layer_tensors(first.tensors) or {}, _layer_tensors(second.tensors) or {}
    if set(layers_a) != set(layers_b) or any(not torch.equal(layers_a[k], layers_b[k]) for k in layers_a):
        raise InvalidInputError(
            "expected two users with the same decoupled projections (one population model, or both on the base's)"
        )
    if t == 0.0:
        tokens = a.clone()
    elif t == 1.0:
        tokens = b.clone()
    else:
        tokens = torch.lerp(a.float(), b.float(), float(t)).to(a.dtype)
    config = {
        **first.metadata.config,
        "user_id": f"{first.metadata.config.get('user_id', '')}~{second.metadata.config.get('user_id', '')}@{t:g}",
        "interpolated": [first.metadata.config.get("user_id", ""), second.metadata.config.get("user_id", ""), t],
    }
    meta = AdapterMetadata(
        kind=KIND,
        family=first.metadata.family,
        base_model=first.metadata.base_model,
        base_fingerprint=first.metadata.base_fingerprint,
        config=config,
    )
    return AdapterFile({**layers_a, TOKENS_KEY: tokens}, meta)
