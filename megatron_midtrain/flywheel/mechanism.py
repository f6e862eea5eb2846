"""Where ReMiT's weight goes: the weights of eq. 5 on held-out text, by domain and token kind.

For a policy checkpoint and the reference, both probed on the same validation positions
(:func:`~megatron_midtrain.flywheel.probe.probe_tokens`), the weights are recomputed with the
training code's own :func:`~megatron_midtrain.losses.remit.remit_token_weights` (same ε, same
centring) and summarised: mean weight on arithmetic and on prose tokens, on number tokens and
on the final-answer tokens ("The answer is N.") against the rest, the share at each clip bound,
and the raw log-ratio Δ = log p_ref − log p_θ before centring.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_midtrain.losses.remit import document_ids_from_tokens, remit_token_weights

ANSWER_PREFIX = "The answer is"


def number_tokens(tokens: np.ndarray, tokenizer) -> np.ndarray:
    """True where the token's text contains a digit."""
    table = np.array([any(c.isdigit() for c in tokenizer.detokenize([i])) for i in range(int(tokens.max()) + 1)])
    return table[tokens]


def answer_tokens(labels: np.ndarray, tokenizer) -> np.ndarray:
    """True for target tokens inside a final answer: after "The answer is", up to the next "."."""
    out = np.zeros(labels.shape, dtype=bool)
    for r, row in enumerate(labels.tolist()):
        text = tokenizer.detokenize(row)
        if ANSWER_PREFIX not in text:
            continue
        # Character offset where each token's text ends, from growing prefixes (rows are short).
        ends = [len(tokenizer.detokenize(row[: t + 1])) for t in range(len(row))]
        start = 0
        while (at := text.find(ANSWER_PREFIX, start)) >= 0:
            lo = at + len(ANSWER_PREFIX)
            stop = text.find(".", lo)
            hi = len(text) if stop < 0 else stop
            for t, end in enumerate(ends):  # tokens overlapping the answer's characters [lo, hi)
                begin = ends[t - 1] if t else 0
                if begin < hi and end > lo and text[max(begin, lo):min(end, hi)].strip():
                    out[r, t] = True
            start = lo
    return out


def _mean(x: np.ndarray, where: np.ndarray) -> float:
    return float(x[where].mean()) if where.any() else float("nan")


def weight_summary(policy: dict, reference: dict, clip_eps: float, center: str, eod_id: int, tokenizer) -> dict:
    """Summary of the ReMiT weights one domain's probes imply (see the module docstring)."""
    mask = torch.as_tensor(policy["mask"])
    docs = document_ids_from_tokens(torch.as_tensor(policy["tokens"]), eod_id) if center == "document" else None
    w = remit_token_weights(torch.as_tensor(policy["logp"]), torch.as_tensor(reference["logp"]), mask, clip_eps, center,
                            docs).numpy()
    m = policy["mask"]
    delta = reference["logp"] - policy["logp"]
    numbers = number_tokens(policy["labels"], tokenizer) & m
    answers = answer_tokens(policy["labels"], tokenizer) & m
    tol = 1e-6
    return {
        "w_mean": _mean(w, m),
        "w_numbers": _mean(w, numbers), "w_other_than_numbers": _mean(w, m & ~numbers),
        "w_answers": _mean(w, answers), "w_other_than_answers": _mean(w, m & ~answers),
        "frac_low": _mean((w <= 1 - clip_eps + tol).astype(float), m),
        "frac_high": _mean((w >= 1 + clip_eps - tol).astype(float), m),
        "delta_mean": _mean(delta, m),
        "number_share": _mean(numbers.astype(float), m),
        "answer_share": _mean(answers.astype(float), m),
    }
