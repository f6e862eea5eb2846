"""Per-token log-probabilities of a saved checkpoint, in a single process (TP1/PP1).

Used by offline tools (``tools/token_delta_report.py``, ``tools/select_miniplm.py``) that
compare two models token by token. A checkpoint is rebuilt from its own ``meta.json``
(``model_config``, ``tokenizer_path``), always at TP1/PP1: dist_checkpointing stores
tensors by global name and offset, so a checkpoint saved at any TP/PP loads here.

Windowing (inputs longer than the model context)
-----------------------------------------------
With ``W`` = ``max_position_embeddings`` (the window) and ``S`` = the stride (default
``W // 2``), a sequence of ``n`` tokens is covered by windows ``[a, a + W)`` with
``a = 0, S, 2S, ...`` until a window reaches the end. Every target token ``t >= 1`` is
scored exactly once:

* in the first window, every token ``1 .. W-1`` is scored (it sees its full prefix);
* in every later window only the tokens not yet scored are, i.e. its last ``S`` positions
  (fewer in the final window), each with at least ``W - S`` tokens of context.

So for ``n <= W`` the result is exactly the full-prefix log-prob, and beyond ``W`` each
token is conditioned on a truncated prefix of ``W - S`` to ``W - 1`` tokens (a smaller
stride gives more context per token at the cost of more forward passes).

Batching: windows of several sequences are packed into batches of at most
``max_batch_tokens`` padded tokens, sorted by length, and a batch never mixes windows
more than 2x shorter than its longest (bounded padding). Padding goes to
the right; attention is causal, so padded positions never influence real ones.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields
from typing import Iterable, Sequence

from megatron_midtrain.errors import UserError

# torch / megatron-core are imported inside the functions that need them: the light helpers
# (peek_checkpoint, check_same_tokenizer) let the tools refuse bad input in well under a second.

#: Default padded-token budget of one forward pass.
DEFAULT_BATCH_TOKENS = 8192


# ----------------------------------------------------------------------------------------
# Process-group set-up (one rank)
# ----------------------------------------------------------------------------------------


def ensure_single_process_parallel_state(seed: int = 0) -> None:
    """Initialise a process group (a 1-rank one outside torchrun) and megatron's TP1/PP1 groups
    unless already done (:func:`megatron_midtrain.training.distributed.init_process_groups`).

    If a process group already exists it is reused; megatron's model-parallel state must then
    be TP1/PP1 (the log-probs and the converter build whole, unsharded models).
    """
    from megatron.core import tensor_parallel

    from megatron_midtrain.training.distributed import init_process_groups, model_parallel_layout

    have = model_parallel_layout()
    if have is not None and have[:2] != (1, 1):
        raise UserError(
            f"whole-model (TP1/PP1) log-probs need TP1/PP1 model-parallel state, but this process is already set up "
            f"with TP{have[0]}/PP{have[1]}",
            "run the log-prob tools as a single process (plain python, not torchrun)",
        )
    init_process_groups(1, 1, share_threads=False)
    # GPTModel construction draws from megatron's model-parallel RNG tracker; seed it once.
    tracker = tensor_parallel.get_cuda_rng_tracker()
    if not tracker.get_states():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


# ----------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------


def plan_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(start, end, first_scored)`` covering targets ``1 .. n-1`` exactly once.

    The window ``[start, end)`` is run through the model; targets ``first_scored .. end-1``
    are read from it (the log-prob of token ``t`` comes from the logits at ``t - 1``).
    """
    if window < 2:
        raise ValueError(f"window={window} must be >= 2")
    if not 1 <= stride <= window - 1:
        raise ValueError(f"stride={stride} must be in [1, window - 1]")
    if n < 2:
        return []
    out = []
    start, scored_up_to = 0, 1  # next target to score
    while True:
        end = min(start + window, n)
        out.append((start, end, scored_up_to))
        scored_up_to = end
        if end >= n:
            return out
        # stride < window: the next window overlaps this one and ends past it (scores >= 1 new target)
        start += stride


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------


_ITER_RE = re.compile(r"^iter_(\d{7})$")
_META = "meta.json"


@dataclass
class CheckpointInfo:
    """What ``meta.json`` says about a checkpoint, read without torch or megatron."""

    path: str
    meta: dict

    @property
    def tokenizer_id(self) -> str | None:
        return self.meta.get("tokenizer")

    @property
    def step(self):
        return self.meta.get("step")


