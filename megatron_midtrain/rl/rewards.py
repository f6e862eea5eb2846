r"""RMT rewards (SPEC §3 "Length reward", "Correctness reward", "Combining the rewards").

Pure functions on Python strings/bytes/numbers (and tensors where noted):

* :func:`length_reward` — the triangular length reward against the budget :math:`B_t`.
* :func:`prefix_match_reward` / :func:`score_prefix_match` — the RPT prefix-match correctness
  reward on UTF-8 bytes with the token-boundary rule.
* :func:`extract_answer` — the answer inside ``<answer>…</answer>``, ``\boxed{…}``, after
  "The answer is" (the demo corpus's arithmetic format), after GSM8K's ``####``, or the first
  capture group of a user regex.
* :func:`reference_answer` — the ground truth of a problem (the text after the last ``####`` of
  a GSM8K-style solution, else the answer as it is).
* :func:`normalize_answer` — the comparison key: ``none`` (default) or ``numeric``.
* :func:`score_exact_match` — the verifiable-task (arithmetic) reward (``.reward`` is the float).
* :func:`combine_rewards` — ``sum`` (default), ``weighted`` or ``product``.

Conventions (where the paper/SPEC are silent, chosen to match verl / NeMo-RL / TRL):

* The **last** answer occurrence in a response counts (the model may restate or correct itself
  while reasoning; verl's gsm8k/math scorers also take the last match). This holds for every
  format, ``regex`` included (the first capture group of the last match).
* A response with **no** parseable answer gets ``missing_penalty``; one whose answer is empty
  (only whitespace) gets ``empty_penalty``. A wrong answer gets 0, a correct one 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_midtrain.rl.answers import ANSWER_FORMATS, NORMALIZE_MODES, numeric_value  # noqa: F401 (re-exported)
from megatron_midtrain.rl.answers import extract_answer, normalize_answer, reference_answer

COMBINE_MODES = ("sum", "weighted", "product")

#: Default penalty for a response without a parseable answer (missing tag / unbalanced ``\boxed{``).
DEFAULT_MISSING_PENALTY = -1.0
#: Default penalty for an answer that is present but empty (``<answer> </answer>``).
DEFAULT_EMPTY_PENALTY = -1.0

STATUS_CORRECT, STATUS_WRONG, STATUS_EMPTY, STATUS_MISSING = "correct", "wrong", "empty", "missing"


# --------------------------------------------------------------------------------------------
# Length reward
# --------------------------------------------------------------------------------------------
def length_reward(length, budget):
    r"""Triangular length reward (SPEC §3; RMT paper eq. 2).

    .. math::

        r_{len}(\ell; B) = \begin{cases}
            \ell / B        & 0 \le \ell \le B \\
            (2B - \ell) / B & B < \ell \le 2B \\
            0               & \ell > 2B
        \end{cases}

    It peaks at 1 for ``length == budget`` and falls linearly to 0 at 0 and at ``2 * budget``.
    ``length`` is the number of generated response tokens (the caller decides whether the
    answer span and EOS count; the RMT loop counts every generated token up to and including
    the stop). Works on Python numbers (returns ``float``) and on tensors (elementwise,
    returns a float tensor; ``budget`` may be a scalar or a broadcastable tensor).

    Raises:
        ValueError: if ``budget <= 0`` or ``length < 0`` (Python numbers only).
    """
    if isinstance(length, torch.Tensor) or isinstance(budget, torch.Tensor):
        ell = torch.as_tensor(length, dtype=torch.float64)
        b = torch.as_tensor(budget, dtype=torch.float64, device=ell.device)
        if bool((b <= 0).any()):
            raise ValueError("budget must be positive")
        up = ell / b
        down = (2.0 * b - ell) / b
        out = torch.where(ell <= b, up, torch.where(ell <= 2.0 * b, down, torch.zeros_like(up)))
        return out.clamp(min=0.0).float()
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    if length < 0:
        raise ValueError(f"length must be non-negative, got {length}")
    if length <= budget:
        return float(length) / float(budget)
    if length <= 2 * budget:
        return float(2 * budget - length) / float(budget)
    return 0.0


# --------------------------------------------------------------------------------------------
# RPT prefix-match reward
# --------------------------------------------------------------------------------------------
def _as_bytes(piece) -> bytes:
    if isinstance(piece, (bytes, bytearray)):
        return bytes(piece)
    if isinstance(piece, str):
        return piece.encode("utf-8")
    raise TypeError(f"ground-truth token pieces must be bytes or str, got {type(piece).__name__}")


def token_boundaries(gt_token_bytes: Sequence[bytes | str]) -> tuple[bytes, list[int]]:
    """Concatenated ground-truth bytes and the cumulative byte offsets of its token ends.

    ``gt_token_bytes`` is the byte string of each ground-truth continuation token (for a
    byte-level BPE tokenizer a token may be a partial UTF-8 character, so pass ``bytes``;
    ``str`` pieces are UTF-8 encoded). Offsets: ``[len(t0), len(t0)+len(t1), ...]``.
    Zero-length tokens add no new boundary.
    """
    pieces = [_as_bytes(p) for p in gt_token_bytes]
    ends: list[int] = []
    total = 0
    for p in pieces:
        if not p:
            continue
        total += len(p)
        ends.append(total)
    return b"".join(pieces), ends


@dataclass(frozen=True)
class RewardResult:
    """A correctness reward with its classification, for metrics (accuracy, format-error rates)."""

    reward: float
    status: str  # "correct" | "wrong" | "empty" | "missing"
    prediction: str | None

    @property
    def correct(self) -> bool:
        return self.status == STATUS_CORRECT


_WS = b" \t\n\r\f\v"


def prefix_match(prediction: str | bytes, gt_token_bytes: Sequence[bytes | str], strip_leading_whitespace: bool = True) -> bool:
    r"""The RPT rule on bytes: ``g.startswith(y) and len(y) ∈ L_gt``.

    With y the UTF-8 bytes of the prediction and g the concatenated bytes of the ground-truth
    continuation tokens, :math:`\mathcal{L}_{gt}` the set of cumulative byte lengths of the
    ground-truth tokens (token boundaries), the prediction is correct iff y is a byte prefix of g
    and ends exactly on a token boundary. A prediction may therefore span several ground-truth
    tokens, but may not stop inside one (nor inside a multi-byte character split across tokens).

    Leading whitespace (``strip_leading_whitespace=True``, default): tokenizers put the
    word-separating space inside the token (``" the"``) while a model writes
    ``<answer>the</answer>``. Leading whitespace is removed from both y and g; boundaries
    are shifted by the removed amount and those falling inside the removed whitespace are
    dropped. With ``False`` the comparison is on raw bytes.

    An empty prediction never matches (0 is not a token boundary).
    """
    y = _as_bytes(prediction)
    g, ends = token_boundaries(gt_token_bytes)
    if strip_leading_whitespace:
        y = y.lstrip(_WS)
        stripped = g.lstrip(_WS)
        shift = len(g) - len(stripped)
        g = stripped
        ends = [e - shift for e in ends if e - shift > 0]
    if not y:
        return False
    return g.startswith(y) and len(y) in set(ends)


def score_prefix_match(
    response: str,
    gt_token_bytes: Sequence[bytes | str],
    answer_format: str = "answer_tag",
    missing_penalty: float = DEFAULT_MISSING_PENALTY,
    empty_penalty: float = DEFAULT_EMPTY_PENALTY,
    strip_leading_whitespace: bool = True,
    answer_regex=None,
) -> RewardResult:
    r"""RPT prefix-match correctness reward for one response, with its status.

    .. math::

        r_{acc} = \begin{cases}
            1 & \text{answer parsed, non-empty, } g\text{.startswith}(y) \wedge |y| \in \mathcal{L}_{gt} \\
            0 & \text{answer parsed, non-empty, otherwise} \\
            \text{empty\_penalty} & \text{answer parsed but empty after stripping whitespace} \\
            \text{missing\_penalty} & \text{no parseable answer (missing tag, unbalanced box)}
        \end{cases}

    The answer is taken with :func:`extract_answer` (``answer_regex`` for ``regex``). Trailing whitespace of the answer is
    removed (``<answer> the </answer>`` predicts ``"the"``); leading whitespace is handled by
    :func:`prefix_match`. See :func:`prefix_match` for the byte/boundary rule.

    ``answer_format="plain"`` (the response is the predicted continuation itself, as the
    ``{context}`` demo prompt makes it): the response's bytes are compared as they are, whitespace
    included (pass the text as it reads after the prompt, ``tasks.response_text(after=...)``); only
    a response with no bytes at all (e.g. an immediate EOS) is empty. A lone space or a newline
    is then a prediction like any other, right when the ground truth's next token is one.
    """
    raw = extract_answer(response, answer_format, answer_regex)
    if raw is None:
        return RewardResult(float(missing_penalty), STATUS_MISSING, None)
    if answer_format == "plain":
        # The response *is* the continuation, token for token, so its bytes are compared as they
        # are. Stripping whitespace here made every whitespace ground-truth token unmatchable (a
        # correct lone "▁" before a number, or a newline, scored as empty, -1) and rewarded skipping
        # it ("2" for " 23" scored correct). The demo's SentencePiece puts a lone "▁" before every
        # number (17% of the arithmetic tokens), so RMT was rewarded for dropping it.
        if not raw:
            return RewardResult(float(empty_penalty), STATUS_EMPTY, raw)
        ok = prefix_match(raw, gt_token_bytes, strip_leading_whitespace=False)
        return RewardResult(1.0 if ok else 0.0, STATUS_CORRECT if ok else STATUS_WRONG, raw)
    pred = raw.strip() if strip_leading_whitespace else raw.rstrip()
    if not pred.strip():
        return RewardResult(float(empty_penalty), STATUS_EMPTY, pred)
    ok = prefix_match(pred, gt_token_bytes, strip_leading_whitespace=strip_leading_whitespace)
    return RewardResult(1.0 if ok else 0.0, STATUS_CORRECT if ok else STATUS_WRONG, pred)


# --------------------------------------------------------------------------------------------
# Exact-match reward (verifiable arithmetic mode)
# --------------------------------------------------------------------------------------------
def score_exact_match(
    response: str,
    target,
    answer_format: str = "answer_is",
    missing_penalty: float = DEFAULT_MISSING_PENALTY,
    empty_penalty: float = DEFAULT_EMPTY_PENALTY,
    answer_regex=None,
    normalize: str = "none",
) -> RewardResult:
    """Exact-match reward on the final answer: 1 if ``normalize_answer(pred, normalize) ==
    normalize_answer(reference_answer(target), normalize)``, else 0.

    The prediction is :func:`extract_answer` (``answer_regex`` for ``regex``), stripped; the
    reference is :func:`reference_answer` (a GSM8K solution counts by its ``#### N``).
    Missing / empty answers take the penalties as in :func:`score_prefix_match` (empty is
    judged before normalisation). ``target`` may be a number or a string. The default format
    ``answer_is`` matches the demo corpus ("... The answer is 29.").
    """
    raw = extract_answer(response, answer_format, answer_regex)
    if raw is None:
        return RewardResult(float(missing_penalty), STATUS_MISSING, None)
    pred = raw.strip()
    if not pred:
        return RewardResult(float(empty_penalty), STATUS_EMPTY, pred)
    ok = normalize_answer(pred, normalize) == normalize_answer(reference_answer(target), normalize)
    return RewardResult(1.0 if ok else 0.0, STATUS_CORRECT if ok else STATUS_WRONG, pred)


# --------------------------------------------------------------------------------------------
# Combination
# --------------------------------------------------------------------------------------------
def combine_rewards(r_acc, r_len, mode: str = "sum", w_acc: float = 1.0, w_len: float = 1.0):
    r"""Combine correctness and length rewards (SPEC §3: configurable, default the sum).

    * ``sum`` (default): :math:`r = r_{acc} + r_{len}`.
    * ``weighted``: :math:`r = w_{acc} r_{acc} + w_{len} r_{len}`.
    * ``product``: :math:`r = r_{acc} \cdot r_{len}` when :math:`r_{acc} > 0`, else :math:`r_{acc}`
      (the length bonus only scales a correct answer; penalties pass through unchanged).

    Works on Python numbers and (broadcastable) tensors.
    """
    if mode not in COMBINE_MODES:
        raise ValueError(f"reward combine mode {mode!r} is not one of {COMBINE_MODES}")
    if mode == "sum":
        return r_acc + r_len
    if mode == "weighted":
        return w_acc * r_acc + w_len * r_len
    if isinstance(r_acc, torch.Tensor) or isinstance(r_len, torch.Tensor):
        a = torch.as_tensor(r_acc, dtype=torch.float32)
        ln = torch.as_tensor(r_len, dtype=torch.float32)
        return torch.where(a > 0, a * ln, a)
    return r_acc * r_len if r_acc > 0 else r_acc


def is_finite_reward(r: float) -> bool:
    """True for a finite float reward (guards NaN from user reward functions)."""
    return math.isfinite(float(r))
