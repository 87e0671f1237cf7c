"""Shared fixtures.

``shared_data_dir`` locates the study's data beside the repository (``<repo>/../shared/data``). Tests
that need it skip when it is absent, so a fresh clone passes; CI sets ``LLM_ATTR_REQUIRE_SHARED=1`` to
turn that skip into a failure, so the study's data can never silently go untested there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = (REPO_ROOT / ".." / "shared" / "data").resolve()


def require_shared(path: Path) -> Path:
    """``path`` if it exists; otherwise skip the test, or fail it when ``LLM_ATTR_REQUIRE_SHARED=1``."""
    if path.exists():
        return path
    message = f"study data not found at {path} (a 'shared' folder beside the repository)"
    if os.environ.get("LLM_ATTR_REQUIRE_SHARED") == "1":
        pytest.fail(f"{message}, and LLM_ATTR_REQUIRE_SHARED=1 requires it")
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``<repo>/../shared/data`` (skips, or fails under ``LLM_ATTR_REQUIRE_SHARED=1``, when absent)."""
    return require_shared(SHARED_DATA_DIR)
