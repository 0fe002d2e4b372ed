"""NeTI: the mapper is the described architecture, and a NeTI concept generates through the shared pipeline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_pipeline_helpers import pixels, random_embedding, random_lora, tiny_base, write

from pipelines.kinds.neti import NetiKind, NetiState
from pipelines.requests import AdapterRef, GenerationRequest
from pipelines.service import PipelineService
from studio.adapter_files import load_adapter, save_adapter
from studio.base_models import BaseModel
from studio.errors import InvalidInputError
from studio.families import SD1
from trainers.core.config import load_config
from trainers.neti import (
    ConditioningEncoder,
    MapperOutput,
    MapperSpec,
    NetiConfig,
    NetiMapper,
    apply_bypass,
    build_mapper,
    mapper_from_adapter,
    neti_adapter,
)

STEPS = 3
SIZE = 32
TOKEN = "<my-toy>"
PROMPT = f"a photo of a {TOKEN} on the beach"


# -- the mapper against a hand-computed forward pass ---------------------------------------------------------------


def _small_spec(**changes: object) -> MapperSpec:
    values = dict(
        n_layers=3,
        widths=(5,),
        target_norms=(2.0,),
        placeholder_token=TOKEN,
        super_category="toy",
        family="sd1",
        fourier_features=4,
        time_anchors=2,
        hidden_width=6,
    )
    values.update(changes)
    return MapperSpec(**values)  # type: ignore[arg-type]


def _features_by_hand(w: list[list[float]], t: float, layer: float) -> list[float]:
    phases = [row[0] * t + row[1] * layer for row in w]
    v = [math.sin(p) for p in phases] + [math.cos(p) for p in phases]
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _linear(weight: torch.Tensor, bias: torch.Tensor, x: list[float]) -> list[float]:
    return [
        sum(wi * xi for wi, xi in zip(row, x, strict=True)) + b
        for row, b in zip(weight.tolist(), bias.tolist(), strict=True)
    ]


def _layer_norm(x: list[float], gamma: torch.Tensor, beta: torch.Tensor) -> list[float]:
    mean = sum(x) / len(x)
    var = sum((v - mean) ** 2 for v in x) / len(x)
    return [
        (v - mean) / math.sqrt(var + 1e-5) * g + b for v, g, b in zip(x, gamma.tolist(), beta.tolist(), strict=True)
    ]


def _leaky(x: list[float]) -> list[float]:
    return [v if v > 0 else 0.01 * v for v in x]


def test_mapper_matches_a_hand_computed_forward_pass():
    spec = _small_spec()
    w = torch.tensor([[0.5, -1.0], [-0.2, 0.3], [1.5, 2.0], [0.01, -0.7]]) * torch.tensor([spec.sigma_t, spec.sigma_l])
    torch.manual_seed(0)
    mapper = NetiMapper(spec, w).eval()
    wl = w.tolist()

    # Fourier features and anchor initialisation: rows are t = 0, 500 (outer) x layers 0, 1, 2 (inner).
    anchors = [_features_by_hand(wl, t, layer) for t in (0.0, 500.0) for layer in (0.0, 1.0, 2.0)]
    assert torch.allclose(mapper.input_layer.weight, torch.tensor(anchors), atol=1e-6)
    assert mapper.input_layer.weight.shape == (spec.time_anchors * spec.n_layers, 2 * spec.fourier_features)

    # The whole forward pass, by hand: anchors layer, Linear-LN-LeakyReLU twice, truncation, output, norm.
    t, layer, truncation = 321.0, 2.0, 4
    x = _linear(mapper.input_layer.weight, mapper.input_layer.bias, _features_by_hand(wl, t, layer))
    lin1, ln1, _, lin2, ln2, _ = mapper.trunk
    h = _leaky(_layer_norm(_linear(lin1.weight, lin1.bias, x), ln1.weight, ln1.bias))
    h = _leaky(_layer_norm(_linear(lin2.weight, lin2.bias, h), ln2.weight, ln2.bias))
    for full in (True, False):
        kept = h if full else h[:truncation] + [0.0] * (len(h) - truncation)
        out = _linear(mapper.output_layer.weight, mapper.output_layer.bias, kept)
        embedding, bypass = out[:5], out[5:]
        norm = math.sqrt(sum(v * v for v in embedding))
        expected_embedding = [v / norm * 2.0 for v in embedding]
        got = mapper(torch.tensor([t]), torch.tensor([layer]), None if full else truncation)
        assert torch.allclose(got.embeddings[0][0], torch.tensor(expected_embedding), atol=1e-5)
        assert torch.allclose(got.bypass[0][0], torch.tensor(bypass), atol=1e-5)
    assert mapper.output_layer.out_features == 2 * 5


def test_bypass_formula():
    states = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])  # [1, 2 tokens, 2]
    slots = torch.tensor([[False, True]])
    bypass = torch.tensor([[0.0, 10.0]])
    out = apply_bypass(states, slots, bypass, 0.2)
    # Token 0 untouched; token 1: h + 0.2 * ||h|| * b/||b|| = [1, 0] + 0.2 * 1 * [0, 1].
    assert torch.equal(out[0, 0], states[0, 0])
    assert torch.allclose(out[0, 1], torch.tensor([1.0, 0.2]))


def test_nested_dropout_in_training_zeroes_a_tail_per_row():
    mapper = NetiMapper(_small_spec(hidden_width=16), torch.randn(4, 2)).train()
    h = torch.ones(64, 16)
    torch.manual_seed(1)
    dropped = mapper.nested_dropout(h, None, p=1.0)
    kept = dropped.sum(dim=1)
    assert len(set(kept.tolist())) > 3, "each row draws its own index"
    for row, count in zip(dropped, kept.long().tolist(), strict=True):
        assert torch.equal(row, (torch.arange(16) < count).float())
    assert torch.equal(mapper.nested_dropout(h, None, p=0.0), h)


def test_text_states_match_the_pipeline_and_the_bypass_touches_only_the_placeholder(tiny_sd1_pipe):
    encoder = ConditioningEncoder(tiny_sd1_pipe, SD1, TOKEN, "toy", 0.2)
    prompts = encoder.tokenize([PROMPT])
    toy_row = tiny_sd1_pipe.text_encoder.get_input_embeddings().weight[prompts.input_ids[0][0][prompts.slots[0][0]]]
    bypass = torch.randn(2, 32)
    with torch.no_grad():
        plain, bypassed = encoder.encode(prompts, MapperOutput((toy_row.repeat(2, 1),), (bypass,)), 2)
        # With the super-category word's own row, the plain states are exactly what the pipeline encodes.
        reference = tiny_sd1_pipe.encode_prompt(
            PROMPT.replace(TOKEN, "toy"), torch.device("cpu"), 1, do_classifier_free_guidance=False
        )[0]
    assert torch.equal(plain[0], reference[0]) and torch.equal(plain[1], reference[0])
    changed = (bypassed != plain).any(dim=-1)
    assert changed.nonzero()[:, 1].unique().tolist() == prompts.slots[0][0].nonzero().flatten().tolist()


def test_file_holds_mapper_w_and_spec_and_sd1_size_is_about_2_mb(tmp_path):
    spec = _small_spec(n_layers=16, widths=(768,), fourier_features=1024, time_anchors=10, hidden_width=128)
    mapper = NetiMapper(spec, torch.randn(1024, 2))
    path = save_adapter(tmp_path / "toy.safetensors", neti_adapter(mapper))
    assert 2.1e6 < path.stat().st_size < 2.4e6
    loaded = load_adapter(path)
    assert loaded.metadata.kind == "neti" and loaded.metadata.placeholder_tokens == [TOKEN]
    again = mapper_from_adapter(loaded)
    assert again.spec == spec and torch.equal(again.w, mapper.w)
    args = (torch.tensor([10.0, 990.0]), torch.tensor([0.0, 15.0]))
    assert torch.equal(again(*args).embeddings[0], mapper.eval()(*args).embeddings[0])


# -- generation through the shared pipeline ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_sd1_pipe):
    folder = tmp_path_factory.mktemp("neti-library")
    pipe = tiny_sd1_pipe
    config = load_config(NetiConfig, overrides=[f"placeholder_token={TOKEN}", "super_category=toy"])
    torch.manual_seed(0)
    mapper = build_mapper(config, pipe, SD1, len(SD1.cross_attention_layers(pipe.unet)))
    with torch.no_grad():  # a visible concept: a random mapper whose bypass is large
        mapper.output_layer.bias.mul_(5)
    write(folder, "toy", neti_adapter(mapper.eval()))
    write(folder, "lora", random_lora(pipe, seed=1, text_encoder=True))
    write(folder, "ti", random_embedding(seed=3, placeholder="<sks>"))
    return folder


def _request(*adapters: str, prompt: str = PROMPT, **kwargs: object) -> GenerationRequest:
    values = dict(prompt=prompt, seeds=[1], steps=STEPS, width=SIZE, height=SIZE)
    values.update(kwargs)
    return GenerationRequest(adapters=[AdapterRef.parse(a) for a in adapters], **values)  # type: ignore[arg-type]


def _image(service: PipelineService, *adapters: str, **kwargs: object) -> np.ndarray:
    return pixels(service.generate(_request(*adapters, **kwargs)).images[0])


@pytest.fixture(scope="module")
def service(library):
    """One service for the generation tests (a pipeline build is the slow part); tests use their own prompts."""
    return PipelineService(tiny_base(), adapter_source=library)


def test_processors_ask_for_every_layer_at_every_timestep_by_index(service, monkeypatch):
    seen: list[tuple[int, float]] = []
    results = []
    original = NetiState.key_value_states

    def spy(self, call):  # noqa: ANN001, ANN202
        seen.append((call.layer_index, float(call.timestep)))
        result = original(self, call)
        results.append(result)
        return result

    monkeypatch.setattr(NetiState, "key_value_states", spy)
    prompt = f"a {TOKEN} under a tree"
    service.generate(_request("toy", prompt=prompt))
    n_layers = len(service.layer_names)
    timesteps = sorted({t for _, t in seen})
    assert len(timesteps) == STEPS
    for t in timesteps:
        assert sorted(index for index, when in seen if when == t) == list(range(n_layers))
    (entry,) = [entry for key, entry in service._kinds["toy"]._cache.items() if key[0] == prompt]
    plain = entry.plain[timesteps[0]]
    assert not torch.equal(plain[0], plain[-1]), "each layer gets its own conditioning"
    # Guidance batches [negative; positive]: negative rows keep the pipeline's states; positive keys are the plain
    # states and positive values differ from them exactly at the placeholder position.
    keys, values = results[0].keys, results[0].values
    assert torch.equal(keys[0], values[0])
    differs = (keys[1] != values[1]).any(dim=-1).nonzero().flatten().tolist()
    assert differs == entry.slots.tolist() and len(differs) == 1


def test_truncation_dial_and_base_requests_stay_bit_identical(service):
    base = _image(service)
    full = _image(service, "toy")
    assert np.abs(full - base).max() > 10, "the concept should change the image"
    assert np.array_equal(_image(service, "toy:truncation=128"), full)
    assert not np.array_equal(_image(service, "toy:truncation=8"), full)
    assert np.array_equal(_image(service), base), "a base request after a NeTI request is the pure base model"
    with pytest.raises(InvalidInputError, match="truncation"):
        service.generate(_request("toy:truncation=0"))
    with pytest.raises(InvalidInputError, match="options truncation"):
        service.generate(_request("toy:strength=2"))


def test_second_identical_request_hits_the_cache(service):
    rows: list[int] = []
    hook = service.pipeline.text_encoder.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        prompt = f"a {TOKEN} in the snow"
        first = _image(service, "toy:encode_steps=0", prompt=prompt)
        neti_calls = [n for n in rows if n > 1]
        assert neti_calls == [STEPS * len(service.layer_names)], "one batched text-encoder call for all (t, layer)"
        rows.clear()
        assert np.array_equal(_image(service, "toy:encode_steps=0", prompt=prompt), first)
        assert all(n == 1 for n in rows), "only the pipeline's own prompt encoding runs again"
        # Another scheduler and step count: computed on first use, in one batch again (every timestep: exact mode).
        rows.clear()
        service.generate(_request("toy:encode_steps=0", prompt=prompt, scheduler="euler", steps=4))
        assert [n for n in rows if n > 1] == [4 * len(service.layer_names)]
    finally:
        hook.remove()


def test_composes_with_a_lora_and_a_ti_token_in_the_same_prompt(service):
    prompt = f"a <sks> next to a {TOKEN}"
    alone = _image(service, "toy", prompt=prompt)
    together = _image(service, "toy", "lora", "ti", prompt=prompt)
    with_lora = _image(service, "toy", "lora", prompt=prompt)
    assert not np.array_equal(together, alone)
    assert not np.array_equal(together, with_lora), "the TI token changes the NeTI conditioning too"
    assert np.array_equal(_image(service, "toy", "lora", "ti", prompt=prompt), together)
    # The text-encoder LoRA and TI rows are part of the cache key: without them the concept is what it was alone.
    assert np.array_equal(_image(service, "toy", prompt=prompt), alone)


def test_a_mapper_for_other_widths_is_refused(tiny_sd1_pipe):
    spec = _small_spec(n_layers=2, widths=(768,))
    adapter = neti_adapter(NetiMapper(spec, torch.randn(spec.fourier_features, 2)))
    with pytest.raises(InvalidInputError, match="text widths"):
        NetiKind(adapter, BaseModel.from_pipeline(tiny_sd1_pipe, "tiny-random"))


# -- several vectors per placeholder, and files written before that option ---------------------------------------


def test_bypass_formula_with_one_vector_per_placeholder_position():
    states = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]])  # [1, 3 tokens, 2]
    slots = torch.tensor([[False, True, True]])
    bypass = torch.tensor([[[0.0, 10.0], [-1.0, 0.0]]])  # vector 0 for the first position, vector 1 for the second
    out = apply_bypass(states, slots, bypass, 0.5)
    assert torch.equal(out[0, 0], states[0, 0])
    assert torch.allclose(out[0, 1], torch.tensor([0.0, 2.0 + 0.5 * 2.0]))
    assert torch.allclose(out[0, 2], torch.tensor([3.0 - 0.5 * 5.0, 4.0]))


def test_several_vectors_take_their_own_positions(tiny_sd1_pipe):
    encoder = ConditioningEncoder(tiny_sd1_pipe, SD1, TOKEN, "toy", 0.2, num_vectors=2)
    prompts = encoder.tokenize([PROMPT])
    assert int(prompts.slots[0][0].sum()) == 2
    table = tiny_sd1_pipe.text_encoder.get_input_embeddings().weight
    toy_id, photo_id = (
        tiny_sd1_pipe.tokenizer(word, add_special_tokens=False).input_ids[0] for word in ("toy", "photo")
    )
    rows = torch.stack([table[toy_id], table[photo_id]])[None]  # [1 row, 2 vectors, width]
    with torch.no_grad():
        plain, _ = encoder.encode(prompts, MapperOutput((rows,), (torch.randn(1, 2, 32),)), 1)
        reference = tiny_sd1_pipe.encode_prompt(
            PROMPT.replace(TOKEN, "toy photo"), torch.device("cpu"), 1, do_classifier_free_guidance=False
        )[0]
    assert torch.equal(plain[0], reference[0]), "vector j goes to the placeholder's j-th position"
    spec = _small_spec(num_vectors=3)
    out = NetiMapper(spec, torch.randn(4, 2)).eval()(torch.tensor([5.0, 6.0]), torch.tensor([0.0, 1.0]))
    assert out.embeddings[0].shape == (2, 3, 5) and out.bypass[0].shape == (2, 3, 5)
    assert torch.allclose(out.embeddings[0].norm(dim=-1), torch.full((2, 3), 2.0))


def test_a_spec_written_before_num_vectors_reads_as_one_vector():
    data = json.loads(_small_spec().to_json())
    del data["num_vectors"]
    assert MapperSpec.from_json(json.dumps(data)).num_vectors == 1


def test_init_from_super_category_starts_at_the_word(tiny_sd1_pipe):
    config = load_config(
        NetiConfig,
        overrides=[
            f"placeholder_token={TOKEN}",
            "super_category=toy",
            "init_from_super_category=true",
            "num_vectors=2",
        ],
    )
    mapper = build_mapper(config, tiny_sd1_pipe, SD1, len(SD1.cross_attention_layers(tiny_sd1_pipe.unet))).eval()
    toy_id = tiny_sd1_pipe.tokenizer("toy", add_special_tokens=False).input_ids[0]
    word = tiny_sd1_pipe.text_encoder.get_input_embeddings().weight[toy_id].detach()
    out = mapper(torch.tensor([0.0, 500.0, 999.0]), torch.tensor([0.0, 3.0, 6.0])).embeddings[0]
    assert torch.nn.functional.cosine_similarity(out, word.expand_as(out), dim=-1).min() > 0.95
    assert torch.allclose(out.norm(dim=-1), word.norm().expand(3, 2), atol=1e-5)


def test_a_several_vector_concept_generates_and_conditions_each_position(tmp_path, tiny_sd1_pipe):
    config = load_config(NetiConfig, overrides=[f"placeholder_token={TOKEN}", "super_category=toy", "num_vectors=2"])
    torch.manual_seed(0)
    mapper = build_mapper(config, tiny_sd1_pipe, SD1, len(SD1.cross_attention_layers(tiny_sd1_pipe.unet)))
    write(tmp_path, "toy2", neti_adapter(mapper.eval()))
    service = PipelineService(tiny_base(), adapter_source=tmp_path)
    prompt = f"a {TOKEN} in the rain"
    assert np.abs(_image(service, "toy2", prompt=prompt) - _image(service, prompt=prompt)).max() > 0
    (entry,) = service._kinds["toy2"]._cache.values()
    assert len(entry.slots) == 2 and next(iter(entry.bypass.values())).shape[1] == 2
