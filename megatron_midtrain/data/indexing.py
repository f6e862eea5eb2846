"""Tokenize documents into a megatron-core indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``).

Input formats (chosen per file by extension):

* ``*.jsonl`` / ``*.json`` (uncompressed): one JSON object per line; the document
  text is ``obj[json_key]`` (default ``"text"``). Blank lines are skipped.
* anything else: plain text, ONE DOCUMENT PER LINE (the trailing newline is dropped;
  blank lines are skipped). Use jsonl for documents that contain newlines.

Each document becomes one sequence (``[token ids..., EOD]`` with ``append_eod``) in input
order, whatever the number of workers, so 1 and N workers give byte-identical output.
Output goes to temporary files renamed into place only when complete: an interrupted run
never leaves a complete-looking ``.bin``/``.idx`` pair.

:func:`validate_indexed_dataset` checks a prefix cheaply before training uses it.
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import struct
import sys
import time
from typing import Iterable, Iterator, Sequence

import numpy as np

from megatron_midtrain.errors import UserError

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
# megatron-core DType codes -> numpy dtypes (megatron.core.datasets.indexed_dataset.DType)
_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                6: np.float64, 7: np.float32, 8: np.uint16}

JSON_EXTENSIONS = (".jsonl", ".json")

# ----------------------------------------------------------------------------------------
# Input discovery and reading
# ----------------------------------------------------------------------------------------


def expand_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand paths/globs in order (each glob sorted); missing files are a UserError."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[str] = []
    for item in inputs:
        item = os.fspath(item)
        if any(ch in item for ch in "*?["):
            matches = sorted(m for m in glob.glob(item) if os.path.isfile(m))
            if not matches:
                raise UserError(f"input glob {item!r} matches no files", "check the --input pattern")
            files.extend(matches)
        elif os.path.isdir(item):
            raise UserError(f"input {item} is a directory", "pass files or a glob such as DIR/*.jsonl")
        elif not os.path.isfile(item):
            raise UserError(f"input file {item} does not exist", "check the --input path")
        else:
            files.append(item)
    if not files:
        raise UserError("no input files given", "pass --input PATH (jsonl or txt)")
    for f in files:
        if not os.access(f, os.R_OK):
            raise UserError(f"input file {f} is not readable", "fix its permissions")
    return files


def _file_chunks(files: list[str], json_key: str, chunk_docs: int) -> Iterator[tuple]:
    """Yield work items ``(mode, json_key, source, first_line_no, lines)`` in input order."""
    for path in files:
        mode = "json" if path.lower().endswith(JSON_EXTENSIONS) else "text"
        with open(path, "rb") as f:  # bytes: workers decode, so UTF-8 errors get exact line numbers
            lines: list[bytes] = []
            first = 1
            for lineno, line in enumerate(f, 1):
                if not lines:
                    first = lineno
                lines.append(line)
                if len(lines) >= chunk_docs:
                    yield (mode, json_key, path, first, lines)
                    lines = []
            if lines:
                yield (mode, json_key, path, first, lines)


def _text_chunks(texts: Iterable[str], chunk_docs: int) -> Iterator[tuple]:
    lines: list[str] = []
    for text in texts:
        lines.append(text)
        if len(lines) >= chunk_docs:
            yield ("raw", None, "<texts>", 0, lines)
            lines = []
    if lines:
        yield ("raw", None, "<texts>", 0, lines)


# ----------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------

_WORKER_TOKENIZER = None
_WORKER_APPEND_EOD = True


def _init_worker(tokenizer_path: str, append_eod: bool) -> None:
    global _WORKER_TOKENIZER, _WORKER_APPEND_EOD
    from megatron_midtrain.data.tokenizer import load_tokenizer

    _WORKER_TOKENIZER = load_tokenizer(tokenizer_path)
    _WORKER_APPEND_EOD = append_eod


def _encode_chunk(item: tuple) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Tokenize one chunk -> (flat int64 token ids, per-doc lengths, input bytes, skipped docs)."""
    mode, json_key, source, first, lines = item
    tok = _WORKER_TOKENIZER
    eod = tok.eod
    flat: list[int] = []
    lengths: list[int] = []
    nbytes = 0
    skipped = 0
    for offset, line in enumerate(lines):
        if isinstance(line, bytes):
            nbytes += len(line)
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{source}:{first + offset}: not valid UTF-8 ({err.reason})",
                                "convert the file to UTF-8") from None
        else:
            nbytes += len(line.encode("utf-8"))
        if mode == "json":
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{source}:{first + offset}: invalid JSON ({err.msg})",
                                "fix the line, or pass a .txt file for plain text") from None
            if not isinstance(obj, dict) or json_key not in obj:
                raise UserError(f"{source}:{first + offset}: no key {json_key!r} in the JSON object",
                                "pass --json-key with the field holding the text")
            text = obj[json_key]
            if not isinstance(text, str):
                raise UserError(f"{source}:{first + offset}: {json_key!r} is not a string",
                                "pass --json-key with the field holding the text")
        elif mode == "text":
            text = line[:-1] if line.endswith("\n") else line
            if text.endswith("\r"):
                text = text[:-1]
        else:
            text = line
        if not text.strip():
            skipped += 1
            continue
        ids = tok.tokenize(text)
        if _WORKER_APPEND_EOD:
            ids = list(ids) + [eod]
        if not ids:
            skipped += 1
            continue
        flat.extend(ids)
        lengths.append(len(ids))
    return np.asarray(flat, dtype=np.int64), np.asarray(lengths, dtype=np.int64), nbytes, skipped


