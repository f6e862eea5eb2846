#!/usr/bin/env python
"""MiniPLM difference sampling: keep the documents a teacher finds easier than a small reference.

For each document d of the indexed dataset ``--input PREFIX`` (``PREFIX.bin/.idx``; with our
tokenizer pipeline a document is one sequence ``[tokens..., EOD]``, but multi-sequence
documents are handled: their sequences are concatenated):

    s(d) = mean over t = 1 .. n-1 of [ log p_teacher(x_t | x_<t) − log p_smallref(x_t | x_<t) ]

i.e. over every token after the first (the EOD included). Documents longer than a model's
context are scored in overlapping windows (see megatron_midtrain/eval/checkpoint_logprobs.py). A
document with a single token has no score and ranks last.

Selection: ``n_keep = floor(keep * n_docs + 0.5)`` (round half up), the ``n_keep`` documents
with the highest score are kept; equal scores are broken by document index (lower first).
The kept documents are written in their original order, sequence structure and dtype to a new
indexed dataset ``OUT.bin/.idx`` (temporary files renamed into place at the end), with

* ``OUT.scores.jsonl``: one line per input document ``{"doc", "tokens", "score", "kept"}``;
* ``OUT.selection.json``: summary (counts, the threshold = score of the last kept document,
  checkpoints, timing).

Example::

    python tools/select_miniplm.py --teacher runs/big --small-ref runs/small \\
        --input data/web --output-prefix data/web_miniplm --keep 0.8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_midtrain.errors import UserError, exit_on_user_error  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, metavar="CKPT", help="teacher checkpoint: run dir, checkpoints/ or iter dir")
    p.add_argument("--small-ref", required=True, metavar="CKPT", help="small reference checkpoint (same tokenizer)")
    p.add_argument("--input", required=True, metavar="PREFIX", help="indexed dataset PREFIX(.bin/.idx)")
    p.add_argument("--output-prefix", required=True, metavar="OUT", help="writes OUT.bin/.idx, OUT.scores.jsonl, OUT.selection.json")
    p.add_argument("--keep", type=float, default=0.8, help="fraction of documents to keep (default: 0.8)")
    p.add_argument("--docs-per-chunk", type=int, default=256, help="documents scored per progress step (default: 256)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward pass (default: 8192)")
    p.add_argument("--stride", type=int, default=None,
                   help="window stride for documents longer than the context (default: half the context)")
    p.add_argument("--log-interval-s", type=float, default=2.0, help="seconds between progress lines (default: 2)")
    return p.parse_args(argv)


def num_to_keep(keep: float, n_docs: int) -> int:
    """``floor(keep * n_docs + 0.5)``: round half up (not Python's round-half-to-even)."""
    return min(n_docs, max(0, math.floor(keep * n_docs + 0.5)))


def select_top(scores: list[float | None], n_keep: int) -> list[int]:
    """Indices of the ``n_keep`` best scores (None ranks last; ties: lower index first), sorted."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i] is None, -(scores[i] or 0.0), i))
    return sorted(order[:n_keep])


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _doc_tokens(dataset, doc_index, d: int):
    import numpy as np

    first, last = int(doc_index[d]), int(doc_index[d + 1])
    if last - first == 1:
        return np.asarray(dataset[first]), [int(dataset.sequence_lengths[first])]
    parts = [np.asarray(dataset[s]) for s in range(first, last)]
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=dataset.index.dtype)), [len(x) for x in parts]


@exit_on_user_error
def main(argv=None) -> dict:
    args = parse_args(argv)
    if not 0.0 < args.keep <= 1.0:
        raise UserError(f"--keep must be in (0, 1], got {args.keep}", "pass the fraction of documents to keep, e.g. 0.8")
    for name in ("docs_per_chunk", "batch_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1", "pass a positive number")

    from megatron_midtrain.data.indexing import validate_indexed_dataset
    from megatron_midtrain.eval.checkpoint_logprobs import check_same_tokenizer, peek_checkpoint

    # Cheap checks first (no torch / megatron import): the dataset pair and both checkpoints' meta.json.
    info = validate_indexed_dataset(args.input)
    check_same_tokenizer([peek_checkpoint(args.teacher, "--teacher"), peek_checkpoint(args.small_ref, "--small-ref")],
                         ["--teacher", "--small-ref"])

    from megatron_midtrain.utils.quiet import silence_known_warnings

    silence_known_warnings()
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from megatron_midtrain.eval.checkpoint_logprobs import load_checkpoint_logprobs

    teacher = load_checkpoint_logprobs(args.teacher, stride=args.stride, max_batch_tokens=args.batch_tokens)
    small = load_checkpoint_logprobs(args.small_ref, stride=args.stride, max_batch_tokens=args.batch_tokens)
    check_same_tokenizer([teacher, small], ["--teacher", "--small-ref"])
    vocab = min(teacher.model_config.vocab_size, small.model_config.vocab_size)
    info = validate_indexed_dataset(args.input, vocab_size=vocab)
    dataset = IndexedDataset(args.input, multimodal=False, mmap=True)
    doc_index = dataset.document_indices
    n_docs = len(doc_index) - 1
    if n_docs < 1:
        raise UserError(f"dataset {args.input} holds no documents", "select from a non-empty dataset")
    n_keep = num_to_keep(args.keep, n_docs)
    if n_keep < 1:
        raise UserError(f"--keep {args.keep} of {n_docs} documents keeps none", "raise --keep")
    print(f"scoring {n_docs} documents ({info['tokens']} tokens) of {args.input} with teacher {teacher.path} and "
          f"small reference {small.path}; keeping {n_keep}", file=sys.stderr, flush=True)

    scores: list[float | None] = []
    lengths: list[int] = []
    t0 = time.perf_counter()
    last_log = t0
    tokens_done = 0
    for chunk_start in range(0, n_docs, args.docs_per_chunk):
        docs = [_doc_tokens(dataset, doc_index, d)[0].tolist()
                for d in range(chunk_start, min(n_docs, chunk_start + args.docs_per_chunk))]
        lp_t = teacher.token_logprobs_batch(docs)
        lp_s = small.token_logprobs_batch(docs)
        for ids, a, b in zip(docs, lp_t, lp_s):
            lengths.append(len(ids))
            tokens_done += len(ids)
            # float64 sum: the score does not depend on float32 accumulation order.
            scores.append(math.fsum(x - y for x, y in zip(a, b)) / len(a) if a else None)
        now = time.perf_counter()
        if now - last_log >= args.log_interval_s or len(scores) == n_docs:
            el = max(now - t0, 1e-9)
            print(f"scored {len(scores)}/{n_docs} docs, {len(scores) / el:.1f} docs/s, {tokens_done / el:.0f} tok/s",
                  file=sys.stderr, flush=True)
            last_log = now
    score_seconds = time.perf_counter() - t0

    kept = select_top(scores, n_keep)
    kept_set = set(kept)
    threshold = min((scores[i] for i in kept if scores[i] is not None), default=None)

    out = os.fspath(args.output_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    bin_path, idx_path = out + ".bin", out + ".idx"
    scores_path, summary_path = out + ".scores.jsonl", out + ".selection.json"
    tag = f".tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp = {p: p + tag for p in (bin_path, idx_path, scores_path, summary_path)}
    summary = {
        "input": os.path.abspath(args.input),
        "output_prefix": os.path.abspath(out),
        "teacher": teacher.path,
        "small_ref": small.path,
        "keep": args.keep,
        "rounding": "n_keep = floor(keep * n_docs + 0.5)",
        "n_docs": n_docs,
        "n_keep": n_keep,
        "kept_tokens": int(sum(lengths[i] for i in kept)),
        "total_tokens": int(sum(lengths)),
        "threshold": threshold,
        "unscored_docs": sum(s is None for s in scores),
        "score_seconds": round(score_seconds, 3),
        "docs_per_s": round(n_docs / max(score_seconds, 1e-9), 2),
    }
    try:
        builder = IndexedDatasetBuilder(tmp[bin_path], dtype=dataset.index.dtype)
        for d in kept:
            tokens, seq_lengths = _doc_tokens(dataset, doc_index, d)
            builder.add_document(np.asarray(tokens), seq_lengths)
        builder.finalize(tmp[idx_path])
        with open(tmp[scores_path], "w") as fh:
            for d, (s, n) in enumerate(zip(scores, lengths)):
                fh.write(json.dumps({"doc": d, "tokens": n, "score": s, "kept": d in kept_set}) + "\n")
        with open(tmp[summary_path], "w") as fh:
            fh.write(json.dumps(summary, indent=2) + "\n")
        # Publish the dataset like tools/preprocess_data.py: old .idx first, so the prefix is
        # never a complete-looking pair of mismatched files; the reports go last.
        _remove_quietly(idx_path)
        os.replace(tmp[bin_path], bin_path)
        os.replace(tmp[idx_path], idx_path)
        os.replace(tmp[scores_path], scores_path)
        os.replace(tmp[summary_path], summary_path)
    finally:
        for path in tmp.values():
            _remove_quietly(path)

    print(f"kept {n_keep}/{n_docs} documents (score >= {threshold}) -> {bin_path}/.idx; "
          f"scored at {summary['docs_per_s']} docs/s", flush=True)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
