"""Self-contained demo data: generated corpus + SentencePiece tokenizer + indexed datasets.

:func:`ensure_demo_assets` builds everything on first use (a few seconds on 2 cores, no
network) and returns immediately afterwards. Layout of ``<cache_dir>/demo-v<N>-<hash>/``::

    corpus.jsonl        all training documents, {"text", "kind", ["question", "answer"]}
    math_eval.jsonl     held-out math problems (not in corpus.jsonl), with "prompt"/"answer"
    tokenizer.model     SentencePiece model (pad=0, <s>=1, </s>=2=EOD, <unk>=3)
    tokenizer.vocab
    prose.bin/.idx      indexed prose documents (each followed by EOD)
    math.bin/.idx       indexed math documents (each followed by EOD)
    manifest.json       generation parameters and build summary (written last)

The directory name hashes the generation parameters, so changing any of them builds a new
directory. Builds go to a temporary sibling directory that is renamed into place, under a
file lock: concurrent callers wait for the first builder and reuse its result, and an
interrupted build never leaves a half-written assets directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

from megatron_midtrain.data import corpus as corpus_mod
from megatron_midtrain.errors import UserError

DEMO_FORMAT_VERSION = 2
DEFAULT_VOCAB_SIZE = 2048
DEFAULT_NUM_MATH_EVAL = 500


@dataclasses.dataclass(frozen=True)
class DemoAssets:
    root: str
    tokenizer_path: str
    prose_prefix: str
    math_prefix: str
    corpus_path: str
    vocab_size: int
    math_eval_path: str


def default_cache_dir() -> str:
    """``$MIDTRAIN_CACHE`` if set, else ``~/.cache/megatron_midtrain``."""
    env = os.environ.get("MIDTRAIN_CACHE")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.join(os.path.expanduser("~"), ".cache", "megatron_midtrain")


def _params(vocab_size: int, seed: int, num_prose: int, num_math: int, num_math_eval: int) -> dict:
    return {
        "format_version": DEMO_FORMAT_VERSION,
        "seed": seed,
        "vocab_size": vocab_size,
        "num_prose": num_prose,
        "num_math": num_math,
        "num_math_eval": num_math_eval,
        "tokenizer": "sentencepiece-bpe",
    }


def _assets_for(root: str, vocab_size: int) -> DemoAssets:
    return DemoAssets(
        root=root,
        tokenizer_path=os.path.join(root, "tokenizer.model"),
        prose_prefix=os.path.join(root, "prose"),
        math_prefix=os.path.join(root, "math"),
        corpus_path=os.path.join(root, "corpus.jsonl"),
        vocab_size=vocab_size,
        math_eval_path=os.path.join(root, "math_eval.jsonl"),
    )


def _is_complete(assets: DemoAssets) -> bool:
    needed = [os.path.join(assets.root, "manifest.json"), assets.tokenizer_path, assets.corpus_path,
              assets.math_eval_path]
    for prefix in (assets.prose_prefix, assets.math_prefix):
        needed += [prefix + ".bin", prefix + ".idx"]
    return all(os.path.isfile(p) for p in needed)


def _log(msg: str) -> None:
    print(f"[demo data] {msg}", file=sys.stderr, flush=True)


def _write_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def _build(tmp_root: str, params: dict, workers: int) -> dict:
    from megatron_midtrain.data.indexing import index_texts, validate_indexed_dataset
    from megatron_midtrain.data.tokenizer import train_sentencepiece

    t0 = time.perf_counter()
    _log("building demo corpus...")
    docs = corpus_mod.generate_corpus(params["seed"], params["num_prose"], params["num_math"])
    train_questions = {d["question"] for d in docs if d["kind"] == "math"}
    eval_docs = corpus_mod.generate_math_eval(params["num_math_eval"], params["seed"], train_questions)
    _write_jsonl(os.path.join(tmp_root, "corpus.jsonl"), docs)
    _write_jsonl(os.path.join(tmp_root, "math_eval.jsonl"), eval_docs)
    t1 = time.perf_counter()
    _log(f"  {len(docs)} docs, {sum(len(d['text']) for d in docs) / 1e6:.2f} MB text, "
         f"{len(eval_docs)} held-out math problems ({t1 - t0:.1f}s)")

    _log(f"training tokenizer (SentencePiece BPE, vocab {params['vocab_size']})...")
    model = train_sentencepiece((d["text"] for d in docs), os.path.join(tmp_root, "tokenizer"),
                                vocab_size=params["vocab_size"])
    t2 = time.perf_counter()
    _log(f"  done ({t2 - t1:.1f}s)")

    summaries = {}
    for kind in ("prose", "math"):
        _log(f"indexing {kind}...")
        s = index_texts((d["text"] for d in docs if d["kind"] == kind), os.path.join(tmp_root, kind),
                        model, workers=workers, log=None)
        validate_indexed_dataset(os.path.join(tmp_root, kind), params["vocab_size"])
        s["output_prefix"] = kind  # relative to the assets root (tmp_root is renamed)
        _log(f"  {s['docs']} docs, {s['tokens']} tokens ({s['seconds']:.1f}s)")
        summaries[kind] = s
    t3 = time.perf_counter()
    return {"params": params, "index": summaries,
            "timings_s": {"corpus": round(t1 - t0, 3), "tokenizer": round(t2 - t1, 3),
                          "indexing": round(t3 - t2, 3), "total": round(t3 - t0, 3)}}


def ensure_demo_assets(
    cache_dir: str | os.PathLike | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = corpus_mod.DEFAULT_SEED,
    num_prose: int = corpus_mod.DEFAULT_NUM_PROSE,
    num_math: int = corpus_mod.DEFAULT_NUM_MATH,
    num_math_eval: int = DEFAULT_NUM_MATH_EVAL,
    workers: int = 1,
) -> DemoAssets:
    """Return the demo assets under ``cache_dir`` (default :func:`default_cache_dir`), building
    them first if needed. ``vocab_size`` is the SentencePiece vocab size; the model's
    (padded) vocab must be >= it."""
    import fcntl

    if vocab_size < 300:
        raise UserError(f"demo vocab_size {vocab_size} is too small",
                        "use at least 300 (256 byte pieces + specials + merges)")
    cache_dir = os.path.abspath(os.fspath(cache_dir if cache_dir is not None else default_cache_dir()))
    params = _params(vocab_size, seed, num_prose, num_math, num_math_eval)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = os.path.join(cache_dir, f"demo-v{DEMO_FORMAT_VERSION}-{digest}")
    assets = _assets_for(root, vocab_size)
    if _is_complete(assets):
        return assets

    try:
        os.makedirs(cache_dir, exist_ok=True)
        lock_file = open(os.path.join(cache_dir, f".{os.path.basename(root)}.lock"), "a+")
    except OSError as err:
        raise UserError(f"cannot write demo data cache {cache_dir}: {err.strerror}",
                        "set MIDTRAIN_CACHE to a writable directory") from None
    with lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        try:
            if _is_complete(assets):  # another process built it while we waited
                return assets
            if os.path.exists(root):  # incomplete leftover (should not happen with os.replace)
                shutil.rmtree(root, ignore_errors=True)
            tmp_root = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=cache_dir)
            os.chmod(tmp_root, 0o755)  # mkdtemp makes it 0o700
            try:
                _log(f"first use: building demo assets in {root}")
                manifest = _build(tmp_root, params, workers)
                with open(os.path.join(tmp_root, "manifest.json"), "w") as f:
                    json.dump(manifest, f, indent=2, sort_keys=True)
                try:
                    os.replace(tmp_root, root)
                except OSError:
                    if not _is_complete(assets):  # lost a race with a lock-less builder
                        raise
                _log(f"demo assets ready ({manifest['timings_s']['total']:.1f}s)")
            finally:
                shutil.rmtree(tmp_root, ignore_errors=True)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return assets


def load_math_eval(assets: DemoAssets, limit: int | None = None) -> list[dict]:
    """The held-out math problems: dicts with ``prompt``, ``question``, ``answer``, ``text``."""
    rows = []
    with open(assets.math_eval_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


if __name__ == "__main__":  # python -m megatron_midtrain.data.demo [CACHE_DIR]
    a = ensure_demo_assets(sys.argv[1] if len(sys.argv) > 1 else None)
    print(json.dumps(dataclasses.asdict(a), indent=2))
