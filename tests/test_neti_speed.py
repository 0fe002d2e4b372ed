"""NeTI `encode_steps`: a new prompt encodes K timesteps (anchors) per layer exactly and blends the rest from them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_pipeline_helpers import pixels, tiny_base, write

from pipelines.kinds.conditioning import ConditioningRequest
from pipelines.kinds.neti import CROSS_RIDGE, DEFAULT_ENCODE_STEPS, NetiKind, NetiState, anchor_indices
from pipelines.requests import AdapterRef, GenerationRequest
from pipelines.service import PipelineService
from studio.base_models import BaseModel
from studio.errors import InvalidInputError
from studio.families import SD1
from trainers.core.config import load_config
from trainers.neti import NetiConfig, build_mapper, neti_adapter

TOKEN = "<my-toy>"
PROMPT = f"a photo of a {TOKEN} on the beach"
SIZE = 32


@pytest.fixture(scope="module")
def base() -> BaseModel:
    return tiny_base()


@pytest.fixture(scope="module")
def adapter(base):
    pipe = base.pipeline
    config = load_config(NetiConfig, overrides=[f"placeholder_token={TOKEN}", "super_category=toy"])
    torch.manual_seed(0)
    mapper = build_mapper(config, pipe, SD1, len(SD1.cross_attention_layers(pipe.unet)))
    with torch.no_grad():  # a visible concept: a random mapper whose bypass is large
        mapper.output_layer.bias.mul_(5)
    return neti_adapter(mapper.eval())


@pytest.fixture
def kind(adapter, base) -> NetiKind:
    """A fresh kind (an empty cache) per test."""
    return NetiKind(adapter, base)


def _state(kind: NetiKind, base: BaseModel, steps: int, **options: float) -> NetiState:
    """A request's state with a scheduler whose grid has ``steps`` timesteps (no U-Net involved)."""
    scheduler = type(base.pipeline.scheduler).from_config(base.pipeline.scheduler.config)
    scheduler.set_timesteps(steps)
    request = ConditioningRequest(
        ref=AdapterRef("toy", options=options),
        prompt=PROMPT,
        negative_prompt="",
        pipeline=SimpleNamespace(scheduler=scheduler),
        family=base.family,
        layer_names=tuple(base.family.cross_attention_layers(base.pipeline.unet)),
        device=torch.device("cpu"),
        dtype=torch.float32,
        steps=steps,
        guidance=7.5,
        classifier_free_guidance=True,
    )
    state = kind.prepare(request)
    assert isinstance(state, NetiState)
    return state


def _grid(state: NetiState) -> list[float]:
    return list(dict.fromkeys(round(float(t), 3) for t in state.pipeline.scheduler.timesteps))


