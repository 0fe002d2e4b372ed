"""Requests and PNG metadata: what users type is parsed as they mean it, and mistakes get one-line errors."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
from PIL import Image
from test_pipeline_helpers import random_lora, tiny_base, write

import pipelines.service
from pipelines.cli import generate_from_cli, output_paths, request_from_args
from pipelines.metadata import a1111_parameters, read_png_metadata, save_png
from pipelines.requests import MAX_PROMPT_CHARS, AdapterRef, GenerationRequest
from studio.errors import InvalidInputError, NotFoundError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cat", AdapterRef("cat")),
        ("my-dog:0.8", AdapterRef("my-dog", 0.8)),
        ("neti.cat:truncation=64", AdapterRef("neti.cat", 1.0, {"truncation": 64.0})),
        ("neti-cat:0.8,truncation=64", AdapterRef("neti-cat", 0.8, {"truncation": 64.0})),
        (" taste : 1 , strength = 0.5 ", AdapterRef("taste", 1.0, {"strength": 0.5})),
    ],
)
def test_adapter_ref_parses_cli_forms(text, expected):
    assert AdapterRef.parse(text) == expected


@pytest.mark.parametrize("text", ["", ":0.5", "cat:strong", "cat:0.5,=3", "cat:0.5,0.7", "cat:truncation=x"])
def test_adapter_ref_rejects_malformed_text(text):
    with pytest.raises(InvalidInputError):
        AdapterRef.parse(text)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": -3}, "steps"),
        ({"width": 65}, "multiple of 8"),
        ({"height": 0}, "height"),
        ({"prompt": "x" * 10_000}, f"at most {MAX_PROMPT_CHARS}"),
        ({"negative_prompt": "x" * 10_000}, "negative prompt"),
        ({"guidance": math.inf}, "guidance"),
        ({"scheduler": "magic"}, "scheduler"),
        ({"seeds": []}, "seed"),
        ({"seeds": list(range(17))}, "at most 16"),
        ({"adapters": [AdapterRef("a", math.nan)]}, "finite"),
        ({"adapters": [AdapterRef("a", 1e6)]}, "between"),
        ({"adapters": [AdapterRef("a", 1.0, {"truncation": math.nan})]}, "truncation"),
        ({"adapters": [AdapterRef("a"), AdapterRef("a", 0.5)]}, "twice"),
        ({"regions": "diagonal"}, "regions should be one of columns, rows"),
        ({"regions": "columns"}, "two or more non-empty parts separated by BREAK, got 1"),
        ({"regions": "columns", "prompt": "a cat BREAK "}, "got 1 part"),
        ({"regions": "rows", "prompt": "a BREAK b", "base_ratio": 1.0}, "base_ratio"),
    ],
)
def test_invalid_requests_get_one_line_errors(changes, message):
    request = GenerationRequest(**{"prompt": "a cat", **changes})
    with pytest.raises(InvalidInputError, match=message) as caught:
        request.validate()
    assert "\n" not in str(caught.value)


def test_valid_request_passes():
    GenerationRequest(prompt="a cat", seeds=[0, 1], width=512, height=768, scheduler="euler_a").validate()


def test_png_metadata_round_trip_and_a1111_text(tmp_path):
    meta = {
        "prompt": "a <sks> dog",
        "negative_prompt": "blurry",
        "seed": 7,
        "steps": 20,
        "guidance": 7.5,
        "width": 64,
        "height": 64,
        "scheduler": "euler_a",
        "base_model": "tiny",
        "base_fingerprint": "0123456789abcdef",
        "adapters": [{"name": "style", "kind": "lora", "weight": 0.6, "options": {}, "sha256": "ab" * 32}],
    }
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", meta)
    read = read_png_metadata(path)
    assert {key: read[key] for key in meta} == meta
    assert read["parameters"] == a1111_parameters(meta)
    lines = read["parameters"].splitlines()
    assert lines[0] == "a <sks> dog <lora:style:0.6>"
    assert lines[1] == "Negative prompt: blurry"
    assert "Sampler: Euler a" in lines[2] and "Seed: 7" in lines[2] and "Size: 64x64" in lines[2]
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(NotFoundError):
        read_png_metadata(tmp_path / "plain.png")


def cli_args(**changes) -> argparse.Namespace:
    values = {
        "prompt": "a red circle",
        "negative": None,
        "adapter": [],
        "base": "tiny",
        "seed": 3,
        "steps": 2,
        "guidance": None,
        "num_images": 1,
        "width": 32,
        "height": 32,
        "scheduler": None,
        "out": None,
    }
    values.update(changes)
    return argparse.Namespace(**values)


def test_cli_request_and_output_paths(tmp_path):
    request = request_from_args(cli_args(num_images=3, adapter=["a:0.5"]))
    assert request.seeds == [3, 4, 5] and request.adapters == [AdapterRef("a", 0.5)]
    assert len(set(request_from_args(cli_args(seed=None)).seeds)) == 1
    regional = request_from_args(cli_args(prompt="a BREAK b", regions="rows", base_ratio=0.3))
    assert (regional.regions, regional.base_ratio, regional.region_prompts()) == ("rows", 0.3, ["a", "b"])
    with pytest.raises(InvalidInputError, match="regions should be one of"):
        request_from_args(cli_args(prompt="a BREAK b", regions="grid"))
    latent = request_from_args(
        cli_args(prompt="a BREAK b", regions="columns", region_mode="latent", adapter=["l:1,region=2"])
    )
    assert (latent.region_mode, latent.adapters[0].options) == ("latent", {"region": 2.0})
    with pytest.raises(InvalidInputError, match="region_mode should be one of attention, latent"):
        request_from_args(cli_args(prompt="a BREAK b", regions="rows", region_mode="pixels"))
    (tmp_path / "s-3.png").touch()
    assert [p.name for p in output_paths(tmp_path, [3, 4], "s")] == ["s-3-1.png", "s-4.png"]
    with pytest.raises(InvalidInputError):
        output_paths(tmp_path / "one.png", [1, 2], "s")


def test_generate_from_cli_saves_pngs_with_metadata(home, monkeypatch, capsys):
    base = tiny_base()
    home.ensure()
    write(home.adapters, "style", random_lora(base.pipeline, seed=1))
    monkeypatch.setattr("studio.base_models.load_base_model", lambda spec: base)
    monkeypatch.setattr(pipelines.service, "_SHARED", {})

    out = home.root / "images"
    assert generate_from_cli(cli_args(adapter=["style:0.7"], num_images=2, out=str(out)), home) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 2 and all(path.startswith(str(out)) for path in printed)
    first = read_png_metadata(printed[0])
    assert first["seed"] == 3 and first["adapters"][0]["name"] == "style" and first["adapters"][0]["weight"] == 0.7

    # Same arguments, one image to a file: the same picture as before.
    single = home.root / "one.png"
    assert generate_from_cli(cli_args(adapter=["style:0.7"], out=str(single)), home) == 0
    assert np.array_equal(np.asarray(Image.open(single)), np.asarray(Image.open(printed[0])))


def test_regional_prompts_split_on_break_after_an_optional_base():
    plain = GenerationRequest(prompt="a cat BREAK a dog")
    assert plain.region_prompts() == [] and plain.region_base() == ""
    request = GenerationRequest(prompt="a cat and a dog ADDBASE a cat BREAK  a dog ", regions="columns")
    request.validate()
    assert request.region_base() == "a cat and a dog"
    assert request.region_prompts() == ["a cat", "a dog"]
    assert request.describe()["regions"] == "columns"
