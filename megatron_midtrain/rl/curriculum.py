r"""RMT curriculum sampling over entropy buckets (SPEC §3 "Curriculum sampling"; RMT paper eq. 4).

Bucket ids follow :mod:`megatron_midtrain.rl.entropy`: 0 easy, 1 medium, 2 hard.

Schedule
--------
With progress :math:`\tau = t / T \in [0, 1]` and three configured distributions
:math:`p^{(0)}, p^{(1)}, p^{(2)}` over (easy, medium, hard):

.. math::

    p_t = \begin{cases}
        p^{(0)} + \frac{\tau}{t_1}\,(p^{(1)} - p^{(0)})                   & 0 \le \tau \le t_1 \\
        p^{(1)} + \frac{\tau - t_1}{t_2 - t_1}\,(p^{(2)} - p^{(1)})     & t_1 < \tau \le t_2 \\
        p^{(2)}                                                          & \tau > t_2
    \end{cases}

i.e. the probabilities pass through :math:`p^{(0)}` at the start, :math:`p^{(1)}` at
:math:`t_1` (default 0.3) and :math:`p^{(2)}` at :math:`t_2` (default 0.7), and stay at
:math:`p^{(2)}` until the end. A convex combination of distributions is a distribution, so
no renormalisation is needed beyond the one applied to the configured inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_midtrain.config.rl_rules import DEFAULT_DISTRIBUTIONS, NUM_BUCKETS, check_curriculum
from megatron_midtrain.config.rl_rules import normalize_distribution as _normalize


def curriculum_probs(
    step: int,
    total_steps: int,
    distributions: Sequence[Sequence[float]] = DEFAULT_DISTRIBUTIONS,
    t1: float = 0.3,
    t2: float = 0.7,
) -> np.ndarray:
    """Sampling probabilities over (easy, medium, hard) at ``step`` of ``total_steps``.

    Piecewise-linear through ``distributions[0]`` at τ=0, ``distributions[1]`` at τ=t1 and
    ``distributions[2]`` at τ=t2, constant after t2 (formula in the module docstring).
    ``t1``/``t2`` are fractions of ``total_steps`` with ``0 < t1 < t2 <= 1``. Each configured
    distribution is normalised to sum 1. Returns a float64 array of shape ``[3]``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    p0, p1, p2 = check_curriculum(distributions, t1, t2)
    tau = min(max(step / total_steps, 0.0), 1.0)
    if tau <= t1:
        a = tau / t1
        return (1.0 - a) * p0 + a * p1
    if tau <= t2:
        a = (tau - t1) / (t2 - t1)
        return (1.0 - a) * p1 + a * p2
    return p2.copy()


@dataclass(frozen=True)
class PositionSample:
    """Positions drawn by :func:`sample_positions`.

    ``positions``: flat indices into ``bucket_ids.reshape(-1)``, sorted ascending, int64.
    ``buckets``: the bucket id of each selected position (same order).
    ``counts``: ``[3]`` int64, how many positions were drawn from each bucket.
    """

    positions: np.ndarray
    buckets: np.ndarray
    counts: np.ndarray

    def unravel(self, shape) -> tuple[np.ndarray, ...]:
        """``positions`` as a tuple of index arrays for an array of ``shape`` (e.g. (row, col))."""
        return np.unravel_index(self.positions, shape)


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def sample_positions(
    bucket_ids,
    loss_mask,
    probs: Sequence[float],
    num_positions: int,
    seed: int,
    step: int = 0,
) -> PositionSample:
    """Draw ``num_positions`` distinct positions Φ_RL from the entropy buckets, deterministically.

    Each draw picks a bucket ``k`` with probability ``probs[k]`` and then a position uniformly
    among the not-yet-chosen positions of bucket ``k`` where ``loss_mask`` is set (sampling
    without replacement). When a bucket runs out of candidates (or has none), its probability
    mass is redistributed proportionally over the buckets that still have some (renormalise
    over non-empty buckets); if every bucket with positive probability is exhausted the
    remaining draws fall back to the other non-empty buckets uniformly. Fewer than
    ``num_positions`` are returned only when fewer masked positions exist in total.

    The generator is ``numpy.random.default_rng([seed, step])``, so the same
    ``(seed, step, inputs)`` always gives the same sample, independent of global RNG state
    and of the process (ranks agree).

    Args:
        bucket_ids: integer array/tensor of bucket ids (0 easy, 1 medium, 2 hard), any shape.
        loss_mask: same shape; truthy where a position may be chosen.
        probs: ``[3]`` bucket probabilities, e.g. from :func:`curriculum_probs`.
        num_positions: how many positions to select.
        seed, step: RNG seed material.
    """
    buckets = _to_numpy(bucket_ids).reshape(-1).astype(np.int64)
    mask = _to_numpy(loss_mask).reshape(-1).astype(bool)
    if buckets.shape != mask.shape:
        raise ValueError(f"bucket_ids has {buckets.size} elements but loss_mask has {mask.size}")
    if num_positions < 0:
        raise ValueError(f"num_positions must be non-negative, got {num_positions}")
    p = _normalize(probs)
    valid = mask & (buckets >= 0) & (buckets < NUM_BUCKETS)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step) & 0xFFFFFFFF])
    pools = [rng.permutation(np.flatnonzero(valid & (buckets == k))) for k in range(NUM_BUCKETS)]
    taken = [0] * NUM_BUCKETS
    total = int(valid.sum())
    n = min(num_positions, total)
    chosen: list[int] = []
    chosen_buckets: list[int] = []
    for _ in range(n):
        left = np.array([len(pools[k]) - taken[k] for k in range(NUM_BUCKETS)], dtype=np.float64)
        w = p * (left > 0)
        if w.sum() <= 0:
            w = (left > 0).astype(np.float64)
        k = int(rng.choice(NUM_BUCKETS, p=w / w.sum()))
        chosen.append(int(pools[k][taken[k]]))
        chosen_buckets.append(k)
        taken[k] += 1
    order = np.argsort(np.asarray(chosen, dtype=np.int64), kind="stable")
    positions = np.asarray(chosen, dtype=np.int64)[order]
    sel_buckets = np.asarray(chosen_buckets, dtype=np.int64)[order]
    counts = np.bincount(sel_buckets, minlength=NUM_BUCKETS).astype(np.int64)
    return PositionSample(positions=positions, buckets=sel_buckets, counts=counts)