def _exact(kind: NetiKind, timesteps: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = kind.text.tokenize([PROMPT])
    return kind.compute(prompts, timesteps, None, torch.device("cpu"), torch.float32)


def _encoder_rows(base: BaseModel) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    rows: list[int] = []
    hook = base.pipeline.text_encoder.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    return rows, hook


def test_anchor_indices_spread_over_the_grid_with_both_ends():
    assert anchor_indices(20, 3) == [0, 10, 19]
    assert anchor_indices(20, 2) == [0, 19]
    assert anchor_indices(50, 5) == [0, 12, 25, 37, 49]
    assert anchor_indices(4, 3) == [0, 2, 3]
    for length in (1, 5, 20):
        assert anchor_indices(length, 0) == list(range(length)), "0 = exact"
        assert anchor_indices(length, length) == list(range(length))
        assert anchor_indices(length, length + 7) == list(range(length))


@pytest.mark.parametrize("anchors", [0, 6, 9])
def test_enough_anchors_give_the_exact_states(kind, base, anchors):
    state = _state(kind, base, 6, encode_steps=float(anchors))
    grid = _grid(state)
    plain, bypassed = _exact(kind, grid)
    slots = state.entry.slots
    for index, t in enumerate(grid):
        got_plain, got_bypass = state.states_at(t)
        assert torch.equal(got_plain, plain[index])
        assert torch.equal(got_bypass, bypassed[index][:, slots])


def test_k_anchors_run_the_text_encoder_once_with_k_times_layers_rows(kind, base):
    layers = kind.spec.n_layers
    rows, hook = _encoder_rows(base)
    try:
        state = _state(kind, base, 10, encode_steps=3.0)
        for t in _grid(state):
            state.states_at(t)
    finally:
        hook.remove()
    assert rows == [3 * layers]
    # Only the anchors' exact states are cached; the interpolated ones are per request.
    assert sorted(kind._cache[next(iter(kind._cache))].plain) == state.anchors and len(state.anchors) == 3


def test_anchor_states_are_exact_and_with_the_linear_blend_linear_in_t_between(kind, base):
    kind.blend = "linear"
    state = _state(kind, base, 10, encode_steps=3.0)
    grid = _grid(state)
    state.states_at(grid[0])
    anchors = state.anchors
    assert anchors == sorted(grid[index] for index in (0, 5, 9))
    # At an anchor: the exact encoding (computed here in another batch, so up to float rounding).
    exact_plain, exact_bypassed = _exact(kind, anchors)
    slots = state.entry.slots
    for index, t in enumerate(anchors):
        plain, bypass = state.states_at(t)
        assert torch.allclose(plain, exact_plain[index], atol=1e-5)
        assert torch.allclose(bypass, exact_bypassed[index][:, slots], atol=1e-5)
    # Between anchors: the linear interpolation of the neighbouring anchors' states, plain and bypassed rows alike.
    for t in grid:
        if t in anchors:
            continue
        low = max(a for a in anchors if a < t)
        high = min(a for a in anchors if a > t)
        weight = (t - low) / (high - low)
        plain, bypass = state.states_at(t)
        for table, got in ((state.entry.plain, plain), (state.entry.bypass, bypass)):
            want = table[low] + weight * (table[high] - table[low])
            assert torch.allclose(got, want, atol=1e-6)
        assert not torch.allclose(plain, _exact(kind, [t])[0][0], atol=1e-4), "a random mapper is not linear in t"


def _anchor_rows(state: NetiState, table: dict[float, torch.Tensor]) -> torch.Tensor:
    """Every anchor row of ``table`` (plain states or bypassed rows), anchor-major: ``[K * L, ...]``."""
    return torch.stack([table[t] for t in state.anchors or []]).flatten(0, 1)


@pytest.mark.parametrize("blend", ["layer", "mapper"])
def test_the_blend_fits_the_mapper_outputs_and_combines_the_anchor_states_alike(kind, base, blend):
    kind.blend = blend
    state = _state(kind, base, 10, encode_steps=4.0)
    grid = _grid(state)
    state.states_at(grid[0])
    anchors = state.anchors
    assert anchors is not None and len(anchors) == 4
    count, layers = len(anchors), kind.spec.n_layers
    features = kind.mapper_features([*anchors, *grid], None).numpy()  # [K + n, L, F]
    basis = features[:count].reshape(count * layers, -1)  # anchor rows, anchor-major
    plain_rows, bypass_rows = _anchor_rows(state, state.entry.plain), _anchor_rows(state, state.entry.bypass)
    for index, t in enumerate(grid):
        if t in anchors:
            continue
        plain, bypass = state.states_at(t)
        weights = state.blend_weights([t])[0]  # [L, K * L]
        assert torch.allclose(weights.sum(dim=-1), torch.ones(layers, dtype=weights.dtype))
        for layer in range(layers):
            target = features[count + index, layer]
            # The layer's own fit: the affine combination of its anchors' m(a_k, l) closest to m(t, l).
            own_rows = [k * layers + layer for k in range(count)]
            own_basis = basis[own_rows]
            steps, *_ = np.linalg.lstsq((own_basis[1:] - own_basis[0]).T, target - own_basis[0], rcond=None)
            own = np.zeros(count * layers)
            own[own_rows] = np.concatenate([[1 - steps.sum()], steps])
            if blend == "layer":
                want = own
            else:
                # Over all anchor rows: own + Z z with Z an orthonormal basis of {sum = 0}, z the ridge least squares.
                centred = basis - basis.mean(axis=0)
                ridge = CROSS_RIDGE * np.trace(centred @ centred.T) / len(basis)
                null = np.linalg.svd(np.ones((1, len(basis))))[2][1:].T  # [R, R-1]
                design = (basis.T @ null).astype(np.float64)
                z = np.linalg.solve(
                    design.T @ design + ridge * np.eye(null.shape[1]), design.T @ (target - basis.T @ own)
                )
                want = own + null @ z
            assert np.allclose(weights[layer].numpy(), want, atol=1e-6)
            # The states are the same combination of the anchor rows' exact states.
            combined = weights[layer].float()
            assert torch.allclose(
                plain[layer], (combined @ plain_rows.flatten(1)).reshape(plain[layer].shape), atol=1e-4
            )
            assert torch.allclose(
                bypass[layer], (combined @ bypass_rows.flatten(1)).reshape(bypass[layer].shape), atol=1e-4
            )


@pytest.mark.parametrize("blend", ["layer", "mapper"])
def test_a_mapper_constant_in_t_is_blended_exactly(adapter, base, blend):
    constant = NetiKind(adapter, base)
    constant.blend = blend
    with torch.no_grad():
        constant.mapper.w[:, 0] = 0  # no time frequency: every timestep gets the same conditioning
    state = _state(constant, base, 8, encode_steps=2.0)
    grid = _grid(state)
    plain, _ = _exact(constant, grid)
    for index, t in enumerate(grid):
        assert torch.allclose(state.states_at(t)[0], plain[index], atol=1e-5)


def test_a_timestep_outside_the_anchors_range_is_encoded_exactly(kind, base):
    state = _state(kind, base, 10, encode_steps=2.0)
    grid = _grid(state)
    state.states_at(grid[3])
    outside = min(grid) - 7.0
    plain, _ = state.states_at(outside)
    assert outside in state.entry.plain
    assert torch.allclose(plain, _exact(kind, [outside])[0][0], atol=1e-5)


def test_the_default_is_the_documented_one(kind, base):
    state = _state(kind, base, 10)
    state.states_at(_grid(state)[0])
    assert state.encode_steps == DEFAULT_ENCODE_STEPS and len(state.anchors) == DEFAULT_ENCODE_STEPS


@pytest.mark.parametrize("value", ["1", "2.5", "-3"])
def test_a_bad_encode_steps_value_is_a_one_line_error(kind, value):
    with pytest.raises(InvalidInputError) as error:
        kind.encode_steps_of({"encode_steps": float(value)}, "toy")
    message = str(error.value)
    assert "\n" not in message and "encode_steps" in message and f"got {float(value):g}" in message
    assert "expects 0" in message


def test_encode_steps_through_the_service_and_the_cli_syntax(tmp_path, adapter):
    write(tmp_path, "toy", adapter)
    service = PipelineService(tiny_base(), adapter_source=tmp_path)
    layers = len(service.layer_names)

    def image(spec: str, steps: int = 6, prompt: str = PROMPT) -> np.ndarray:
        request = GenerationRequest(
            prompt=prompt, seeds=[1], steps=steps, width=SIZE, height=SIZE, adapters=[AdapterRef.parse(spec)]
        )
        return pixels(service.generate(request).images[0])

    rows, hook = _encoder_rows(service.base_model)
    try:
        exact = image("toy:encode_steps=0")
        assert [n for n in rows if n > 1] == [6 * layers]
        rows.clear()
        # The exact request left every timestep in the cache: the anchors are there, the rest is interpolated.
        anchored = image("toy:truncation=128,encode_steps=2")
        assert [n for n in rows if n > 1] == []
        assert not np.array_equal(anchored, exact)
        assert np.array_equal(image("toy:encode_steps=6"), exact), "as many anchors as steps is exact"
        # A repeated anchored request: neither the text encoder nor the mapper runs (blend weights are kept per grid).
        mapper_calls: list[int] = []
        kind = service._kinds["toy"]
        mapper_hook = kind.mapper.register_forward_pre_hook(lambda module, args: mapper_calls.append(1))
        try:
            assert np.array_equal(image("toy:encode_steps=2"), anchored)
        finally:
            mapper_hook.remove()
        assert mapper_calls == [] and [n for n in rows if n > 1] == []
        rows.clear()
        image("toy:encode_steps=2", steps=7, prompt=f"a {TOKEN} in the snow")
        assert [n for n in rows if n > 1] == [2 * layers], "a new prompt: one call, anchors x layers rows"
    finally:
        hook.remove()
    with pytest.raises(InvalidInputError, match="encode_steps"):
        image("toy:encode_steps=1")


def test_sdxl_two_encoders_blend_their_concatenated_states(tmp_path):
    from studio.families import SDXL
    from studio.testing import build_tiny_sdxl_pipeline

    base = BaseModel.from_pipeline(build_tiny_sdxl_pipeline(), "tiny-xl")
    config = load_config(NetiConfig, overrides=[f"placeholder_token={TOKEN}", "super_category=toy"])
    torch.manual_seed(0)
    mapper = build_mapper(config, base.pipeline, SDXL, len(SDXL.cross_attention_layers(base.pipeline.unet)))
    adapter = neti_adapter(mapper.eval())
    kind = NetiKind(adapter, base)
    state = _state(kind, base, 6, encode_steps=2.0)
    grid = _grid(state)
    plain, _ = _exact(kind, grid)
    state.states_at(grid[1])
    assert state.anchors == sorted([grid[0], grid[-1]])
    for index, t in enumerate(grid):
        got, bypass = state.states_at(t)
        assert got.shape == plain[index].shape and got.shape[-1] == 64, "both encoders' widths, concatenated"
        assert bypass.shape[0] == kind.spec.n_layers
        if t in state.anchors:
            assert torch.allclose(got, plain[index], atol=1e-5)
    write(tmp_path, "toy-xl", adapter)
    service = PipelineService(base, adapter_source=tmp_path)
    request = GenerationRequest(
        prompt=PROMPT, seeds=[1], steps=4, width=SIZE, height=SIZE, adapters=[AdapterRef.parse("toy-xl:encode_steps=2")]
    )
    assert service.generate(request).images[0].size == (SIZE, SIZE)
