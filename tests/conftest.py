"""Shared test fixtures: offline, CPU-only, tiny models built in code."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402

from studio.home import StudioHome  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd1_pipe():
    """A shared tiny random SD1.x pipeline. Read-only: tests that change it build their own with the builder."""
    from studio.testing import build_tiny_sd1_pipeline

    return build_tiny_sd1_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_pipe():
    """A shared tiny random SDXL pipeline. Read-only: tests that change it build their own with the builder."""
    from studio.testing import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(seed=0)


@pytest.fixture
def home(tmp_path) -> StudioHome:
    """A fresh, empty studio home for one test."""
    return StudioHome(tmp_path / "home")
