"""The conditioning seam, tested with fake kinds: processors know their layer, are fed per request, and leave no trace.

NeTI and preference adapters plug in here later; these fakes stand in for them. A fake registers under the
``preference`` kind (a kind adapter files may carry) and the previous factory is restored afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from test_pipeline_helpers import pixels, stock_image, tiny_base

from pipelines.kinds.conditioning import (
    ConditioningRequest,
    ConditioningState,
    ExtraTokens,
    KeyValueStates,
    LayerCall,
    kind_factory,
    region_masks,
    register_kind,
    unregister_kind,
)
from pipelines.requests import AdapterRef, GenerationRequest
from pipelines.service import PipelineService
from studio.adapter_files import AdapterFile, AdapterMetadata, save_adapter
from studio.base_models import BaseModel
from studio.testing import build_tiny_sdxl_pipeline, tiny_model_path

STEPS = 3
SIZE = 32
PROMPT = "a red circle"
KIND = "preference"


@dataclass
class FakeState(ConditioningState):
    """Records every call; replaces values at one layer, keys and values everywhere, or adds a token branch."""

    mode: str
    strength: float
    layer: int
    branches: dict[str, tuple[torch.nn.Linear, torch.nn.Linear]]
    calls: list[tuple[int, str, float, int]] = field(default_factory=list)

    def key_value_states(self, call: LayerCall) -> KeyValueStates | None:
        timestep = float(call.timestep.reshape(-1)[0])
        self.calls.append((call.layer_index, call.layer_name, timestep, call.encoder_hidden_states.shape[0]))
        states = call.encoder_hidden_states
        if self.mode == "identity":
            return KeyValueStates(states, states)
        if self.mode == "values" and call.layer_index == self.layer:
            return KeyValueStates(states, states * self.strength)
        return None

    def extra_tokens(self, call: LayerCall) -> ExtraTokens | None:
        if self.mode != "tokens":
            return None
        to_k, to_v = self.branches[call.layer_name]
        return ExtraTokens(torch.ones(1, 4, to_k.in_features), to_k, to_v, scale=self.strength)


class FakeKind:
    """Built once per cached adapter; makes a fresh state per request."""

    instances: list[FakeKind] = []

    def __init__(self, adapter: AdapterFile, base_model: BaseModel) -> None:
        self.mode = adapter.metadata.config["mode"]
        # A decoupled key/value projection per cross-attention layer, from the token width to the layer's width.
        unet = base_model.pipeline.unet
        torch.manual_seed(0)
        self.branches = {}
        for name in base_model.family.cross_attention_layers(unet):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            width = attn.cross_attention_dim
            self.branches[name] = (torch.nn.Linear(width, attn.inner_dim), torch.nn.Linear(width, attn.inner_dim))
        self.layers = adapter.tensors["layer"]
        self.requests: list[ConditioningRequest] = []
        self.states: list[FakeState] = []
        FakeKind.instances.append(self)

    def prepare(self, request: ConditioningRequest) -> FakeState:
        self.requests.append(request)
        state = FakeState(
            self.mode, float(request.ref.options.get("strength", 1.0)), int(self.layers[0]), self.branches
        )
        self.states.append(state)
        return state


@pytest.fixture
def fake_kind():
    previous = kind_factory(KIND)
    FakeKind.instances = []
    register_kind(KIND, FakeKind)
    yield FakeKind
    if previous is None:
        unregister_kind(KIND)
    else:
        register_kind(KIND, previous)


@pytest.fixture
def library(tmp_path):
    for mode in ("identity", "values", "tokens", "record"):
        meta = AdapterMetadata(kind=KIND, family="sd1", config={"mode": mode})
        save_adapter(tmp_path / f"{mode}.safetensors", AdapterFile({"layer": torch.tensor([2])}, meta))
    return tmp_path


def generate(service: PipelineService, *adapters: str, scheduler: str | None = None, guidance: float = 7.5):
    request = GenerationRequest(
        prompt=PROMPT,
        seeds=[1],
        steps=STEPS,
        width=SIZE,
        height=SIZE,
        guidance=guidance,
        scheduler=scheduler,
        adapters=[AdapterRef.parse(a) for a in adapters],
    )
    return pixels(service.generate(request).images[0])


def test_processors_know_their_layer_and_see_every_timestep(fake_kind, library):
    service = PipelineService(tiny_base(), adapter_source=library)
    unet = service.pipeline.unet
    # Record which attention modules really run, in order, independently of the processors.
    ran: list[str] = []
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            module.register_forward_pre_hook(lambda _m, _a, name=name: ran.append(f"{name}.processor"))

    generate(service, "record")
    (kind,) = fake_kind.instances
    calls = kind.states[0].calls
    layers = len(service.layer_names)
    assert layers == 6
    assert [name for _, name, _, _ in calls] == ran
    assert [index for index, _, _, _ in calls] == list(range(layers)) * STEPS
    assert all(service.layer_names[index] == name for index, name, _, _ in calls)
    scheduler = service._fresh_scheduler(None)
    scheduler.set_timesteps(STEPS)
    assert [t for _, _, t, _ in calls[::layers]] == [float(t) for t in scheduler.timesteps]
    assert all(batch == 2 for *_, batch in calls), "guidance batches [negative; positive]"


def test_any_scheduler_and_no_guidance(fake_kind, library):
    service = PipelineService(tiny_base(), adapter_source=library)
    generate(service, "record", scheduler="euler_a", guidance=1.0)
    calls = fake_kind.instances[0].states[0].calls
    scheduler = service._fresh_scheduler("euler_a")
    scheduler.set_timesteps(STEPS)
    assert [t for _, _, t, _ in calls[:: len(service.layer_names)]] == pytest.approx(
        [float(t) for t in scheduler.timesteps]
    )
    assert all(batch == 1 for *_, batch in calls)


def test_state_is_fed_per_request_and_leaves_no_trace(fake_kind, library, tiny_sd1_pipe):
    service = PipelineService(tiny_base(), adapter_source=library)
    stock = stock_image(tiny_sd1_pipe, PROMPT, seed=1, steps=STEPS, size=SIZE)

    # Our attention with the pipeline's own states equals the stock processor bit for bit.
    assert np.array_equal(generate(service, "identity"), stock)

    strong = generate(service, "values:strength=3")
    assert np.abs(strong - stock).max() > 0
    weak = generate(service, "values:strength=0.5")
    assert not np.array_equal(strong, weak)
    kind = next(k for k in fake_kind.instances if k.mode == "values")
    assert [request.ref.options["strength"] for request in kind.requests] == [3.0, 0.5]
    assert kind.states[0] is not kind.states[1], "each request gets its own state"

    assert np.array_equal(generate(service, "tokens:strength=0"), stock)
    with_tokens = generate(service, "tokens:strength=2")
    assert np.abs(with_tokens - stock).max() > 0

    assert service._seam.context.state is None
    assert np.array_equal(generate(service), stock)
    assert len(fake_kind.instances) == 3, "a kind is built once per cached adapter"


def test_seam_on_sdxl_keeps_the_stock_result(fake_kind, tmp_path):
    meta = AdapterMetadata(kind=KIND, family="sdxl", config={"mode": "identity"})
    save_adapter(tmp_path / "identity.safetensors", AdapterFile({"layer": torch.tensor([0])}, meta))
    service = PipelineService(
        BaseModel.from_pipeline(build_tiny_sdxl_pipeline(seed=0), "tiny-xl"), adapter_source=tmp_path
    )
    stock = stock_image(build_tiny_sdxl_pipeline(seed=0), PROMPT, seed=1, steps=2, size=SIZE)
    request = GenerationRequest(prompt=PROMPT, seeds=[1], steps=2, width=SIZE, height=SIZE)
    assert np.array_equal(pixels(service.generate(request).images[0]), stock)
    request.adapters = [AdapterRef("identity")]
    assert np.array_equal(pixels(service.generate(request).images[0]), stock)
    calls = fake_kind.instances[0].states[0].calls
    assert sorted({index for index, *_ in calls}) == list(range(len(service.layer_names)))
    # Regions on SDXL (2048-wide states from two encoders): identical parts keep the stock image.
    regional = GenerationRequest(
        prompt=f"{PROMPT} BREAK {PROMPT}", seeds=[1], steps=2, width=SIZE, height=SIZE, regions="rows"
    )
    assert np.abs(pixels(service.generate(regional).images[0]) - stock).max() <= 1


def test_region_masks_cover_every_position_once_at_every_level():
    masks = region_masks("columns", 3, 8, 12)
    for length in (96, 24, 6):  # 8x12, 4x6, 2x3
        weights = masks(length)
        assert weights.shape == (3, length, 1)
        assert torch.equal(weights.sum(0), torch.ones(length, 1))
    first_row = masks(96)[:, :12, 0]  # the top row of the 8x12 map: columns 0-3, 4-7, 8-11
    assert first_row.argmax(0).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    rows = region_masks("rows", 2, 8, 8)(64)[:, :, 0]
    assert rows[0, :32].eq(1).all() and rows[1, 32:].eq(1).all()


def test_regions_with_one_prompt_in_every_part_give_the_plain_image(library):
    """Blending per-region attention is exact: identical parts must reproduce the stock image."""
    service = PipelineService(tiny_base(), "cpu", adapter_source=library)
    plain = service.generate(GenerationRequest(prompt=PROMPT, steps=STEPS, width=SIZE, height=SIZE, seeds=[4]))
    layouts = (("columns", f"{PROMPT} BREAK {PROMPT}"), ("rows", f"{PROMPT} ADDBASE {PROMPT} BREAK {PROMPT}"))
    for layout, prompt in layouts:
        request = GenerationRequest(prompt=prompt, steps=STEPS, width=SIZE, height=SIZE, seeds=[4], regions=layout)
        regional = service.generate(request)
        assert np.abs(pixels(regional.images[0]) - pixels(plain.images[0])).max() <= 1
    other = GenerationRequest(
        prompt=f"{PROMPT} BREAK a blue square", steps=STEPS, width=SIZE, height=SIZE, seeds=[4], regions="columns"
    )
    assert not np.array_equal(pixels(service.generate(other).images[0]), pixels(plain.images[0]))


@pytest.mark.skipif(not (tiny_model_path() / "model_index.json").is_file(), reason="embedded tiny model not built")
def test_each_region_of_the_embedded_model_gets_its_own_background():
    from studio.base_models import load_base_model

    service = PipelineService(load_base_model("tiny"), "cpu")
    request = GenerationRequest(
        prompt="a red circle on a blue background BREAK a yellow star on a green background",
        seeds=[1, 2],
        regions="columns",
    )
    for image in service.generate(request).images:
        rgb = pixels(image).astype(float)
        quarter = rgb.shape[1] // 4
        left, right = rgb[:, :quarter].reshape(-1, 3).mean(0), rgb[:, -quarter:].reshape(-1, 3).mean(0)
        assert left[2] > left[1] + 60, f"left edge should be blue, got mean RGB {left.round()}"
        assert right[1] > right[2] + 60, f"right edge should be green, got mean RGB {right.round()}"


def test_a_joint_token_branch_shares_its_softmax_with_the_prompt():
    """``ExtraTokens.joint``: the branch's weights come from one softmax over the prompt's keys and its own, with
    zero values on the prompt's; a query that attends to the prompt leaves the branch almost silent."""
    from diffusers.models.attention_processor import Attention

    from pipelines.kinds.conditioning import _attend

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).eval()
    hidden, text = torch.randn(1, 5, 8), torch.randn(1, 3, 6)
    to_k, to_v = torch.nn.Linear(6, 8, bias=False), torch.nn.Linear(6, 8, bias=False)
    tokens = torch.randn(1, 2, 6)
    states = KeyValueStates(text, text)

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(1, -1, 2, 4).transpose(1, 2)

    with torch.no_grad():
        plain = _attend(attn, hidden, states, [], None, None)
        joint = _attend(attn, hidden, states, [ExtraTokens(tokens, to_k, to_v, scale=0.5, joint=True)], None, None)
        # By hand: the branch's share of one softmax over [prompt keys; token keys], times the token values.
        query, key = heads(attn.to_q(hidden)), torch.cat([heads(attn.to_k(text)), heads(to_k(tokens))], dim=2)
        weights = torch.softmax(query @ key.transpose(-1, -2) / 2.0, dim=-1)[..., 3:]
        branch = (weights @ heads(to_v(tokens))).transpose(1, 2).reshape(1, 5, 8)
        # The output projection is affine, so the branch adds its linear part (the bias is in ``plain`` already).
        expected = plain + 0.5 * branch @ attn.to_out[0].weight.T
    assert torch.allclose(joint, expected, atol=1e-5)
