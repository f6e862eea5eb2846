"""Per-token entropy index of an indexed dataset under a frozen base model (RMT, SPEC §3).

    python tools/preprocess_entropy.py --checkpoint runs/base --data data/corpus_text_document \\
        --output entropy/corpus [--quantiles 0.33 0.67 | --thresholds 1.0 3.0]

    torchrun --nproc-per-node 8 tools/preprocess_entropy.py --tp 2 --pp 2 ...   # any TP/PP/DP

Writes into ``--output`` (see :mod:`megatron_midtrain.rl.entropy` for the format):

* ``entropy.npy``: float32 memmap, one value per dataset token: the entropy of the base model's
  next-token distribution at that token (full vocabulary, vocab-parallel, no all-gather). The
  context is the token's own sequence (a ``.idx`` sequence = one document), up to ``--window``
  tokens; longer sequences are covered by windows overlapping by ``window - stride`` tokens.
* ``buckets.npy``: uint8 memmap, 0 easy / 1 medium / 2 hard, from fixed thresholds or quantiles;
* ``meta.json``: what it was built from (dataset sizes and .idx digest, checkpoint, tokenizer);
  training refuses a mismatching index (:func:`megatron_midtrain.rl.entropy.check_entropy_alignment`);
* ``report.json`` and ``entropy_hist.png``: bucket proportions, a histogram, tokens/s.

Crash-safe and resumable: the dataset is cut into blocks of whole sequences; a block's done-bit
(``done.npy``) is set only after its entropies are flushed. Re-running the same command skips
done blocks; new files are created under temporary names and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from types import SimpleNamespace

from megatron_midtrain.utils.quiet import silence_known_warnings

silence_known_warnings()

import numpy as np  # noqa: E402

from megatron_midtrain.errors import UserError, exit_on_user_error  # noqa: E402
from megatron_midtrain.rl import entropy as ent  # noqa: E402

DONE_FILE = "done.npy"
REPORT_FILE = "report.json"
HIST_FILE = "entropy_hist.png"
#: meta.json keys that must match for a re-run to resume an existing output directory.
RESUME_KEYS = ("dataset", "checkpoint", "checkpoint_step", "tokenizer", "window", "stride", "block_tokens",
               "vocab_size", "precision")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="frozen base model: run dir, checkpoints/ or iter_NNNNNNN")
    p.add_argument("--data", required=True, metavar="PREFIX", help="indexed dataset prefix (PREFIX.bin/.idx)")
    p.add_argument("--output", required=True, metavar="DIR", help="directory of the entropy index")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--window", type=int, default=0, help="context window (default: the model's max positions)")
    p.add_argument("--stride", type=int, default=0, help="window stride for long sequences (default window/2)")
    p.add_argument("--micro-batch-tokens", type=int, default=8192, help="padded tokens per micro-batch")
    p.add_argument("--block-tokens", type=int, default=1 << 20,
                   help="tokens per resumable block (fixed once the index exists)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--thresholds", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="fixed bucket thresholds in nats: easy < LOW <= medium < HIGH <= hard")
    g.add_argument("--quantiles", type=float, nargs=2, metavar=("Q1", "Q2"), default=(1 / 3, 2 / 3),
                   help="bucket thresholds at these entropy quantiles (default 1/3 2/3)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="model dtype (auto: bf16 on GPU, fp32 on CPU); entropies are always computed in fp32")
    p.add_argument("--max-blocks", type=int, default=0,
                   help="stop after this many blocks per data-parallel rank (0 = all; the rest resumes later)")
    p.add_argument("--log-interval", type=int, default=0, metavar="BLOCKS", help="progress every N blocks")
    return p.parse_args(argv)


# ---------------------------------------------------------------------- planning (pure)
def plan_blocks(lengths: np.ndarray, block_tokens: int) -> np.ndarray:
    """Sequence boundaries ``[s0=0, s1, ..., n_seq]`` of blocks of whole sequences of about ``block_tokens``."""
    n = len(lengths)
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]])
    bid = starts // max(1, int(block_tokens))
    cuts = np.flatnonzero(np.diff(bid)) + 1
    return np.concatenate([[0], cuts, [n]]).astype(np.int64)


def plan_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(start, end, first)`` of a sequence of ``n`` tokens: run tokens ``[start, end)``,
    keep positions ``first .. end-1``; every position ``0 .. n-1`` is kept exactly once."""
    out, start, first = [], 0, 0
    while first < n:
        end = min(start + window, n)
        out.append((start, end, first))
        first = end
        start += stride
    return out


