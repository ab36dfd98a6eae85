"""Shared test settings: derandomised hypothesis, the data directory, small configs."""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "jaxgpt", derandomize=True, deadline=None, max_examples=10,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("jaxgpt")


@pytest.fixture
def shared_data_dir() -> Path:
    """The public data sets (JAXGPT_DATA_DIR); tests needing them skip with a reason when unset."""
    value = os.environ.get("JAXGPT_DATA_DIR")
    if not value:
        pytest.skip("JAXGPT_DATA_DIR is not set: the public data sets (../shared/data) are needed")
    path = Path(value)
    if not path.is_dir():
        pytest.skip(f"JAXGPT_DATA_DIR={value} is not a directory")
    return path
