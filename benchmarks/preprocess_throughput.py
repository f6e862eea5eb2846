#!/usr/bin/env python
"""Preprocessing throughput: index the demo corpus with 1 and 2 workers, side by side.

    python benchmarks/preprocess_throughput.py [--workers 1 2] [--repeat 2] [--copies 1]

Builds the demo corpus jsonl and a SentencePiece tokenizer in a temporary directory, then
runs megatron_midtrain.data.indexing.build_indexed_dataset once per worker count (best of
--repeat runs) and prints docs/s, MB/s and the speedup over the first worker count. The
outputs of all runs are checked to be byte-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message="Transformer Engine and Apex")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=2, help="runs per worker count; best is reported")
    p.add_argument("--copies", type=int, default=1, help="repeat the corpus N times in the input")
    p.add_argument("--vocab-size", type=int, default=2048)
    args = p.parse_args()

    from megatron_midtrain.data.corpus import generate_corpus
    from megatron_midtrain.data.indexing import build_indexed_dataset
    from megatron_midtrain.data.tokenizer import train_sentencepiece

    with tempfile.TemporaryDirectory(prefix="preprocess_bench-") as tmp:
        docs = generate_corpus()
        jsonl = os.path.join(tmp, "corpus.jsonl")
        with open(jsonl, "w", encoding="utf-8") as f:
            for _ in range(args.copies):
                for d in docs:
                    f.write(json.dumps(d) + "\n")
        model = train_sentencepiece((d["text"] for d in docs), os.path.join(tmp, "tok"), args.vocab_size)
        size_mb = os.path.getsize(jsonl) / 1e6
        print(f"input: {len(docs) * args.copies} docs, {size_mb:.2f} MB jsonl; cpus: {os.cpu_count()}")

        results = {}
        reference = None
        for w in args.workers:
            best = None
            for r in range(args.repeat):
                prefix = os.path.join(tmp, f"out_w{w}_r{r}")
                s = build_indexed_dataset(jsonl, prefix, model, workers=w, log=None)
                if best is None or s["seconds"] < best["seconds"]:
                    best = s
                with open(prefix + ".bin", "rb") as fb, open(prefix + ".idx", "rb") as fi:
                    data = (fb.read(), fi.read())
                if reference is None:
                    reference = data
                elif data != reference:
                    raise SystemExit(f"output with {w} workers differs from the first run")
            results[w] = best

        base = results[args.workers[0]]
        print(f"{'workers':>7} {'seconds':>8} {'docs/s':>9} {'MB/s':>7} {'speedup':>8}")
        for w, s in results.items():
            print(f"{w:>7} {s['seconds']:>8.3f} {s['docs_per_s']:>9.0f} {s['mb_per_s']:>7.2f} "
                  f"{base['seconds'] / s['seconds']:>7.2f}x")
        print(json.dumps({str(w): {k: s[k] for k in ("docs", "tokens", "bytes", "seconds", "docs_per_s",
                                                      "mb_per_s")} for w, s in results.items()}))


if __name__ == "__main__":
    main()