def _bucket_len(n: int, window: int) -> int:
    """Pad lengths to powers of two (>= 16, <= window): few distinct shapes, bounded padding."""
    size = 16
    while size < n:
        size *= 2
    return min(size, window)


# ---------------------------------------------------------------------- files
def _create_npy(path: str, dtype, n: int) -> None:
    if os.path.exists(path):
        return
    tmp = path + ".tmp"
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n,))
    arr.flush()
    del arr
    os.replace(tmp, path)


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _prepare_output(out: str, meta: dict, num_blocks: int) -> list[int]:
    """Create (or re-open a matching) index directory; return the blocks still to do. Rank 0 only."""
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, ent.META_FILE)
    if os.path.exists(meta_path):
        stored = ent.read_entropy_meta(out)
        for key in RESUME_KEYS:
            if stored.get(key) != meta.get(key):
                raise UserError(f"{out} holds an entropy index built with a different {key} "
                                f"({stored.get(key)!r}, this run: {meta.get(key)!r})",
                                "use another --output directory, or delete this one")
    else:
        _write_json(meta_path, dict(meta, complete=False))
    _create_npy(os.path.join(out, ent.ENTROPY_FILE), np.float32, meta["dataset"]["tokens"])
    _create_npy(os.path.join(out, DONE_FILE), np.uint8, num_blocks)
    done = np.load(os.path.join(out, DONE_FILE), mmap_mode="r")
    return [int(b) for b in np.flatnonzero(done == 0)]


def _finish(out: str, meta: dict, args, seconds: float, tokens_done: int) -> dict:
    """Buckets, report and histogram once every block is done. Rank 0 only."""
    entropy = np.load(os.path.join(out, ent.ENTROPY_FILE), mmap_mode="r")
    if args.thresholds:
        thresholds, how = tuple(map(float, args.thresholds)), "thresholds"
    else:
        thresholds, how = ent.quantile_thresholds(entropy, args.quantiles), f"quantiles {list(args.quantiles)}"
    n = len(entropy)
    counts = np.zeros(3, dtype=np.int64)
    tmp = os.path.join(out, ent.BUCKETS_FILE + ".tmp")
    buckets = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n,))
    chunk = 1 << 24
    hist_range = (0.0, max(1e-6, float(np.log(meta["vocab_size"]))))
    hist = np.zeros(100, dtype=np.int64)
    total, total_sq = 0.0, 0.0
    for s in range(0, n, chunk):
        part = np.asarray(entropy[s:s + chunk])
        b = ent.bucketize(part, thresholds)
        buckets[s:s + chunk] = b
        counts += np.bincount(b, minlength=3)[:3]
        hist += np.histogram(np.clip(part, *hist_range), bins=100, range=hist_range)[0]
        total += float(part.sum(dtype=np.float64))
        total_sq += float(np.square(part, dtype=np.float64).sum())
    buckets.flush()
    del buckets
    os.replace(tmp, os.path.join(out, ent.BUCKETS_FILE))
    mean = total / n if n else 0.0
    report = {
        "tokens": n,
        "bucket_rule": how,
        "thresholds": list(thresholds),
        "bucket_counts": dict(zip(ent.BUCKET_NAMES, map(int, counts))),
        "bucket_proportions": dict(zip(ent.BUCKET_NAMES, [float(c / n) if n else 0.0 for c in counts])),
        "entropy_mean": mean,
        "entropy_std": float(np.sqrt(max(0.0, total_sq / n - mean * mean))) if n else 0.0,
        "histogram": {"range": list(hist_range), "counts": hist.tolist()},
        "tokens_this_run": tokens_done,
        "seconds_this_run": seconds,
        "tokens_per_s": tokens_done / seconds if seconds > 0 else 0.0,
    }
    _plot(os.path.join(out, HIST_FILE), hist, hist_range, thresholds, report)
    _write_json(os.path.join(out, REPORT_FILE), report)
    _write_json(os.path.join(out, ent.META_FILE), dict(meta, complete=True, thresholds=list(thresholds),
                                                         bucket_rule=how))
    return report