def peek_checkpoint(path: str, what: str = "checkpoint") -> CheckpointInfo:
    """Resolve ``path`` like :func:`megatron_midtrain.training.checkpoint.resolve_checkpoint_dir`
    (an ``iter_NNNNNNN`` dir, a ``checkpoints/`` root or a run dir -> its newest complete
    checkpoint) and read its meta.json, importing neither torch nor megatron-core."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise UserError(f"{what} {path} does not exist or is not a directory",
                        "point at a run dir, its checkpoints/ or an iter_NNNNNNN directory")
    found = path if os.path.isfile(os.path.join(path, _META)) else None
    if found is None:
        for root in (path, os.path.join(path, "checkpoints")):
            steps = sorted(
                int(m.group(1)) for m in (_ITER_RE.match(n) for n in (os.listdir(root) if os.path.isdir(root) else []))
                if m and os.path.isfile(os.path.join(root, m.group(0), _META))
            )
            if steps:
                found = os.path.join(root, f"iter_{steps[-1]:07d}")
                break
    if found is None:
        raise UserError(f"{what} {path} holds no complete checkpoint (no meta.json)",
                        "point at a run dir, its checkpoints/ or an iter_NNNNNNN directory")
    try:
        with open(os.path.join(found, _META)) as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{what} {found}: cannot read meta.json ({err})", "use a checkpoint that finished writing") from None
    if not isinstance(meta, dict):
        raise UserError(f"{what} {found}: meta.json is not a JSON object", "use a checkpoint that finished writing")
    return CheckpointInfo(found, meta)


def _model_config_from_meta(meta: dict, path: str):
    from megatron_midtrain.config.schema import ModelConfig

    saved = meta.get("model_config")
    if not isinstance(saved, dict):
        raise UserError(
            f"checkpoint {path} has no model_config in its meta.json (saved by an older version)",
            "re-save it with the current trainer, e.g. resume it for 0 extra steps",
        )
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in known})


def _target_logprobs(batch, logits):
    """log p(target) at every position of a whole-vocabulary (TP1) logits batch, float32."""
    from megatron_midtrain.losses.vocab_parallel import vocab_parallel_logprobs

    return vocab_parallel_logprobs(logits, batch["targets"], None).float()


@dataclass
class _Window:
    seq: int  # index of the sequence in the request
    start: int
    end: int
    first_scored: int


class CheckpointLogprobs:
    """A frozen GPTModel (TP1/PP1, eval mode, no gradients) rebuilt from a checkpoint."""

    def __init__(self, checkpoint_path: str, dtype=None, stride: int | None = None,
                 max_batch_tokens: int = DEFAULT_BATCH_TOKENS):
        """``dtype``: parameter dtype (default float32; the tools want exact log-probs)."""
        import torch

        from megatron_midtrain.config.schema import ParallelConfig
        from megatron_midtrain.model.builder import build_transformer_config, have_transformer_engine
        from megatron_midtrain.model.loading import load_frozen_stage
        from megatron_midtrain.training import checkpoint as ckpt

        dtype = dtype or torch.float32
        self.path = ckpt.resolve_checkpoint_dir(os.fspath(checkpoint_path), what="checkpoint")
        self.meta = ckpt.read_meta(self.path)
        self.model_config = _model_config_from_meta(self.meta, self.path)
        self.tokenizer_id: str | None = self.meta.get("tokenizer")
        self.tokenizer_path: str | None = self.meta.get("tokenizer_path")
        self.step = self.meta.get("step")
        self.window = int(self.model_config.max_position_embeddings)
        self.stride = int(stride) if stride else max(1, self.window // 2)
        if not 1 <= self.stride <= self.window - 1:
            raise UserError(f"stride {self.stride} must be between 1 and the window - 1 ({self.window - 1})",
                            "pass a smaller stride")
        self.max_batch_tokens = max(int(max_batch_tokens), self.window)
        ensure_single_process_parallel_state()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        config = build_transformer_config(self.model_config, ParallelConfig(), dtype)
        seq_length = int(self.meta.get("seq_length") or self.window)
        self.model, _ = load_frozen_stage(self.path, self.model_config, config, seq_length, have_transformer_engine())
        self._tokenizer = None

    def __repr__(self) -> str:
        return f"CheckpointLogprobs({self.path!r}, step={self.step}, window={self.window}, stride={self.stride})"

    # -------------------------------------------------------------- tokenizer
    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (loaded on first use from ``tokenizer_path``, fingerprint checked)."""
        if self._tokenizer is None:
            from megatron_midtrain.data.tokenizer import load_tokenizer, tokenizer_fingerprint

            if not self.tokenizer_path:
                raise UserError(f"checkpoint {self.path} does not record its tokenizer_path in meta.json",
                                "re-save it with the current trainer")
            if not os.path.exists(self.tokenizer_path):
                raise UserError(f"checkpoint {self.path} names tokenizer {self.tokenizer_path}, which does not exist",
                                "restore that file (or rebuild the demo assets with the same MIDTRAIN_CACHE)")
            tok = load_tokenizer(self.tokenizer_path)
            found = tokenizer_fingerprint(tok)
            if self.tokenizer_id and found != self.tokenizer_id:
                raise UserError(
                    f"tokenizer {self.tokenizer_path} has fingerprint {found}, but checkpoint {self.path} "
                    f"was trained with {self.tokenizer_id}",
                    "restore the tokenizer the checkpoint was trained with",
                )
            self._tokenizer = tok
        return self._tokenizer

    def check_token_ids(self, ids: Sequence[int], what: str = "input") -> None:
        if len(ids) and (min(ids) < 0 or max(ids) >= self.model_config.vocab_size):
            raise UserError(
                f"{what} has token id {max(ids) if max(ids) >= self.model_config.vocab_size else min(ids)} outside "
                f"the vocabulary of checkpoint {self.path} ({self.model_config.vocab_size})",
                "tokenize the input with the checkpoint's tokenizer",
            )

    # -------------------------------------------------------------- scoring
    def token_logprobs_batch(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """:meth:`token_logprobs` for many sequences at once (windows batched together)."""
        import torch

        with torch.no_grad():
            return self._token_logprobs_batch(sequences)

    def _token_logprobs_batch(self, sequences):
        import torch

        from megatron_midtrain.training.forward import forward_only, next_token_batch

        seqs = [list(map(int, s)) for s in sequences]
        for s in seqs:
            self.check_token_ids(s)
        results = [[0.0] * max(len(s) - 1, 0) for s in seqs]
        windows = [
            _Window(i, a, b, f) for i, s in enumerate(seqs) for (a, b, f) in plan_windows(len(s), self.window, self.stride)
        ]
        windows.sort(key=lambda w: (w.end - w.start, w.seq, w.start), reverse=True)
        pos = 0
        while pos < len(windows):
            # Windows are sorted longest first: a batch is padded to its first window's length, and
            # closes at the token budget or before a window less than half as long (little padding).
            longest = windows[pos].end - windows[pos].start
            count = 1
            while (pos + count < len(windows) and (count + 1) * longest <= self.max_batch_tokens
                   and 2 * (windows[pos + count].end - windows[pos + count].start) > longest):
                count += 1
            batch = windows[pos:pos + count]
            pos += count
            tokens = torch.zeros(len(batch), longest, dtype=torch.long)
            for row, w in enumerate(batch):
                tokens[row, : w.end - w.start] = torch.tensor(seqs[w.seq][w.start:w.end])
            # Target of position p is token p + 1 (the last position has no target in the window).
            [logp] = forward_only(self.model, [next_token_batch(tokens)], 1, _target_logprobs, seq_length=longest,
                                  micro_batch_size=len(batch), device=self.device)
            logp = logp.cpu()
            for row, w in enumerate(batch):
                # token t (absolute) is scored from window position t - start - 1
                lo, hi = w.first_scored - w.start - 1, w.end - w.start - 1
                results[w.seq][w.first_scored - 1: w.end - 1] = logp[row, lo:hi].tolist()
        return results

    def token_logprobs(self, token_ids: Sequence[int]) -> list[float]:
        """``log p(x_t | x_<t)`` for ``t = 1 .. n-1`` (``n - 1`` values; see the module doc on windows)."""
        return self.token_logprobs_batch([token_ids])[0]

    def text_logprobs(self, text: str, append_eod: bool = False) -> tuple[list[int], list[float]]:
        """Tokenize ``text`` with the checkpoint's tokenizer and score it: ``(ids, logprobs)``."""
        ids = list(self.tokenizer.tokenize(text))
        if append_eod:
            ids.append(self.tokenizer.eod)
        return ids, self.token_logprobs(ids)


def load_checkpoint_logprobs(checkpoint_path: str, **kwargs) -> CheckpointLogprobs:
    """Load a checkpoint (iter dir, checkpoints/ root or run dir) for single-process per-token log-probs."""
    return CheckpointLogprobs(checkpoint_path, **kwargs)


def check_same_tokenizer(models: Iterable, roles: Sequence[str] | None = None) -> None:
    """Refuse checkpoints trained with different tokenizers (fingerprints in meta.json).

    ``models``: :class:`CheckpointLogprobs` or :class:`CheckpointInfo` objects (``.path``, ``.tokenizer_id``).
    """
    models = list(models)
    roles = list(roles) if roles else [f"checkpoint {i + 1}" for i in range(len(models))]
    first, first_role = models[0], roles[0]
    for model, role in zip(models[1:], roles[1:]):
        if first.tokenizer_id is None or model.tokenizer_id is None:
            raise UserError(
                f"cannot compare tokenizers: {first_role} {first.path} has {first.tokenizer_id} and "
                f"{role} {model.path} has {model.tokenizer_id} in meta.json",
                "use checkpoints saved by the current trainer",
            )
        if model.tokenizer_id != first.tokenizer_id:
            raise UserError(
                f"{first_role} {first.path} uses tokenizer {first.tokenizer_id} but {role} {model.path} uses "
                f"{model.tokenizer_id}",
                "score with two checkpoints trained with the same tokenizer",
            )
