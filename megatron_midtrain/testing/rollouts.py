"""Fixed rollouts and a synthetic entropy index, so RL runs can be compared across layouts.

Generation samples from the policy, so two layouts would draw different rollouts after the
first update; tests replace it with :func:`fixed_rollouts`, whose responses depend only on
the prompt's tokens, the rollout's place in its group and the step (not on the rank or on the
row's index inside a DP shard), so every layout sees the same rollouts for the same prompts.
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np

#: The demo tokenizer's EOD id (fixed rollouts end some responses with it).
DEMO_EOD = 2


def fixed_rollouts(step: int, prompt_rows: list[list[int]], group_size: int):
    """Deterministic responses of 1-8 tokens (a third of them EOD only, i.e. empty) for ``prompt_rows`` (G consecutive rows per prompt)."""
    from megatron_midtrain.rl.generation import GenerationResult

    responses, reasons = [], []
    for i, prompt in enumerate(prompt_rows):
        key = zlib.crc32(np.asarray(prompt, dtype=np.int64).tobytes())
        rng = np.random.default_rng([step, key, i % group_size])
        resp = rng.integers(4, 600, size=int(rng.integers(1, 9))).tolist()
        kind = (key + i % group_size) % 3
        if kind == 0:  # an empty answer: its reward differs from the others' inside the group
            resp = [DEMO_EOD]
        elif kind == 1:
            resp[-1] = DEMO_EOD
        responses.append(resp)
        reasons.append("eos" if resp[-1] == DEMO_EOD else "length")
    return GenerationResult(responses=responses, finish_reasons=reasons,
                            generated_tokens=sum(map(len, responses)), seconds=1e-3)


def use_fixed_rollouts(trainer) -> None:
    """Make an RL trainer's step take :func:`fixed_rollouts` as its rollout source instead of generating."""
    group = trainer.cfg.method.group_size
    trainer.method_step.rollouts = lambda step, rows, params, seed: fixed_rollouts(step, rows, group)


def fake_entropy_index(prefix: str, out: str) -> str:
    """An entropy index whose bucket is ``token_id % 3``, aligned with the dataset at ``prefix``
    as tools/preprocess_entropy.py would write it."""
    from megatron_midtrain.rl import entropy as ent

    info = ent.dataset_alignment(prefix)
    tokens = np.memmap(prefix + ".bin", dtype=np.dtype(info["token_dtype"]), mode="r")
    os.makedirs(out, exist_ok=True)
    np.save(os.path.join(out, ent.ENTROPY_FILE), tokens.astype(np.float32))
    np.save(os.path.join(out, ent.BUCKETS_FILE), (tokens % 3).astype(np.uint8))
    with open(os.path.join(out, ent.META_FILE), "w") as fh:
        json.dump({"format": ent.FORMAT, "complete": True, "dataset": info}, fh)
    return out


def demo_entropy_dirs(cache_dir: str, out_root: str) -> list[str]:
    """Fake entropy indexes for the demo corpus's two datasets (prose, math), in data order."""
    from megatron_midtrain.data.demo import ensure_demo_assets

    assets = ensure_demo_assets(cache_dir)
    return [fake_entropy_index(str(assets.prose_prefix), os.path.join(out_root, "prose")),
            fake_entropy_index(str(assets.math_prefix), os.path.join(out_root, "math"))]
