"""Shared test setup: Hypothesis profiles, the strict (CuPy-like) backend, and a float64 fixture."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

import scratchlm as sl  # noqa: E402
from scratchlm import backend  # noqa: E402
from strict_backend import strict_numpy  # noqa: E402

# CI runs derandomized, so a failure there reproduces on any machine; locally Hypothesis explores.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=30,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", deadline=None, max_examples=30,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

backend.register_backend("strict", lambda: strict_numpy)

# The tiny shakespeare copy beside the repository (never copied into it).
SHARED_CORPORA = Path(__file__).resolve().parents[1].parent / "shared" / "corpora"


@pytest.fixture
def float64():
    """Compute in float64 within the test (gradient checks), then restore the policy."""
    previous = backend.get_default_dtype()
    sl.set_default_dtype(np.float64)
    yield
    sl.set_default_dtype(previous)


@pytest.fixture(params=["numpy", "strict"])
def any_backend(request, float64):
    """Run a test on NumPy and on the strict backend that refuses stray NumPy calls."""
    previous = backend.get_backend()
    sl.use_backend(request.param)
    yield request.param
    sl.use_backend(previous)
