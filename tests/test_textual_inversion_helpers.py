"""Placeholder-token helpers and prompt templates used by the textual-inversion trainer."""

from __future__ import annotations

import random

import pytest
import torch

from studio.errors import InvalidInputError
from studio.testing import build_tiny_sd1_pipeline
from trainers.core.embeddings import (
    TrainableRows,
    add_placeholder_tokens,
    expand_placeholder,
    init_vector,
    table_digest,
    validate_placeholder_token,
    vector_tokens,
)
from trainers.core.templates import caption_prompt, object_prompt, style_prompt


def test_placeholder_tokens_are_namespaced_and_expand_like_diffusers():
    assert validate_placeholder_token("<my-toy>") == "<my-toy>"
    for bad in ("my-toy", "<My Toy>", "<a.b>", "<>", "<studio-ti-3>"):
        with pytest.raises(InvalidInputError, match="placeholder_token"):
            validate_placeholder_token(bad)
    assert vector_tokens("<t>", 3) == ["<t>", "<t>_1", "<t>_2"]
    assert expand_placeholder("a <t> on a <t>", "<t>", 2) == "a <t> <t>_1 on a <t> <t>_1"


def test_templates_and_captions_always_contain_the_placeholder():
    assert "<t>" in object_prompt("<t>", random.Random(3))
    assert "style of <t>" in style_prompt("<t>", random.Random(3))
    assert caption_prompt("a toy on a white background", "<t>", "toy") == "a <t> on a white background"
    assert caption_prompt("red {} here", "<t>", "toy") == "red <t> here"
    assert caption_prompt("a thing", "<t>", "toy") == "<t>, a thing"


def test_init_word_rows_and_multi_token_average():
    pipe = build_tiny_sd1_pipeline()
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    ids = pipe.tokenizer("toy", add_special_tokens=False).input_ids
    assert torch.equal(init_vector(pipe.tokenizer, pipe.text_encoder, "toy"), table[ids[0]])
    pair = pipe.tokenizer("teddy bear", add_special_tokens=False).input_ids
    assert len(pair) == 2
    assert torch.allclose(init_vector(pipe.tokenizer, pipe.text_encoder, "teddy bear"), table[pair].mean(0))
    with pytest.raises(InvalidInputError, match="init_word"):
        init_vector(pipe.tokenizer, pipe.text_encoder, "   ")


def test_trainable_rows_give_gradients_to_new_rows_only():
    pipe = build_tiny_sd1_pipeline()
    ids = add_placeholder_tokens(pipe.tokenizer, pipe.text_encoder, ["<x>", "<x>_1"], torch.zeros(32))
    with pytest.raises(InvalidInputError, match="already has"):
        add_placeholder_tokens(pipe.tokenizer, pipe.text_encoder, ["<x>"], torch.zeros(32))
    rows = TrainableRows(pipe.text_encoder, ids, torch.ones(2, 32))
    tokens = pipe.tokenizer(["a <x> <x>_1 toy"], return_tensors="pt").input_ids
    # Not .sum(): the final layer norm makes the sum of each output vector constant.
    pipe.text_encoder(tokens)[0].pow(2).sum().backward()
    assert rows.weight.grad is not None and rows.weight.grad.abs().sum() > 0
    assert pipe.text_encoder.get_input_embeddings().weight.grad is None
    rows.remove()
    rows.write_to_table(pipe.text_encoder)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), torch.ones(2, 32))


def test_table_digest_sees_any_change_to_the_original_rows():
    pipe = build_tiny_sd1_pipeline()
    before = table_digest(pipe.text_encoder, below=49408)
    ids = add_placeholder_tokens(pipe.tokenizer, pipe.text_encoder, ["<y>"], torch.zeros(32))
    assert ids == [49408]
    assert table_digest(pipe.text_encoder, below=49408) == before
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[5, 0] += 1e-6
    assert table_digest(pipe.text_encoder, below=49408) != before
