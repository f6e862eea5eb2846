"""The RL settings' rules that config validation needs: one definition, shared with ``rl``.

Pure constants and checks (no torch), so :mod:`megatron_midtrain.config.schema` validates a
method config without importing anything above ``config``; :mod:`megatron_midtrain.rl.grpo`,
:mod:`megatron_midtrain.rl.curriculum` and :mod:`megatron_midtrain.rl.prompts` import them from here.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np

# ---------------------------------------------------------------------- GRPO loss aggregation
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_AGG_ALIASES = {"drgrpo": "seq-mean-token-sum-norm", "dr_grpo": "seq-mean-token-sum-norm", "dr-grpo": "seq-mean-token-sum-norm"}


def canonical_agg(agg: str) -> str:
    """The canonical aggregation name (accepts the ``drgrpo`` aliases)."""
    agg = _AGG_ALIASES.get(agg, agg)
    if agg not in AGG_MODES:
        raise ValueError(f"loss aggregation {agg!r} is not one of {AGG_MODES} (or 'drgrpo')")
    return agg


# ---------------------------------------------------------------------- RMT curriculum
NUM_BUCKETS = 3
#: Default (easy, medium, hard) distributions at τ = 0, t1, t2: early steps favour easy and
#: medium tokens, late steps favour hard ones (the RMT paper does not publish its values).
DEFAULT_DISTRIBUTIONS: tuple[tuple[float, float, float], ...] = (
    (0.5, 0.4, 0.1),
    (0.2, 0.5, 0.3),
    (0.1, 0.3, 0.6),
)


def normalize_distribution(dist: Sequence[float]) -> np.ndarray:
    """A (easy, medium, hard) distribution as float64 summing to 1 (ValueError if it is not one)."""
    p = np.asarray(dist, dtype=np.float64)
    if p.shape != (NUM_BUCKETS,):
        raise ValueError(f"a curriculum distribution needs {NUM_BUCKETS} entries (easy, medium, hard), got {list(dist)}")
    if (p < 0).any() or not np.isfinite(p).all() or p.sum() <= 0:
        raise ValueError(f"a curriculum distribution needs non-negative finite entries with a positive sum, got {list(dist)}")
    return p / p.sum()


def check_curriculum(distributions: Sequence[Sequence[float]], t1: float, t2: float) -> tuple[np.ndarray, ...]:
    """The three normalised curriculum distributions; ValueError unless ``0 < t1 < t2 <= 1``
    and there are exactly three valid distributions."""
    if not 0.0 < t1 < t2 <= 1.0:
        raise ValueError(f"need 0 < t1 < t2 <= 1, got t1={t1}, t2={t2}")
    if len(distributions) != 3:
        raise ValueError(f"the curriculum needs exactly three distributions, got {len(distributions)}")
    return tuple(normalize_distribution(d) for d in distributions)


# ---------------------------------------------------------------------- answer formats
#: Where a response's answer is read (``method.answer_format``; see ``rl.rewards.extract_answer``).
PROMPT_ANSWER_FORMATS = ("answer_tag", "boxed", "answer_is", "plain", "gsm8k", "regex")
#: How a predicted and a reference answer are compared (``method.answer_normalize``; see
#: ``rl.rewards.normalize_answer``).
ANSWER_NORMALIZE_MODES = ("none", "numeric")


def answer_regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be a ``method.answer_regex`` (it must compile and have a capture
    group: the answer is group 1), or None when it can."""
    try:
        groups = re.compile(pattern).groups
    except re.error as err:
        return f"does not compile ({err})"
    if groups < 1:
        return "has no capture group (the answer is the text of group 1)"
    return None


# ---------------------------------------------------------------------- RMT prompts
_ALLOWED_FIELDS = {"context", "budget", "answer_hint"}


def template_fields(template: str) -> set[str]:
    """The replacement field names used by a ``str.format`` template."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def validate_template(template: str) -> None:
    """Refuse a template that lacks ``{context}`` or uses a field other than context/budget/answer_hint."""
    try:
        fields = template_fields(template)
    except ValueError as exc:  # unbalanced braces
        raise ValueError(f"bad prompt template ({exc}); write literal braces as '{{{{' and '}}}}'") from None
    unknown = fields - _ALLOWED_FIELDS
    if unknown:
        raise ValueError(
            f"prompt template uses unknown field(s) {sorted(unknown)}; allowed: {sorted(_ALLOWED_FIELDS)} "
            "(write literal braces as '{{' and '}}')"
        )
    if "context" not in fields:
        raise ValueError("prompt template must contain {context}")
