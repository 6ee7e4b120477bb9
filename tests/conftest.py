"""Shared fixtures: tiny random models for unit speed, real pretrained models where marked `real`."""

from __future__ import annotations

import os
from pathlib import Path

# pytest-xdist workers share the cores: each gets its share of OpenMP threads, set before torch loads (two
# pools spinning on the same cores make every parallel region wait for a time slice: ~5x slower on 2 cores)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0))
                                                    // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest  # noqa: E402

import actlab  # noqa: E402
from actlab.models.tiny import TINY_CONFIGS  # noqa: E402

TINY_MODELS = sorted(TINY_CONFIGS)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# tests never reach a model hub: hub ids fail fast with a clear error instead of waiting on the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (the project's ../shared/data folder)")
    return path


@pytest.fixture(scope="session", params=TINY_MODELS)
def tiny(request) -> actlab.LoadedModel:
    return actlab.load_model(request.param)


@pytest.fixture(scope="session")
def tiny_llama() -> actlab.LoadedModel:
    return actlab.load_model("tiny-llama")


@pytest.fixture(scope="session")
def smollm2() -> actlab.LoadedModel:
    return actlab.load_model("smollm2-135m")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ACTLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