# ----------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------


def _fmt_progress(docs: int, nbytes: int, elapsed: float) -> str:
    el = max(elapsed, 1e-9)
    return (f"indexing: {docs} docs, {nbytes / 1e6:.1f} MB, {docs / el:.0f} docs/s, "
            f"{nbytes / 1e6 / el:.2f} MB/s")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _build(
    chunks: Iterator[tuple],
    output_prefix: str,
    tokenizer_path: str,
    workers: int,
    append_eod: bool,
    log_interval_s: float,
    log,
) -> dict:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_midtrain.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)  # fail early, in this process, on a bad path
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    output_prefix = os.fspath(output_prefix)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    bin_path, idx_path = output_prefix + ".bin", output_prefix + ".idx"
    tag = f".tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp_bin, tmp_idx = bin_path + tag, idx_path + tag

    t0 = time.perf_counter()
    last_log = t0
    docs = tokens = nbytes = skipped = 0
    pool = None
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        if workers <= 1:
            _init_worker(tokenizer_path, append_eod)
            results = map(_encode_chunk, chunks)
        else:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path, append_eod))
            results = pool.imap(_encode_chunk, chunks)  # imap keeps input order
        for flat, lengths, chunk_bytes, chunk_skipped in results:
            start = 0
            for n in lengths.tolist():
                builder.add_document(flat[start:start + n], [n])
                start += n
            docs += len(lengths)
            tokens += int(flat.size)
            nbytes += chunk_bytes
            skipped += chunk_skipped
            now = time.perf_counter()
            if log is not None and now - last_log >= log_interval_s:
                print(_fmt_progress(docs, nbytes, now - t0), file=log, flush=True)
                last_log = now
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        builder.finalize(tmp_idx)
        # Publish: drop any old .idx first, then .bin, then .idx. At every instant the prefix is
        # either missing its .idx (incomplete) or a complete new pair.
        _remove_quietly(idx_path)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        _remove_quietly(tmp_bin)
        _remove_quietly(tmp_idx)

    seconds = time.perf_counter() - t0
    summary = {
        "output_prefix": output_prefix,
        "docs": docs,
        "skipped_docs": skipped,
        "tokens": tokens,
        "bytes": nbytes,
        "seconds": round(seconds, 3),
        "docs_per_s": round(docs / max(seconds, 1e-9), 1),
        "mb_per_s": round(nbytes / 1e6 / max(seconds, 1e-9), 3),
        "workers": max(1, workers),
        "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size,
    }
    if log is not None:
        print(_fmt_progress(docs, nbytes, seconds) + f", {tokens} tokens, done in {seconds:.2f}s",
              file=log, flush=True)
    return summary


def build_indexed_dataset(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    json_key: str = "text",
    workers: int = 2,
    append_eod: bool = True,
    log_interval_s: float = 2.0,
    chunk_docs: int = 256,
    log=sys.stderr,
) -> dict:
    """Tokenize ``inputs`` (jsonl or one-doc-per-line text files, paths or globs) into
    ``output_prefix.bin/.idx``. Returns the summary dict (docs, tokens, bytes, seconds,
    docs_per_s, mb_per_s, ...). Progress lines go to ``log`` (None = silent)."""
    files = expand_inputs(inputs)  # before anything is created, so bad input leaves no output
    return _build(_file_chunks(files, json_key, chunk_docs), os.fspath(output_prefix),
                  os.fspath(tokenizer_path), workers, append_eod, log_interval_s, log)


