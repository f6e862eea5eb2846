"""RMT dynamic token budget (SPEC §3 "Dynamic budget"; RMT paper eq. 1).

.. math::

    B_t = \\max\\big(B_{min},\\ \\lfloor B_0 \\cdot \\gamma^{t/T} \\rfloor\\big)

with the paper's defaults B0 = 800, γ = 0.2, B_min = 1. The budget is stated in the prompt
(see :mod:`megatron_midtrain.rl.prompts`) and is the peak of the triangular length reward
(:func:`megatron_midtrain.rl.rewards.length_reward`).
"""

from __future__ import annotations

import math


def token_budget(step: int, total_steps: int, b0: int = 800, gamma: float = 0.2, b_min: int = 1) -> int:
    """Token budget at training step ``step`` of ``total_steps``.

    ``B_t = max(b_min, floor(b0 * gamma ** (step / total_steps)))``.

    ``step`` is clamped to ``[0, total_steps]`` so the budget never rises above ``b0`` nor
    decays past ``b0 * gamma`` (the value at t = T). A tiny epsilon guards the floor against
    float round-off (e.g. ``800 * 0.2 ** 1`` evaluating to ``159.99999999999997``).

    Raises:
        ValueError: on ``total_steps <= 0``, ``gamma`` outside ``(0, 1]``, ``b0 < 1`` or ``b_min < 0``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if b0 < 1 or b_min < 0:
        raise ValueError(f"need b0 >= 1 and b_min >= 0, got b0={b0}, b_min={b_min}")
    frac = min(max(step, 0), total_steps) / total_steps
    value = b0 * gamma**frac
    return int(max(b_min, math.floor(value + 1e-9)))
