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


#: Runs that the invariance tests compare across layouts: name -> (overrides, layouts, needs a reference).
EXPERIMENTS = {
    "ntp": (["train.max_steps=6"], ("tp1", "tp2", "pp2", "dp2", "tp2pp2"), False),
    "olmo2": (["model=olmo2_tiny", "train.max_steps=4"], ("tp1", "tp2", "pp2"), False),
    "remit": (["method=remit", "train.max_steps=6"], ("tp1", "tp2pp2", "dp2"), True),
    "rho1": (["method=rho1", "train.max_steps=4"], ("tp1", "tp2pp2", "dp2"), True),
    "kd": (["method=kd", "method.temperature=2.0", "method.alpha=0.5", "train.max_steps=4"], ("tp1", "tp2pp2", "dp2"), True),
}
LAYOUTS = {
    "tp1": (1, []),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp2": (2, []),
    "tp2pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
}


@pytest.fixture(scope="session")
def layout_runs(tmp_path_factory):
    """``layout_runs(layout)`` -> {"reference": dir, experiment name: per-step records}.

    One spawned world per layout runs every experiment of EXPERIMENTS listed for it, one after
    the other (spawning ranks and importing megatron is the slow part on a 2-core machine).
    The reference-based methods share one reference: the demo model after 4 NTP steps,
    trained at TP1 in the tp1 world. Computed on first use, then shared by the session.
    """
    from megatron_midtrain.testing.distributed import run_distributed
    from megatron_midtrain.testing.runs import run_jobs

    done: dict = {}

    def get(layout: str) -> dict:
        if layout in done:
            return done[layout]
        root = tmp_path_factory.mktemp(f"layout_{layout}")
        world, parallel = LAYOUTS[layout]
        jobs, names = [], []
        if layout == "tp1":
            reference = str(root / "reference")
            jobs.append(("train", [f"run.dir={reference}", "train.max_steps=4", "optimizer.lr=1e-2", "run.seed=7"]))
            names.append("_reference")
        else:
            reference = get("tp1")["reference"]
        for name, (over, layouts, needs_ref) in EXPERIMENTS.items():
            if layout in layouts:
                ref = [f"reference.checkpoint={reference}"] if needs_ref else []
                jobs.append(("train", parallel + over + ref + [f"run.dir={root / name}"]))
                names.append(name)
        results = run_distributed(run_jobs, world, jobs)[0]
        done[layout] = {"reference": reference, **{n: r["records"] for n, r in zip(names, results) if n != "_reference"}}
        return done[layout]

    return get