def index_texts(
    texts: Iterable[str],
    output_prefix: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    workers: int = 1,
    append_eod: bool = True,
    log_interval_s: float = 2.0,
    chunk_docs: int = 256,
    log=sys.stderr,
) -> dict:
    """Like :func:`build_indexed_dataset`, for an in-memory iterable of document strings."""
    return _build(_text_chunks(texts, chunk_docs), os.fspath(output_prefix),
                  os.fspath(tokenizer_path), workers, append_eod, log_interval_s, log)


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------


def validate_indexed_dataset(
    prefix: str | os.PathLike, vocab_size: int | None = None, chunk_tokens: int = 1 << 24
) -> dict:
    """Check that ``prefix.bin/.idx`` exist, agree with each other, and (if ``vocab_size`` is
    given) hold no token id >= ``vocab_size``. Raises UserError (one line) otherwise.

    Returns ``{"prefix", "sequences", "documents", "tokens", "dtype", "max_token_id"}``
    (``max_token_id`` is None when ``vocab_size`` is None: the scan is skipped).
    """
    prefix = os.fspath(prefix)
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    rebuild = f"re-create it with tools/preprocess_data.py --output-prefix {prefix}"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise UserError(f"dataset {prefix}: missing {path}", rebuild)

    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[:9] != _INDEX_HEADER:
        raise UserError(f"dataset {prefix}: {idx_path} is truncated or not a megatron index file", rebuild)
    version = struct.unpack("<Q", head[9:17])[0]
    code = head[17]
    seq_count, doc_count = struct.unpack("<QQ", head[18:34])
    if version != 1 or code not in _DTYPE_CODES:
        raise UserError(f"dataset {prefix}: {idx_path} has unsupported version {version} / dtype code {code}",
                        rebuild)
    need = _HEADER_BYTES + seq_count * (4 + 8) + doc_count * 8
    if idx_size not in (need, need + seq_count):  # + seq_count: multimodal index with sequence modes
        raise UserError(f"dataset {prefix}: {idx_path} is truncated or corrupt "
                        f"({idx_size} bytes, header says {need})", rebuild)

    dtype = np.dtype(_DTYPE_CODES[code])
    lengths = np.fromfile(idx_path, dtype=np.int32, count=seq_count, offset=_HEADER_BYTES)
    doc_idx = np.fromfile(idx_path, dtype=np.int64, count=doc_count,
                          offset=_HEADER_BYTES + seq_count * 12)
    if doc_count < 1 or doc_idx[0] != 0 or doc_idx[-1] != seq_count or np.any(np.diff(doc_idx) < 0) \
            or (seq_count and lengths.min() < 0):
        raise UserError(f"dataset {prefix}: {idx_path} is corrupt (bad document index)", rebuild)
    tokens = int(lengths.sum(dtype=np.int64))
    bin_size = os.path.getsize(bin_path)
    if bin_size != tokens * dtype.itemsize:
        raise UserError(f"dataset {prefix}: {bin_path} has {bin_size} bytes but {idx_path} expects "
                        f"{tokens * dtype.itemsize} (truncated or mismatched pair)", rebuild)

    max_id = None
    if vocab_size is not None and tokens > 0:
        data = np.memmap(bin_path, dtype=dtype, mode="r")
        max_id = 0
        min_id = 0
        for start in range(0, tokens, chunk_tokens):
            part = data[start:start + chunk_tokens]
            max_id = max(max_id, int(part.max()))
            min_id = min(min_id, int(part.min()))
        del data
        if max_id >= vocab_size or min_id < 0:
            bad = max_id if max_id >= vocab_size else min_id
            raise UserError(
                f"dataset {prefix} contains token id {bad} but the model vocab size is {vocab_size}",
                "tokenize the data with the model's tokenizer, or make the model vocab larger than the max id")
    return {"prefix": prefix, "sequences": int(seq_count), "documents": int(doc_count - 1),
            "tokens": tokens, "dtype": dtype.name, "max_token_id": max_id}
