"""The offline score store: a reference model's target-token log-probs, one row per training sample.

Layout of a store directory::

    meta.json        what the rows align with (data, seed, seq length, batch, tokenizer, ...)
    logprobs.bin     [num_samples, seq_length] float16|float32, memory-mapped, row i = global sample i
    sample_hash.bin  [num_samples] uint64, a digest of each sample's tokens and labels
    done.bin         [num_samples] uint8, 1 once the sample's row (and digest) are on disk
    data_index_cache/  megatron-core's dataset index, built while scoring (not needed to read)

Row ``i`` belongs to global training sample ``i``, the id that ``StepBatches`` attaches to every
micro-batch as ``sample_ids``; training step ``s`` (1-based) consumes samples ``[(s-1)*G, s*G)``.

Crash safety: a writer stores rows and digests, flushes them (fdatasync), and only then sets the
samples' done bytes. A sample marked done therefore always has its row on disk; anything an
interrupted scoring run left half-written stays "not done" and is recomputed when the scoring
command is run again. Writers use ``pwrite`` on disjoint byte ranges, so several data-parallel
writers can fill one store at the same time.

The digest guards what meta.json cannot: megatron-core's sample order may change when the
number of samples requested crosses an epoch boundary, and data files can be replaced in
place. A row is only handed out when the sample it was computed on hashes the same.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from megatron_midtrain.errors import UserError

META = "meta.json"
LOGPROBS = "logprobs.bin"
HASHES = "sample_hash.bin"
DONE = "done.bin"
FORMAT = 1
DTYPES = ("float16", "float32")
RESCORE = "re-score with tools/score_reference.py using the training config"

#: meta.json keys that must equal the training run's, and how the user names them.
ALIGNMENT_FIELDS = {
    "seed": "run.seed",
    "seq_length": "data.seq_length",
    "data_prefixes": "data.paths",
    "data_weights": "data.weights",
    "data_split": "data.split",
    "reset_attention_mask": "data.reset_attention_mask",
    "global_batch_size": "global batch in sequences (train.global_batch_tokens / data.seq_length)",
    "tokenizer": "tokenizer",
}


def alignment_meta(cfg, tokenizer_id: str, global_batch_size: int, prefixes, weights) -> dict:
    """The meta.json fields that tie a store to a training config (see ALIGNMENT_FIELDS)."""
    return {
        "seed": int(cfg.run.seed),
        "seq_length": int(cfg.data.seq_length),
        "data_prefixes": [os.path.realpath(p) for p in prefixes],
        "data_weights": None if weights is None else [float(w) for w in weights],
        "data_split": str(cfg.data.split),
        "reset_attention_mask": bool(cfg.data.reset_attention_mask),
        "global_batch_size": int(global_batch_size),
        "tokenizer": tokenizer_id,
    }


def check_meta(stored: dict, expected: dict, path: str, fields=None) -> None:
    """Refuse a store whose meta differs from ``expected`` in any of ``fields``, naming the first."""
    for key in fields or expected:
        if key not in expected:
            continue
        have, want = stored.get(key), expected[key]
        same = _same(have, want)
        if not same:
            name = ALIGNMENT_FIELDS.get(key, key)
            raise UserError(
                f"offline score store {path} does not match this run: {name} is {_show(have)} in the store "
                f"vs {_show(want)} here",
                RESCORE + " (into a new reference.scores directory)",
            )


def _same(a, b) -> bool:
    """Equality that tolerates a float's JSON round trip."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
    return a == b


def _show(value) -> str:
    if isinstance(value, list) and len(value) > 3:
        return json.dumps(value[:3])[:-1] + f", ... ({len(value)} entries)]"
    return json.dumps(value)


