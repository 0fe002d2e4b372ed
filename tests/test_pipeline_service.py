"""The shared pipeline service: each request gets exactly its adapters, and nothing leaks into the next one."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_pipeline_helpers import pixels, random_embedding, random_lora, stock_image, tiny_base, write

from pipelines.metadata import read_png_metadata, save_png
from pipelines.requests import AdapterRef, GenerationRequest
from pipelines.service import PipelineService
from studio.errors import FamilyMismatchError, InvalidInputError, NotFoundError, StudioError

STEPS = 3
SIZE = 32  # 32x32 images: the tiny pipeline runs five times faster than at its native 64
PROMPT = "a red circle"


@pytest.fixture
def library(tmp_path):
    """A folder with two LoRAs, two embeddings sharing the placeholder '<sks>', and an SDXL embedding."""
    pipe_for_shapes = tiny_base().pipeline
    write(tmp_path, "lora-a", random_lora(pipe_for_shapes, seed=1))
    write(tmp_path, "lora-b", random_lora(pipe_for_shapes, seed=2, text_encoder=True))
    write(tmp_path, "ti-one", random_embedding(seed=3, vectors=2))
    write(tmp_path, "ti-two", random_embedding(seed=4))
    write(tmp_path, "xl-ti", random_embedding(seed=5, family="sdxl"))
    return tmp_path


def request(
    *adapters: str, prompt: str = PROMPT, seeds: tuple[int, ...] = (1,), steps: int = STEPS, **kwargs
) -> GenerationRequest:
    kwargs.setdefault("width", SIZE)
    kwargs.setdefault("height", SIZE)
    return GenerationRequest(
        prompt=prompt, seeds=list(seeds), steps=steps, adapters=[AdapterRef.parse(a) for a in adapters], **kwargs
    )


def image_of(service: PipelineService, *adapters: str, **kwargs) -> np.ndarray:
    return pixels(service.generate(request(*adapters, **kwargs)).images[0])


def test_no_adapter_request_after_lora_request_equals_stock_pipeline(library, tiny_sd1_pipe):
    service = PipelineService(tiny_base(), adapter_source=library)
    stock = stock_image(tiny_sd1_pipe, PROMPT, seed=1, steps=STEPS, size=SIZE)

    assert np.array_equal(image_of(service), stock)
    with_lora = image_of(service, "lora-a")
    assert np.abs(with_lora - stock).max() > 10, "the LoRA should visibly change the image"
    with_both = image_of(service, "lora-a:0.5", "lora-b")
    assert not np.array_equal(with_both, with_lora)
    # Bit for bit: disabled peft layers return their base layer's output.
    assert np.array_equal(image_of(service), stock)


def test_lora_weight_is_per_request(library):
    service = PipelineService(tiny_base(), adapter_source=library)
    full = image_of(service, "lora-a")
    half = image_of(service, "lora-a:0.5")
    assert not np.array_equal(full, half)
    assert np.array_equal(image_of(service, "lora-a:1.0"), full)


def test_requests_from_threads_get_their_own_loras(library):
    service = PipelineService(tiny_base(), adapter_source=library)
    alone = {name: image_of(service, name, seeds=(7,)) for name in ("lora-a", "lora-b")}
    assert not np.array_equal(alone["lora-a"], alone["lora-b"])

    results: dict[tuple[str, int], np.ndarray] = {}
    errors: list[BaseException] = []

    def user(name: str) -> None:
        try:
            for turn in range(2):
                results[(name, turn)] = image_of(service, name, seeds=(7,))
        except BaseException as exc:  # reported below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(name,)) for name in ("lora-a", "lora-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    for (name, _turn), image in results.items():
        assert np.array_equal(image, alone[name]), f"request with {name} got another request's adapters"


def test_same_seed_gives_same_image_and_png_metadata_records_it(library, tmp_path):
    service = PipelineService(tiny_base(), adapter_source=library)
    result = service.generate(request("lora-a:0.8", "ti-one", prompt="a <sks> circle", seeds=(5, 5, 6)))
    first, again, other = (pixels(image) for image in result.images)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)

    path = save_png(result.images[0], tmp_path / "out" / "img.png", result.metadata[0])
    meta = read_png_metadata(path)
    assert meta["seed"] == 5 and meta["steps"] == STEPS and meta["prompt"] == "a <sks> circle"
    assert meta["base_fingerprint"] == service.fingerprint and len(meta["base_fingerprint"]) == 16
    assert [(a["name"], a["weight"], a["kind"]) for a in meta["adapters"]] == [
        ("lora-a", 0.8, "lora"),
        ("ti-one", 1.0, "textual_inversion"),
    ]
    assert all(len(a["sha256"]) == 64 for a in meta["adapters"])
    assert "<lora:lora-a:0.8>" in meta["parameters"] and "Seed: 5" in meta["parameters"]

    # The recorded request reproduces the image.
    replay = GenerationRequest(
        prompt=meta["prompt"],
        seeds=[meta["seed"]],
        steps=meta["steps"],
        guidance=meta["guidance"],
        width=meta["width"],
        height=meta["height"],
        scheduler=meta["scheduler"],
        adapters=[AdapterRef(a["name"], a["weight"], a["options"]) for a in meta["adapters"]],
    )
    assert np.array_equal(pixels(service.generate(replay).images[0]), first)


def test_bad_requests_give_one_line_errors_and_the_service_still_works(library, tiny_sd1_pipe):
    service = PipelineService(tiny_base(), adapter_source=library)
    image_of(service, "lora-a")  # leave an adapter active, as a previous user would
    bad_requests = {
        "unknown adapter": (request("no-such-adapter"), NotFoundError),
        "other family": (request("xl-ti"), FamilyMismatchError),
        "steps 0": (request(steps=0), InvalidInputError),
        "size 60": (request(width=60), InvalidInputError),
        "10k prompt": (request(prompt="x" * 10_000), InvalidInputError),
        "NaN weight": (GenerationRequest(PROMPT, adapters=[AdapterRef("lora-a", float("nan"))]), InvalidInputError),
        "scheduler": (request(scheduler="magic"), InvalidInputError),
        "too many images": (request(seeds=tuple(range(100))), InvalidInputError),
        "reserved token": (request(prompt="a <studio-ti-0>"), InvalidInputError),
    }
    for what, (bad, error) in bad_requests.items():
        with pytest.raises(error) as caught:
            service.generate(bad)
        assert isinstance(caught.value, StudioError), what
        assert str(caught.value) and "\n" not in str(caught.value), what
    assert np.array_equal(image_of(service), stock_image(tiny_sd1_pipe, PROMPT, seed=1, steps=STEPS, size=SIZE))
    image_of(service, "lora-b")


def test_lora_that_does_not_fit_is_refused_and_leaves_nothing_behind(library, tmp_path):
    service = PipelineService(tiny_base(), adapter_source=library)
    wrong = random_lora(tiny_base().pipeline, seed=9)
    # Same module names, wrong shapes: as if trained on a wider model.
    wrong.tensors = {
        key: torch.randn(4, 7) if key.endswith("lora_down.weight") else value for key, value in wrong.tensors.items()
    }
    write(library, "wrong", wrong)
    with pytest.raises(StudioError):
        service.generate(request("wrong"))
    assert service.resident_loras() == []
    assert all(not names for names in service.pipeline.get_list_adapters().values())
    image_of(service, "lora-a")


def test_embeddings_with_the_same_placeholder_do_not_collide(library, tiny_sd1_pipe):
    prompt = "a photo of <sks>"
    service = PipelineService(tiny_base(), adapter_source=library)
    one = image_of(service, "ti-one", prompt=prompt)
    two = image_of(service, "ti-two", prompt=prompt)
    assert not np.array_equal(one, two)
    # Each equals what a fresh service makes with that embedding alone.
    fresh = PipelineService(tiny_base(), adapter_source=library)
    assert np.array_equal(image_of(fresh, "ti-two", prompt=prompt), two)
    assert np.array_equal(image_of(service, "ti-one", prompt=prompt), one)
    # An embedding not in the request has no effect, even after it was loaded.
    assert np.array_equal(
        image_of(service, prompt=prompt), stock_image(tiny_sd1_pipe, prompt, seed=1, steps=STEPS, size=SIZE)
    )
    # Both in one request: the shared placeholder is ambiguous; the adapter names are not.
    with pytest.raises(InvalidInputError, match="more than one embedding"):
        service.generate(request("ti-one", "ti-two", prompt=prompt))
    both = image_of(service, "ti-one", "ti-two", prompt="<ti-one> and <ti-two>")
    assert not np.array_equal(both, one)


def test_embedding_off_and_unused_placeholder_warn(library, tiny_sd1_pipe):
    service = PipelineService(tiny_base(), adapter_source=library)
    result = service.generate(request("ti-one", prompt=PROMPT))
    assert any("not used" in warning for warning in result.warnings)
    off = image_of(service, "ti-one:0", prompt="a photo of <sks>")
    assert np.array_equal(off, stock_image(tiny_sd1_pipe, "a photo of <sks>", seed=1, steps=STEPS, size=SIZE))


def test_long_prompt_is_truncated_with_a_warning(library):
    service = PipelineService(tiny_base(), adapter_source=library)
    result = service.generate(request(prompt="red circle " * 60))
    assert any("77" in warning for warning in result.warnings)


def test_scheduler_state_does_not_leak_between_requests(library):
    service = PipelineService(tiny_base(), adapter_source=library)
    first = image_of(service, scheduler="euler_a")
    image_of(service, scheduler="dpm++", steps=5)
    assert np.array_equal(image_of(service, scheduler="euler_a"), first)
