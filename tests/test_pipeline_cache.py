"""The adapter cache: parsed once, kept within its memory budget, evicted adapters gone from the pipeline too."""

from __future__ import annotations

import os

import pytest
from test_pipeline_helpers import random_embedding, random_lora, tiny_base, write

from pipelines.cache import AdapterCache
from pipelines.requests import AdapterRef, GenerationRequest
from pipelines.service import PipelineService
from studio.adapter_files import AdapterFile, load_adapter
from studio.errors import NotFoundError

VECTOR_BYTES = 100 * 32 * 4  # each test embedding: 100 vectors of 32 floats


class CountingLoader:
    """load_adapter that counts file reads per adapter file name."""

    def __init__(self) -> None:
        self.reads: list[str] = []

    def __call__(self, path):
        self.reads.append(path.stem)
        return load_adapter(path)


@pytest.fixture
def folder(tmp_path):
    for index, name in enumerate(("a", "b", "c")):
        write(tmp_path, name, random_embedding(seed=index, vectors=100))
    return tmp_path


def make_cache(folder, budget: int, evicted: list[str] | None = None) -> tuple[AdapterCache, CountingLoader]:
    loader = CountingLoader()
    cache = AdapterCache(
        lambda name: folder / f"{name}.safetensors",
        budget_bytes=budget,
        loader=loader,
        on_evict=(lambda entry: evicted.append(entry.name)) if evicted is not None else None,
    )
    return cache, loader


def test_cached_adapters_are_not_read_again(folder):
    cache, loader = make_cache(folder, budget=10 * VECTOR_BYTES)
    for name in ("a", "b", "a", "b", "a"):
        cache.get(name)
    assert loader.reads == ["a", "b"]
    assert cache.get("a").nbytes == VECTOR_BYTES
    assert len(cache.get("a").sha256) == 64


def test_cache_stays_within_budget_and_evicts_least_recently_used(folder):
    evicted: list[str] = []
    cache, loader = make_cache(folder, budget=2 * VECTOR_BYTES, evicted=evicted)
    cache.get("a")
    cache.get("b")
    cache.get("a")  # b is now the least recently used
    cache.get("c")
    assert evicted == ["b"]
    assert sorted(cache.names()) == ["a", "c"]
    assert cache.used_bytes <= cache.budget_bytes
    cache.get("b")
    assert evicted == ["b", "a"]
    assert loader.reads == ["a", "b", "c", "b"]


def test_adapters_of_the_current_request_are_kept_over_budget(folder):
    cache, _ = make_cache(folder, budget=VECTOR_BYTES)
    cache.get("a")
    cache.get("b", pinned=["a", "b"])
    assert sorted(cache.names()) == ["a", "b"]
    cache.get("c")  # the next request brings the cache back under its budget
    assert cache.names() == ["c"]


def test_replaced_file_is_read_again_and_missing_file_is_an_error(folder):
    cache, loader = make_cache(folder, budget=10 * VECTOR_BYTES)
    first = cache.get("a")
    write(folder, "a", random_embedding(seed=42, vectors=100))
    stat = (folder / "a.safetensors").stat()
    os.utime(folder / "a.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    second = cache.get("a")
    assert loader.reads == ["a", "a"]
    assert second.sha256 != first.sha256
    (folder / "b.safetensors").unlink()
    with pytest.raises(NotFoundError):
        cache.get("b")


def lora_request(name: str) -> GenerationRequest:
    return GenerationRequest(prompt="a circle", seeds=[0], steps=1, width=32, height=32, adapters=[AdapterRef(name)])


@pytest.fixture
def lora_folder(tmp_path):
    pipe = tiny_base().pipeline
    for index, name in enumerate(("lora-a", "lora-b")):
        write(tmp_path, name, random_lora(pipe, seed=index))
    return tmp_path


def lora_bytes(folder) -> int:
    adapter: AdapterFile = load_adapter(folder / "lora-a.safetensors")
    return sum(t.numel() * t.element_size() for t in adapter.tensors.values())


def test_switching_between_cached_loras_reads_no_file(lora_folder):
    loader = CountingLoader()
    service = PipelineService(tiny_base(), adapter_source=lora_folder, loader=loader)
    for name in ("lora-a", "lora-b", "lora-a", "lora-b"):
        service.generate(lora_request(name))
    assert loader.reads == ["lora-a", "lora-b"]
    assert sorted(service.resident_loras()) == ["lora-a", "lora-b"]


def test_evicted_lora_is_deleted_from_the_pipeline(lora_folder):
    loader = CountingLoader()
    budget = lora_bytes(lora_folder)  # room for one LoRA
    service = PipelineService(tiny_base(), adapter_source=lora_folder, cache_bytes=budget, loader=loader)
    service.generate(lora_request("lora-a"))
    service.generate(lora_request("lora-b"))
    assert service.cache.names() == ["lora-b"]
    assert service.resident_loras() == ["lora-b"]
    in_pipeline = {name for names in service.pipeline.get_list_adapters().values() for name in names}
    assert in_pipeline == {service._loras.pipeline_name("lora-b")}
    # Nothing of the evicted LoRA is left in the U-Net's layers.
    leftovers = [n for n, _ in service.pipeline.unet.named_parameters() if "lora_a__" in n.lower()]
    assert leftovers == []


def test_resident_loras_are_bounded_and_reloaded_from_ram(lora_folder):
    loader = CountingLoader()
    service = PipelineService(tiny_base(), adapter_source=lora_folder, max_resident_loras=1, loader=loader)
    for name in ("lora-a", "lora-b", "lora-a"):
        service.generate(lora_request(name))
    assert service.resident_loras() == ["lora-a"]
    assert loader.reads == ["lora-a", "lora-b"], "a LoRA dropped from the pipeline is reloaded from RAM"
    assert service._loras.loads == 3


def test_embedding_tokens_are_reused_after_eviction(tmp_path):
    for name in ("e1", "e2", "e3"):
        write(tmp_path, name, random_embedding(seed=len(name), vectors=3))
    one = 3 * 32 * 4
    service = PipelineService(tiny_base(), adapter_source=tmp_path, cache_bytes=2 * one)
    vocabulary = len(service.pipeline.tokenizer)
    for name in ("e1", "e2", "e3", "e1"):
        request = GenerationRequest(
            prompt=f"a <{name}>", seeds=[0], steps=1, width=32, height=32, adapters=[AdapterRef(name)]
        )
        service.generate(request)
    assert len(service.pipeline.tokenizer) == vocabulary + 6, "two embeddings held at once: six tokens, reused"
    assert service.pipeline.text_encoder.get_input_embeddings().weight.shape[0] == vocabulary + 6
    assert sorted(service._embeddings.loaded()) == sorted(service.cache.names())


def test_cache_rejects_negative_budget(folder):
    with pytest.raises(ValueError):
        AdapterCache(lambda name: folder / name, budget_bytes=-1)