def sample_digest(tokens, labels) -> int:
    """64-bit digest of one sample's token and label ids (any integer array-likes)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.ascontiguousarray(np.asarray(tokens), dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(np.asarray(labels), dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise UserError(f"{path} is not an offline score store (no {META})", "create it with tools/score_reference.py")
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {meta_path}: {err}", RESCORE) from None
    if meta.get("format") != FORMAT or meta.get("dtype") not in DTYPES:
        raise UserError(f"{meta_path} has an unknown format or dtype", RESCORE + " (into a new directory)")
    return meta


def _write_meta(path: str, meta: dict) -> None:
    tmp = os.path.join(path, META + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(meta, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(path, META))


def _ensure_size(file: str, size: int) -> None:
    """Grow (never shrink) ``file`` to ``size`` bytes; new bytes read as zeros."""
    with open(file, "ab") as fh:
        if fh.seek(0, os.SEEK_END) < size:
            fh.truncate(size)
        fh.flush()
        os.fsync(fh.fileno())


def create_or_open(path: str, meta: dict) -> ScoreStore:
    """Create a store for ``meta`` (or re-open one made with the same meta), grown to
    ``meta["num_samples"]`` rows if it holds fewer. Call on one process only."""
    if meta.get("dtype") not in DTYPES:
        raise UserError(f"score dtype {meta.get('dtype')!r} is not supported", "use --dtype float16 or float32")
    meta = dict(meta, format=FORMAT)
    if os.path.exists(os.path.join(path, META)):
        stored = read_meta(path)
        keys = [k for k in meta if k not in ("num_samples", "format")]
        check_meta(stored, meta, path, keys)
        num_samples = max(int(stored["num_samples"]), int(meta["num_samples"]))
    else:
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f"reference.scores={path} exists and is not a directory", "choose a new directory")
        if os.path.isdir(path) and any(n in os.listdir(path) for n in (LOGPROBS, DONE, HASHES)):
            raise UserError(f"{path} holds score files but no {META}", "delete the directory or choose another one")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the score store {path}: {err.strerror}", "choose a writable reference.scores") from None
        stored, num_samples = None, int(meta["num_samples"])
    row_bytes = int(meta["seq_length"]) * np.dtype(meta["dtype"]).itemsize
    # Files first, meta last: meta's num_samples never exceeds what the files hold.
    _ensure_size(os.path.join(path, LOGPROBS), num_samples * row_bytes)
    _ensure_size(os.path.join(path, HASHES), num_samples * 8)
    _ensure_size(os.path.join(path, DONE), num_samples)
    if stored is None or int(stored["num_samples"]) != num_samples:
        _write_meta(path, dict(meta, num_samples=num_samples))
    return ScoreStore(path)


def open_store(path: str, writable: bool = False) -> ScoreStore:
    return ScoreStore(path, writable)


class ScoreStore:
    """An opened store. Reads go through memory maps; writes through ``pwrite`` + fdatasync."""

    def __init__(self, path: str, writable: bool = False):
        self.path = os.path.abspath(path)
        self.meta = read_meta(self.path)
        self.num_samples = int(self.meta["num_samples"])
        self.seq_length = int(self.meta["seq_length"])
        self.global_batch_size = int(self.meta["global_batch_size"])
        self.dtype = np.dtype(self.meta["dtype"])
        self.row_bytes = self.seq_length * self.dtype.itemsize
        sizes = {LOGPROBS: self.num_samples * self.row_bytes, HASHES: self.num_samples * 8, DONE: self.num_samples}
        for name, size in sizes.items():
            file = os.path.join(self.path, name)
            if not os.path.isfile(file) or os.path.getsize(file) < size:
                raise UserError(f"offline score store {self.path} is damaged ({name} is missing or short)", RESCORE + " into a new directory")
        shape = (self.num_samples, self.seq_length)
        self._logprobs = np.memmap(os.path.join(self.path, LOGPROBS), dtype=self.dtype, mode="r", shape=shape)
        self._hashes = np.memmap(os.path.join(self.path, HASHES), dtype=np.uint64, mode="r", shape=(self.num_samples,))
        self._done = np.memmap(os.path.join(self.path, DONE), dtype=np.uint8, mode="r", shape=(self.num_samples,))
        self._fds = None
        if writable:
            self._fds = {name: os.open(os.path.join(self.path, name), os.O_WRONLY) for name in sizes}

    def close(self) -> None:
        for fd in (self._fds or {}).values():
            os.close(fd)
        self._fds = None

    # ---------------------------------------------------------------- queries
    def step_of(self, sample_id: int) -> int:
        """1-based training step that consumes ``sample_id``."""
        return int(sample_id) // self.global_batch_size + 1

    def done(self, sample_ids) -> np.ndarray:
        """Boolean per sample id: is its row complete? (ids past the store are not done)."""
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        out = np.zeros(ids.shape, dtype=bool)
        inside = (ids >= 0) & (ids < self.num_samples)
        out[inside] = self._done[ids[inside]] == 1
        return out

    def step_done(self, step: int) -> bool:
        """Are all samples of 1-based training ``step`` scored?"""
        G = self.global_batch_size
        return bool(self.done(np.arange((step - 1) * G, step * G)).all())

    def scored_steps(self) -> int:
        """Number of leading training steps whose samples are all scored."""
        G = self.global_batch_size
        steps = self.num_samples // G
        done = np.asarray(self._done[: steps * G]).reshape(steps, G).all(axis=1) if steps else np.zeros(0, bool)
        missing = np.flatnonzero(~done)
        return int(missing[0]) if missing.size else steps

    def require_done(self, sample_ids) -> None:
        """Raise a one-line UserError naming the first sample id (and its step) that has no row."""
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        missing = ids[~self.done(ids)]
        if missing.size:
            first = int(missing.min())
            scored = self.scored_steps()
            raise UserError(
                f"offline score store {self.path} has no scores for sample {first} (training step {self.step_of(first)}); "
                f"it holds steps 1..{scored} completely",
                RESCORE + " and at least this run's train.max_steps (finished steps are skipped)",
            )

    # ---------------------------------------------------------------- rows
    def read_rows(self, sample_ids, tokens=None, labels=None) -> np.ndarray:
        """fp32 ``[len(ids), seq_length]`` rows. With ``tokens``/``labels`` (one row per id), also
        check that each row was scored on exactly these tokens."""
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        self.require_done(ids)
        if tokens is not None:
            tokens, labels = np.asarray(tokens), np.asarray(labels)
            for i, sid in enumerate(ids):
                if int(self._hashes[sid]) != sample_digest(tokens[i], labels[i]):
                    raise UserError(
                        f"offline score store {self.path}: sample {int(sid)} (training step {self.step_of(sid)}) was scored "
                        "on other tokens than this run reads (the data files or the sample order changed)",
                        RESCORE + " into a new directory",
                    )
        return np.asarray(self._logprobs[ids], dtype=np.float32)

    def write_rows(self, sample_ids, rows, digests) -> None:
        """Store fp32 ``rows`` ([n, seq]) and their samples' digests, flush, then mark them done."""
        if self._fds is None:
            raise RuntimeError("store opened read-only")
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        rows = np.asarray(rows, dtype=np.float32).reshape(len(ids), self.seq_length)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise ValueError(f"sample ids outside the store's {self.num_samples} rows")
        data = np.ascontiguousarray(rows.astype(self.dtype))
        for i, sid in enumerate(ids):
            _pwrite_all(self._fds[LOGPROBS], data[i].tobytes(), int(sid) * self.row_bytes)
            _pwrite_all(self._fds[HASHES], np.uint64(digests[i]).tobytes(), int(sid) * 8)
        os.fdatasync(self._fds[LOGPROBS])
        os.fdatasync(self._fds[HASHES])
        for sid in ids:
            _pwrite_all(self._fds[DONE], b"\x01", int(sid))
        os.fdatasync(self._fds[DONE])


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
