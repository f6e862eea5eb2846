#!/usr/bin/env python
"""Per-token log-probabilities of token sequences under a checkpoint (CPU or GPU, any TP/PP).

    python tools/logprobs.py --checkpoint CKPT --input tokens.jsonl --output out.jsonl
    torchrun --nproc-per-node 4 tools/logprobs.py --checkpoint CKPT --input tokens.jsonl \\
        --output out.jsonl --tp 2 --pp 2

Input: one JSON object per line, ``{"tokens": [id, ...]}``. Output: one line per input line,
in order, ``{"logprobs": [...]}`` with log p(token_t | tokens_<t) for t = 1 .. n-1 (the first
token has no prefix). With ``--greedy`` each line also gets ``"greedy": [...]`` (is token_t an
argmax). The world size must be a multiple of tp*pp; data-parallel replicas split the lines.
Only rank 0 writes the output (atomically). A debugging tool, and the basis of the parity
tests against Hugging Face transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_midtrain.utils.quiet import silence_known_warnings  # noqa: E402

silence_known_warnings()

from megatron_midtrain.errors import UserError, exit_on_user_error  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="run dir, checkpoints/ or a checkpoint directory")
    p.add_argument("--input", required=True, metavar="JSONL", help='lines of {"tokens": [ids...]}')
    p.add_argument("--output", required=True, metavar="JSONL", help='writes lines of {"logprobs": [...]}')
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward pass (default 8192)")
    p.add_argument("--greedy", action="store_true", help="also write per-token greedy flags")
    return p.parse_args(argv)


def read_token_lines(path: str) -> list[list[int]]:
    if not os.path.isfile(path):
        raise UserError(f"input file {path} does not exist", "check the --input path")
    out = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: invalid JSON ({err.msg})", 'give one {"tokens": [...]} object per line') from None
            tokens = obj.get("tokens") if isinstance(obj, dict) else None
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise UserError(f'{path}:{lineno}: "tokens" must be a list of integer ids', 'give one {"tokens": [...]} object per line')
            out.append(tokens)
    if not out:
        raise UserError(f"input file {path} holds no lines", 'give one {"tokens": [...]} object per line')
    return out


def compute(checkpoint: str, sequences: list[list[int]], dtype=None, batch_tokens: int = 8192) -> list:
    """Score ``sequences`` with the current process groups (collective; every rank passes the
    same list). DP replicas each score every DP-th sequence; rank 0 gets all results, in order,
    other ranks None."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_midtrain.eval.scorer import Scorer, load_stage

    model, model_cfg, _ = load_stage(checkpoint, dtype)
    scorer = Scorer(model, model_cfg.vocab_size, model_cfg.max_position_embeddings, batch_tokens)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = list(range(dp_rank, len(sequences), dp))
    scores = scorer.score([sequences[i] for i in mine])
    local = {i: (s.logp, s.greedy) for i, s in zip(mine, scores)}
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(local, gathered, dst=0)
        if dist.get_rank() != 0:
            return None
        for part in gathered:
            local.update(part)
    return [local[i] for i in range(len(sequences))]


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    sequences = read_token_lines(args.input)
    from megatron_midtrain.convert.api import parse_dtype
    from megatron_midtrain.eval.checkpoint_logprobs import peek_checkpoint

    # Bad paths and token ids fail before any process group exists.
    info = peek_checkpoint(args.checkpoint)
    vocab = (info.meta.get("model_config") or {}).get("vocab_size")
    for lineno, seq in enumerate(sequences, 1):
        if vocab and seq and (min(seq) < 0 or max(seq) >= vocab):
            raise UserError(f"{args.input}: line {lineno} has a token id outside the vocabulary (0..{vocab - 1})",
                            "tokenize with the checkpoint's tokenizer")
    dtype = parse_dtype(args.dtype, "--dtype")
    if args.batch_tokens < 1:
        raise UserError("--batch-tokens must be >= 1", "e.g. --batch-tokens 8192")
    from megatron_midtrain.eval.scorer import init_parallel

    init_parallel(args.tp, args.pp)
    try:
        results = compute(args.checkpoint, sequences, dtype, args.batch_tokens)
        if results is not None:
            write_output(args.output, results, args.greedy)
    finally:
        from megatron_midtrain.training.distributed import shutdown

        shutdown()


def write_output(path: str, results, greedy: bool) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        for logp, flags in results:
            obj = {"logprobs": logp}
            if greedy:
                obj["greedy"] = flags
            fh.write(json.dumps(obj) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
