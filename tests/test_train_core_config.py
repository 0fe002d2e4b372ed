"""Strict training configs: defaults in one place, TOML then --set precedence, clear errors naming the key."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from studio.errors import InvalidInputError
from trainers.core.config import (
    ALLOW_NONFINITE,
    config_from_dict,
    config_to_dict,
    expect_positive,
    load_config,
    parse_overrides,
)


@dataclass(frozen=True)
class SampleConfig:
    rank: int = 4
    alpha: float = 4.0
    lr: float = 1e-4
    train_text_encoder: bool = False
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    placeholder_token: str = "sks"
    sample_prompts: tuple[str, ...] = ("a photo of sks",)
    sample_seeds: tuple[int, ...] = (0, 1)
    max_grad_norm: float | None = None
    snr_gamma: float = field(default=math.inf, metadata=ALLOW_NONFINITE)
    output: Path | None = None

    def validate(self) -> None:
        expect_positive(self, "rank", "lr", "alpha")


def test_defaults_come_from_the_dataclass() -> None:
    assert load_config(SampleConfig) == SampleConfig()


def test_set_values_are_coerced_to_field_types() -> None:
    cfg = load_config(
        SampleConfig,
        overrides=[
            "rank=8",
            "lr=3e-4",
            "train-text-encoder=yes",
            "mixed_precision=bf16",
            "sample_prompts=a dog, a cat",
            "sample_seeds=1,2,3",
            "max_grad_norm=1",
            "output=out/x",
        ],
    )
    assert cfg.rank == 8 and cfg.lr == pytest.approx(3e-4)
    assert cfg.train_text_encoder is True
    assert cfg.mixed_precision == "bf16"
    assert cfg.sample_prompts == ("a dog", "a cat")
    assert cfg.sample_seeds == (1, 2, 3)
    assert cfg.max_grad_norm == 1.0
    assert cfg.output == Path("out/x")
    assert load_config(SampleConfig, overrides=["max_grad_norm=none"]).max_grad_norm is None
    for text, expected in [("true", True), ("1", True), ("no", False), ("0", False), ("False", False)]:
        assert load_config(SampleConfig, overrides=[f"train_text_encoder={text}"]).train_text_encoder is expected


def test_toml_overrides_defaults_and_set_overrides_toml(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('rank = 16\nlr = 0.0002\nsample_prompts = ["a red sks", "a blue sks"]\ntrain_text_encoder = true\n')
    cfg = load_config(SampleConfig, toml_path=job, overrides=["rank=32"])
    assert cfg.rank == 32  # --set wins over the file
    assert cfg.lr == pytest.approx(2e-4)  # the file wins over the default
    assert cfg.sample_prompts == ("a red sks", "a blue sks")
    assert cfg.train_text_encoder is True
    assert cfg.alpha == 4.0  # untouched default


def test_a_base_models_recipe_sits_under_the_file_and_set(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text("lr = 0.0002\n")
    recipe = {"rank": 16, "lr": 1e-3, "alpha": 8.0}
    cfg = load_config(SampleConfig, recipe=recipe, toml_path=job, overrides=["alpha=2"])
    assert cfg.rank == 16  # the recipe wins over the default
    assert cfg.lr == pytest.approx(2e-4)  # the file wins over the recipe
    assert cfg.alpha == 2.0  # --set wins over the recipe
    assert recipe == {"rank": 16, "lr": 1e-3, "alpha": 8.0}  # the recipe itself is left as it was


def test_unknown_key_names_the_key_and_close_matches(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"unknown config key 'rnak'.*'rank'"):
        load_config(SampleConfig, overrides=["rnak=8"])
    job = tmp_path / "job.toml"
    job.write_text("learning_rate = 1e-4\n")
    with pytest.raises(InvalidInputError, match="unknown config key 'learning_rate'"):
        load_config(SampleConfig, toml_path=job)


def test_bad_values_are_refused_with_the_key() -> None:
    with pytest.raises(InvalidInputError, match=r"config key 'rank' expects a positive int, got '0'"):
        load_config(SampleConfig, overrides=["rank=0"])
    with pytest.raises(InvalidInputError, match=r"config key 'lr' expects a finite float, got 'nan'"):
        load_config(SampleConfig, overrides=["lr=nan"])
    with pytest.raises(InvalidInputError, match=r"'lr' expects a finite float"):
        load_config(SampleConfig, values={"lr": float("inf")})
    with pytest.raises(InvalidInputError, match=r"config key 'rank' expects an int, got 'four'"):
        load_config(SampleConfig, overrides=["rank=four"])
    with pytest.raises(InvalidInputError, match=r"'mixed_precision' expects one of 'no', 'fp16', 'bf16', got 'fp8'"):
        load_config(SampleConfig, overrides=["mixed_precision=fp8"])
    with pytest.raises(InvalidInputError, match="'train_text_encoder' expects a bool"):
        load_config(SampleConfig, overrides=["train_text_encoder=maybe"])
    with pytest.raises(InvalidInputError, match="--set expects key=value, got 'rank'"):
        load_config(SampleConfig, overrides=["rank"])
    # a field that allows non-finite values takes them
    assert math.isinf(load_config(SampleConfig, overrides=["snr_gamma=inf"]).snr_gamma)


def test_toml_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("rank = = 3\n")
    with pytest.raises(InvalidInputError, match="not valid TOML") as info:
        load_config(SampleConfig, toml_path=bad)
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_config(SampleConfig, toml_path=tmp_path / "missing.toml")
    table = tmp_path / "table.toml"
    table.write_text("[lora]\nrank = 3\n")
    with pytest.raises(InvalidInputError, match=r"found a table \[lora\]"):
        load_config(SampleConfig, toml_path=table)


def test_config_to_dict_is_json_safe_and_round_trips() -> None:
    cfg = load_config(SampleConfig, overrides=["output=runs/a", "rank=2"])
    data = config_to_dict(cfg)
    text = json.dumps(data, allow_nan=False)
    assert data["sample_prompts"] == ["a photo of sks"]
    assert config_from_dict(SampleConfig, json.loads(text)) == cfg


def test_parse_overrides_keeps_equals_in_values() -> None:
    assert parse_overrides(["sample_prompts=a=b"]) == {"sample_prompts": "a=b"}
