import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def demo_cache(tmp_path_factory):
    """One demo-asset cache for the whole session (built on first use by the code under test)."""
    cache = os.environ.get("MIDTRAIN_TEST_CACHE") or str(tmp_path_factory.mktemp("midtrain_cache"))
    os.environ["MIDTRAIN_CACHE"] = cache
    from megatron_midtrain.data.demo import ensure_demo_assets

    ensure_demo_assets(cache)
    return cache
