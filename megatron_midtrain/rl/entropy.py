"""Per-token next-token entropy from a vocab-parallel logits shard, and the entropy index.

Entropy (SPEC §3 RMT, §5)
-------------------------
Each TP rank holds logits ``z`` for a contiguous slice of the vocabulary. With ``m`` the
global max, ``e_v = exp(z_v - m)``, ``Z = Σ_v e_v``::

    H = -Σ_v p_v log p_v = log Z - Σ_v e_v (z_v - m) / Z

so two small all-reduces suffice and the vocabulary is never all-gathered:

  1. all-reduce(MAX) of the per-position shard max                   -> m
  2. all-reduce(SUM) of one packed ``[Σ e_v, Σ e_v (z_v - m)]`` per position

The fp32 temporary is one chunk of positions times the vocab shard. Columns at or past
``vocab_size`` (megatron's vocabulary padding) can be excluded.

Entropy index on disk (written by ``tools/preprocess_entropy.py``)
------------------------------------------------------------------
``<dir>/entropy.npy``  float32 ``[tokens]``: ``entropy[i]`` is the entropy of the base model's
next-token distribution at token ``i`` of the dataset's ``.bin`` (context: the tokens of the
same sequence up to ``i``), aligned 1:1 with the dataset tokens.
``<dir>/buckets.npy``  uint8 ``[tokens]``: 0 easy, 1 medium, 2 hard.
``<dir>/meta.json``     what the index was built from; :func:`check_entropy_alignment` refuses
an index whose dataset differs from the one training uses.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from megatron_midtrain.errors import UserError

#: Positions per fp32 chunk; bounds the temporary to chunk * vocab_shard floats.
DEFAULT_CHUNK = 4096
EASY, MEDIUM, HARD = 0, 1, 2
BUCKET_NAMES = ("easy", "medium", "hard")
ENTROPY_FILE = "entropy.npy"
BUCKETS_FILE = "buckets.npy"
META_FILE = "meta.json"
FORMAT = 1


def _all_reduce(tensor, op, group):
    import torch.distributed as dist

    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def vocab_parallel_entropy(logits, group=None, vocab_size: int | None = None, chunk: int = DEFAULT_CHUNK):
    """Full-vocabulary entropy (nats) of ``softmax(logits)`` from a shard ``logits[..., V/tp]``.

    ``group``: the tensor-parallel group (None = the whole vocabulary is local). ``vocab_size``:
    the real vocabulary; padded columns (global index >= vocab_size) are left out. Returns fp32
    of shape ``logits.shape[:-1]``. Not differentiable (computed under no_grad).
    """
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        flat = logits.reshape(-1, logits.shape[-1])
        n, shard = flat.shape
        rank = dist.get_rank(group) if group is not None and dist.is_initialized() else 0
        lo = rank * shard
        pad = None
        if vocab_size is not None and lo + shard > vocab_size:
            pad = torch.arange(lo, lo + shard, device=flat.device) >= vocab_size  # [shard] bool
            if bool(pad.all()):
                raise ValueError(f"vocab shard [{lo}, {lo + shard}) lies entirely past vocab_size={vocab_size}")
        shard_max = torch.empty(n, dtype=torch.float32, device=flat.device)
        for s in range(0, n, chunk):
            block = flat[s:s + chunk].float()
            if pad is not None:
                block = block.masked_fill(pad, float("-inf"))
            shard_max[s:s + chunk] = block.amax(dim=-1)
        global_max = _all_reduce(shard_max, dist.ReduceOp.MAX, group)
        packed = torch.empty(n, 2, dtype=torch.float32, device=flat.device)
        for s in range(0, n, chunk):
            shifted = flat[s:s + chunk].float() - global_max[s:s + chunk, None]
            if pad is not None:
                shifted = shifted.masked_fill(pad, 0.0)
            e = shifted.exp()
            if pad is not None:
                e = e.masked_fill(pad, 0.0)
            packed[s:s + chunk, 0] = e.sum(dim=-1)
            packed[s:s + chunk, 1] = (e * shifted).sum(dim=-1)
        packed = _all_reduce(packed, dist.ReduceOp.SUM, group)
        ent = packed[:, 0].log() - packed[:, 1] / packed[:, 0]
        return ent.clamp_min(0.0).view(logits.shape[:-1])


# ----------------------------------------------------------------------------------------
# Buckets
# ----------------------------------------------------------------------------------------


def bucketize(entropy, thresholds) -> np.ndarray:
    """uint8 bucket ids: easy (H < t1), medium (t1 <= H < t2), hard (H >= t2)."""
    t1, t2 = map(float, thresholds)
    if not t1 <= t2:
        raise UserError(f"entropy thresholds {t1}, {t2} are not increasing", "give --thresholds LOW HIGH with LOW <= HIGH")
    return np.searchsorted(np.array([t1, t2], dtype=np.float64), np.asarray(entropy, dtype=np.float64),
                           side="right").astype(np.uint8)


def quantile_thresholds(entropy, quantiles=(1 / 3, 2 / 3), exact_limit: int = 1 << 26,
                        chunk: int = 1 << 24, bins: int = 1 << 20) -> tuple[float, float]:
    """Thresholds at ``quantiles`` of ``entropy`` (array or memmap).

    Exact (``np.quantile``) up to ``exact_limit`` values; beyond, streamed through a histogram of
    ``bins`` bins between the min and max (error below one bin width).
    """
    q = [float(x) for x in quantiles]
    if not 0.0 <= q[0] <= q[1] <= 1.0:
        raise UserError(f"entropy quantiles {q} must satisfy 0 <= q1 <= q2 <= 1", "give --quantiles Q1 Q2")
    n = len(entropy)
    if n == 0:
        return 0.0, 0.0
    if n <= exact_limit:
        a = np.asarray(entropy, dtype=np.float64)
        return float(np.quantile(a, q[0])), float(np.quantile(a, q[1]))
    lo, hi = np.inf, -np.inf
    for s in range(0, n, chunk):
        part = np.asarray(entropy[s:s + chunk])
        lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
    counts = np.zeros(bins, dtype=np.int64)
    for s in range(0, n, chunk):
        counts += np.histogram(np.asarray(entropy[s:s + chunk]), bins=bins, range=(lo, hi))[0]
    cdf = np.cumsum(counts)
    edges = np.linspace(lo, hi, bins + 1)
    return tuple(float(edges[min(bins, int(np.searchsorted(cdf, x * n, side="left")) + 1)]) for x in q)


# ----------------------------------------------------------------------------------------
# Alignment with the dataset
# ----------------------------------------------------------------------------------------


def file_digest(path: str, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            data = fh.read(block)
            if not data:
                break
            h.update(data)
    return "sha256:" + h.hexdigest()[:32]


def dataset_alignment(dataset_prefix: str) -> dict:
    """The facts an entropy index must share with its dataset (cheap: the .idx is hashed, not the .bin)."""
    from megatron_midtrain.data.indexing import validate_indexed_dataset

    info = validate_indexed_dataset(dataset_prefix)
    prefix = os.path.abspath(os.fspath(dataset_prefix))
    return {
        "dataset_prefix": prefix,
        "sequences": info["sequences"],
        "documents": info["documents"],
        "tokens": info["tokens"],
        "token_dtype": info["dtype"],
        "bin_bytes": os.path.getsize(prefix + ".bin"),
        "idx_digest": file_digest(prefix + ".idx"),
    }


def read_entropy_meta(entropy_dir: str) -> dict:
    path = os.path.join(os.fspath(entropy_dir), META_FILE)
    if not os.path.isfile(path):
        raise UserError(f"entropy index {entropy_dir} has no {META_FILE}",
                        "build it with tools/preprocess_entropy.py --output DIR")
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"entropy index {entropy_dir}: cannot read {META_FILE} ({err})",
                        "re-run tools/preprocess_entropy.py on it (it resumes)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"entropy index {entropy_dir}: {META_FILE} is not a format-{FORMAT} entropy index",
                        "rebuild it with tools/preprocess_entropy.py")
    return meta


def check_entropy_alignment(entropy_dir: str, dataset_prefix: str, tokenizer_id: str | None = None) -> dict:
    """Refuse (UserError, one line) an entropy index that is incomplete or not built from
    ``dataset_prefix``'s exact tokens; return its meta.json otherwise.

    Compared: token/sequence/document counts, the token dtype, the ``.bin`` size, a digest of the
    ``.idx``, and (if given) the tokenizer fingerprint. A dataset moved to another path is accepted
    when all of these agree.
    """
    entropy_dir = os.fspath(entropy_dir)
    meta = read_entropy_meta(entropy_dir)
    rebuild = f"rebuild it: tools/preprocess_entropy.py --data {dataset_prefix} --output {entropy_dir} --checkpoint CKPT"
    if not meta.get("complete"):
        raise UserError(f"entropy index {entropy_dir} is incomplete (preprocessing was interrupted)",
                        "re-run the same tools/preprocess_entropy.py command; it resumes")
    have = dataset_alignment(dataset_prefix)
    built = meta.get("dataset", {})
    for key in ("tokens", "sequences", "documents", "token_dtype", "bin_bytes", "idx_digest"):
        if built.get(key) != have[key]:
            raise UserError(
                f"entropy index {entropy_dir} does not line up with dataset {dataset_prefix}: {key} is "
                f"{built.get(key)} in the index (built from {built.get('dataset_prefix')}) but {have[key]} in the dataset",
                rebuild)
    if tokenizer_id and meta.get("tokenizer") and meta["tokenizer"] != tokenizer_id:
        raise UserError(f"entropy index {entropy_dir} was built with tokenizer {meta['tokenizer']}, "
                        f"training uses {tokenizer_id}", rebuild)
    for name, dtype in ((ENTROPY_FILE, np.float32), (BUCKETS_FILE, np.uint8)):
        path = os.path.join(entropy_dir, name)
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise UserError(f"entropy index {entropy_dir}: cannot read {name} ({err})", rebuild) from None
        if arr.shape != (have["tokens"],) or arr.dtype != dtype:
            raise UserError(f"entropy index {entropy_dir}: {name} holds {arr.shape} {arr.dtype}, "
                            f"the dataset has {have['tokens']} tokens", rebuild)
    return meta


def open_entropy_index(entropy_dir: str, dataset_prefix: str, tokenizer_id: str | None = None):
    """``(entropy, buckets, meta)``: read-only memmaps after :func:`check_entropy_alignment`."""
    meta = check_entropy_alignment(entropy_dir, dataset_prefix, tokenizer_id)
    return (np.load(os.path.join(entropy_dir, ENTROPY_FILE), mmap_mode="r"),
            np.load(os.path.join(entropy_dir, BUCKETS_FILE), mmap_mode="r"), meta)