def _plot(path: str, hist, hist_range, thresholds, report) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(hist_range[0], hist_range[1], len(hist) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(edges[:-1], hist, width=np.diff(edges), align="edge", color="#4c72b0")
    for t, name in zip(thresholds, ("easy|medium", "medium|hard")):
        ax.axvline(t, color="#c44e52", linestyle="--", label=f"{name} = {t:.3f}")
    props = report["bucket_proportions"]
    ax.set_title("next-token entropy: " + ", ".join(f"{k} {v:.1%}" for k, v in props.items()))
    ax.set_xlabel("entropy (nats)")
    ax.set_ylabel("tokens")
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- the run
def run(args) -> dict:
    """Collective (every rank). Returns rank 0's summary (others: a partial one)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_midtrain.config.schema import ParallelConfig
    from megatron_midtrain.eval.checkpoint_logprobs import _model_config_from_meta
    from megatron_midtrain.model.builder import build_gpt_stage, build_transformer_config, have_transformer_engine
    from megatron_midtrain.reference.offline import _duration, _on_rank0, _rank0
    from megatron_midtrain.training import checkpoint as ckpt
    from megatron_midtrain.training.distributed import broadcast_object, init_distributed, shutdown

    ckpt_dir = ckpt.resolve_checkpoint_dir(args.checkpoint, what="--checkpoint")
    ckpt_meta = ckpt.read_meta(ckpt_dir)
    model_cfg = _model_config_from_meta(ckpt_meta, ckpt_dir)
    window = int(args.window or model_cfg.max_position_embeddings)
    if not 2 <= window <= model_cfg.max_position_embeddings:
        raise UserError(f"--window {window} must be in [2, {model_cfg.max_position_embeddings}] (the model's positions)",
                        "pass a smaller --window")
    stride = int(args.stride or max(1, window // 2))
    if not 1 <= stride <= window - 1:
        raise UserError(f"--stride {stride} must be in [1, window - 1 = {window - 1}]", "pass a smaller --stride")
    if args.block_tokens < 1 or args.micro_batch_tokens < 1:
        raise UserError("--block-tokens and --micro-batch-tokens must be >= 1", "pass positive values")
    parallel = ParallelConfig(tp=args.tp, pp=args.pp)
    layout = init_distributed(SimpleNamespace(parallel=parallel, model=model_cfg, reference=SimpleNamespace(fp8=False)))
    try:
        precision = args.precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() else "fp32"
        if precision == "bf16" and not torch.cuda.is_available():
            raise UserError("--precision bf16 needs a GPU", "use --precision fp32 on the CPU")
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32

        def describe():
            from megatron_midtrain.data.indexing import validate_indexed_dataset

            validate_indexed_dataset(args.data, vocab_size=model_cfg.vocab_size)  # token ids fit the model
            return ent.dataset_alignment(args.data)

        dataset = _on_rank0(describe)
        meta = {
            "format": ent.FORMAT,
            "dataset": dataset,
            "checkpoint": os.path.realpath(ckpt_dir),
            "checkpoint_step": ckpt_meta.get("step"),
            "tokenizer": ckpt_meta.get("tokenizer"),
            "tokenizer_path": ckpt_meta.get("tokenizer_path"),
            "vocab_size": int(model_cfg.vocab_size),
            "window": window,
            "stride": stride,
            "block_tokens": int(args.block_tokens),
            "precision": precision,
            "context": "sequence",
        }
        # .idx layout (megatron-core): 34-byte header, then int32 sequence lengths
        lengths = np.fromfile(os.path.abspath(args.data) + ".idx", dtype=np.int32, count=dataset["sequences"],
                              offset=34).astype(np.int64)
        bin_tokens = np.memmap(os.path.abspath(args.data) + ".bin", dtype=np.dtype(dataset["token_dtype"]), mode="r")
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        blocks = plan_blocks(lengths, args.block_tokens)
        num_blocks = len(blocks) - 1
        out = os.path.abspath(args.output)
        todo = _on_rank0(lambda: _prepare_output(out, meta, num_blocks))

        tensor_parallel.model_parallel_cuda_manual_seed(0)
        config = build_transformer_config(model_cfg, parallel, dtype)
        model = build_gpt_stage(model_cfg, config, window, have_transformer_engine())
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            model.cuda(device)
        ckpt.load_model_weights(ckpt_dir, model, model_cfg, what="--checkpoint")
        model.requires_grad_(False)
        model.eval()

        dp_rank = parallel_state.get_data_parallel_rank()
        mine = todo[dp_rank::layout.dp]
        if args.max_blocks > 0:
            mine = mine[:args.max_blocks]
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        writer = last and parallel_state.get_tensor_model_parallel_rank() == 0
        tp_group = parallel_state.get_tensor_model_parallel_group()
        entropy_mm = np.load(os.path.join(out, ent.ENTROPY_FILE), mmap_mode="r+") if writer else None
        done_mm = np.load(os.path.join(out, DONE_FILE), mmap_mode="r+") if writer else None
        if _rank0():
            total = int(lengths.sum())
            print(f"entropy of {total} tokens ({num_blocks} blocks, {num_blocks - len(todo)} already done) under "
                  f"{ckpt_dir}: window {window}, stride {stride}, TP{layout.tp} PP{layout.pp} DP{layout.dp}, "
                  f"{precision} -> {out}", flush=True)

        def loss_func(logits):
            h = ent.vocab_parallel_entropy(logits, tp_group, vocab_size=model_cfg.vocab_size)
            return h.sum() * 0.0, torch.zeros((), dtype=torch.int), {"entropy": h}

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            tokens = batch["tokens"].to(device)
            positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
            return model(tokens, positions, None), loss_func

        forward_backward = get_forward_backward_func()
        interval = args.log_interval or max(1, len(mine) // 20)
        start = time.perf_counter()
        tokens_done = 0
        for n_done, b in enumerate(mine, 1):
            seqs = range(int(blocks[b]), int(blocks[b + 1]))
            windows = [(int(offsets[s]), a, e, f) for s in seqs for (a, e, f) in plan_windows(int(lengths[s]), window, stride)]
            windows.sort(key=lambda w: w[2] - w[1], reverse=True)
            groups: dict[int, list] = {}
            for w in windows:
                groups.setdefault(_bucket_len(w[2] - w[1], window), []).append(w)
            block_entropy = {}
            for L, group in groups.items():
                rows = max(1, args.micro_batch_tokens // L)
                micro = []
                for i in range(0, len(group), rows):
                    part = group[i:i + rows]
                    tokens = torch.zeros(rows, L, dtype=torch.long)
                    for r, (off, a, e, _) in enumerate(part):
                        tokens[r, :e - a] = torch.from_numpy(bin_tokens[off + a:off + e].astype(np.int64))
                    micro.append({"tokens": tokens})
                outs = forward_backward(forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
                                        num_microbatches=len(micro), seq_length=L, micro_batch_size=rows,
                                        decoder_seq_length=L, forward_only=True)
                if writer:
                    for i, o in enumerate(outs):
                        h = o["entropy"].float().cpu().numpy()
                        for r, (off, a, e, f) in enumerate(group[i * rows:(i + 1) * rows]):
                            block_entropy[(off, f)] = h[r, f - a:e - a]
            if writer:
                for (off, f), vals in block_entropy.items():
                    entropy_mm[off + f: off + f + len(vals)] = vals
                entropy_mm.flush()
                done_mm[b] = 1
                done_mm.flush()
            tokens_done += int(lengths[seqs.start:seqs.stop].sum())
            if _rank0() and (n_done % interval == 0 or n_done == len(mine) or n_done == 1):
                elapsed = time.perf_counter() - start
                rate = tokens_done * layout.dp / max(elapsed, 1e-9)
                left = sum(int(lengths[blocks[x]:blocks[x + 1]].sum()) for x in mine[n_done:]) * layout.dp
                print(f"block {b} ({n_done}/{len(mine)} on this rank) | {rate:.0f} tok/s | ETA {_duration(left / rate)}",
                      flush=True)
        elapsed = time.perf_counter() - start
        if dist.is_initialized():
            dist.barrier()
        del entropy_mm, done_mm
        all_tokens = tokens_done * layout.dp  # approximate when DP ranks got unequal blocks

        def finish():
            done = np.load(os.path.join(out, DONE_FILE), mmap_mode="r")
            missing = int((done == 0).sum())
            if missing:
                return {"complete": False, "missing_blocks": missing, "tokens_per_s": all_tokens / max(elapsed, 1e-9)}
            return dict(_finish(out, meta, args, elapsed, all_tokens), complete=True)

        summary = _on_rank0(finish)
        summary = broadcast_object(summary)
        if _rank0():
            if summary["complete"]:
                props = ", ".join(f"{k} {v:.1%}" for k, v in summary["bucket_proportions"].items())
                print(f"done: {summary['tokens']} tokens, {summary['tokens_per_s']:.0f} tok/s this run; thresholds "
                      f"{summary['thresholds'][0]:.4f} / {summary['thresholds'][1]:.4f} ({summary['bucket_rule']}); "
                      f"{props}; report {os.path.join(out, REPORT_FILE)}", flush=True)
            else:
                print(f"stopped with {summary['missing_blocks']} blocks left; re-run the same command to resume",
                      flush=True)
        return summary
    finally:
        if not getattr(args, "keep_distributed", False):  # the demo calls this inside a training job
            shutdown()


@exit_on_user_error
def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
