"""Forward-only scoring of token sequences with a GPTModel stage under any TP/PP layout.

Every rank of the job calls :meth:`Scorer.score` with the *same* sequences (collective). Each
call runs megatron's pipeline schedule forward-only, one micro-batch per padded batch; the
last pipeline stage turns its vocab-parallel logits shard into, per position ``p``:

* ``logp[p]``   = log p(token[p + 1] | tokens[:p + 1])  (two small TP all-reduces, no gather),
* ``greedy[p]`` = token[p + 1] is an argmax of the distribution,
* ``argmax[p]`` = the smallest argmax token id (for greedy generation),

and broadcasts them to the other stages, so every rank returns the same results. Padding
rows of the vocabulary (``model.make_vocab_size_divisible_by``) are masked out of the
softmax: they are not tokens, and Hugging Face models have no such rows.

Data parallelism is left to the caller (``tools/logprobs.py`` splits its input over DP
ranks; the lm-eval model runs every request on every rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_midtrain.errors import UserError


@dataclass
class Scores:
    logp: list[float]
    greedy: list[bool]
    argmax: list[int]


def _stage_outputs(logits, targets, vocab_size: int, group):
    """[b, s, V/tp] logits shard -> (logp, greedy, argmax) [b, s] each (collective over TP)."""
    from megatron_midtrain.losses.vocab_parallel import vocab_parallel_logprobs

    shard = logits.shape[-1]
    rank = dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0
    lo = rank * shard
    if lo + shard > vocab_size:  # this shard holds padding rows of the vocabulary
        logits = logits.clone()
        logits[..., max(vocab_size - lo, 0):] = float("-inf")
    logp = vocab_parallel_logprobs(logits, targets, group)
    local_max, local_arg = logits.float().max(dim=-1)
    packed = torch.stack([local_max, -(local_arg + lo).float()], dim=-1)  # ties -> smallest id
    if group is not None and dist.get_world_size(group) > 1:
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, packed.contiguous(), group=group)
        packed = _best(gathered)
    global_max, neg_arg = packed[..., 0], packed[..., 1]
    owned = (targets >= lo) & (targets < lo + shard)
    tgt = logits.float().gather(-1, torch.where(owned, targets - lo, 0)[..., None])[..., 0]
    tgt = torch.where(owned, tgt, torch.full_like(tgt, float("-inf")))
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tgt, op=dist.ReduceOp.MAX, group=group)
    greedy = tgt >= global_max
    return logp.float(), greedy, (-neg_arg).long()


def _best(gathered: list[torch.Tensor]) -> torch.Tensor:
    """Per position, the (max logit, -id) pair with the largest logit, smallest id on ties."""
    best = gathered[0]
    for other in gathered[1:]:
        better = (other[..., 0] > best[..., 0]) | ((other[..., 0] == best[..., 0]) & (other[..., 1] > best[..., 1]))
        best = torch.where(better[..., None], other, best)
    return best


class Scorer:
    """Scores sequences with ``model`` (a GPTModel stage, or a DDP wrapper of one)."""

    def __init__(self, model, vocab_size: int, max_length: int, max_batch_tokens: int = 8192, device=None):
        self.model = model
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.max_batch_tokens = max(max_batch_tokens, max_length)
        self.device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))

    # ------------------------------------------------------------------ one padded batch
    def _score(self, batch, logits):
        from megatron.core import parallel_state

        return _stage_outputs(logits, batch["targets"], self.vocab_size, parallel_state.get_tensor_model_parallel_group())

    def _run(self, tokens: torch.Tensor):
        """[b, s] int64 (identical on every rank) -> (logp, greedy, argmax) on every rank."""
        from megatron_midtrain.training.forward import forward_only, next_token_batch

        b, s = tokens.shape
        [(logp, greedy, argmax)] = forward_only(self.model, [next_token_batch(tokens)], 1, self._score, seq_length=s, micro_batch_size=b,
                                                device=self.device, broadcast=True)
        return logp.float().cpu(), greedy.bool().cpu(), argmax.long().cpu()

    # ------------------------------------------------------------------ many sequences
    def score(self, sequences: list[list[int]]) -> list[Scores]:
        """For each sequence of n tokens: n - 1 log-probs (of tokens 1..n-1), greedy flags,
        and n argmax ids (the prediction after each token). Collective."""
        for i, seq in enumerate(sequences):
            if len(seq) > self.max_length:
                raise UserError(f"sequence {i} has {len(seq)} tokens, more than the model context ({self.max_length})",
                                "shorten the input or raise the model's max_position_embeddings")
            if seq and (min(seq) < 0 or max(seq) >= self.vocab_size):
                raise UserError(f"sequence {i} has a token id outside the vocabulary (0..{self.vocab_size - 1})",
                                "tokenize with the model's tokenizer")
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        results: list[Scores | None] = [None] * len(sequences)
        pos = 0
        was_training = self.model.training
        self.model.eval()
        try:
            while pos < len(order):
                longest = max(len(sequences[order[pos]]), 1)
                count = max(1, min(len(order) - pos, self.max_batch_tokens // longest))
                rows = order[pos:pos + count]
                pos += count
                tokens = torch.zeros(len(rows), longest, dtype=torch.long)
                for r, i in enumerate(rows):
                    tokens[r, : len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
                logp, greedy, argmax = self._run(tokens)
                for r, i in enumerate(rows):
                    n = len(sequences[i])
                    results[i] = Scores(logp[r, : max(n - 1, 0)].tolist(), greedy[r, : max(n - 1, 0)].tolist(),
                                        argmax[r, :n].tolist())
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]


def init_parallel(tp: int, pp: int) -> None:
    """torch.distributed (torchrun env, or one local process) and megatron's TP/PP groups."""
    import os

    from megatron_midtrain.training.distributed import init_process_groups, model_parallel_layout

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise UserError(f"--tp {tp} x --pp {pp} does not divide the world size {world}",
                        f"launch a multiple of {tp * pp} processes (torchrun --nproc-per-node) or change --tp/--pp")
    have = model_parallel_layout()
    if have is not None and have[:2] != (tp, pp):
        raise UserError("this process already has another TP/PP layout", "run the tool in its own process")
    init_process_groups(tp, pp)


def load_stage(checkpoint: str, dtype: torch.dtype | None = None, seed: int = 1234):
    """Build this rank's GPTModel stage (current TP/PP groups) from a checkpoint and load it.

    Returns ``(model, model_config, meta)``. Collective; megatron's parallel state must be set up.
    """
    from megatron.core import parallel_state, tensor_parallel

    from megatron_midtrain.config.schema import ParallelConfig
    from megatron_midtrain.eval.checkpoint_logprobs import _model_config_from_meta
    from megatron_midtrain.model.builder import build_transformer_config, have_transformer_engine
    from megatron_midtrain.model.loading import load_frozen_stage
    from megatron_midtrain.training import checkpoint as ckpt

    path = ckpt.resolve_checkpoint_dir(checkpoint)
    meta = ckpt.read_meta(path)
    model_cfg = _model_config_from_meta(meta, path)
    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    parallel = ParallelConfig(tp=parallel_state.get_tensor_model_parallel_world_size(),
                              pp=parallel_state.get_pipeline_model_parallel_world_size())
    tracker = tensor_parallel.get_cuda_rng_tracker()
    if not tracker.get_states():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    config = build_transformer_config(model_cfg, parallel, dtype)
    model, _ = load_frozen_stage(path, model_cfg, config, model_cfg.max_position_embeddings, have_transformer_engine())
    return model, model_cfg, dict(meta, path=path)
