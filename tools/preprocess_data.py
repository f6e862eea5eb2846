#!/usr/bin/env python
"""Tokenize jsonl / plain-text files into a megatron-core indexed dataset (.bin + .idx).

Example::

    python tools/preprocess_data.py --input data/*.jsonl --tokenizer tok.model \\
        --output-prefix data/my_corpus --workers 2

jsonl files (.jsonl/.json) hold one JSON object per line, text under --json-key; any other
file is plain text with one document per line. The last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore", message="Transformer Engine and Apex")  # megatron-core import noise
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_midtrain.errors import UserError, exit_on_user_error  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", action="append", required=True, metavar="PATH",
                   help="jsonl or txt file, or a glob; may repeat")
    p.add_argument("--json-key", default="text", help="JSON field holding the text (default: text)")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="SentencePiece .model, tokenizer.json, or a folder containing tokenizer.json")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes (default: 2)")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the EOD token after each document (default: on)")
    p.add_argument("--log-interval-s", type=float, default=2.0,
                   help="seconds between progress lines on stderr (default: 2)")
    p.add_argument("--chunk-docs", type=int, default=256, help="documents per work item (default: 256)")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}", "pass --workers 1 or more")
    if args.chunk_docs < 1:
        raise UserError(f"--chunk-docs must be >= 1, got {args.chunk_docs}", "pass --chunk-docs 1 or more")

    from megatron_midtrain.data.indexing import build_indexed_dataset

    summary = build_indexed_dataset(
        args.input, args.output_prefix, args.tokenizer, json_key=args.json_key,
        workers=args.workers, append_eod=args.append_eod, log_interval_s=args.log_interval_s,
        chunk_docs=args.chunk_docs,
    )
    print(f"wrote {summary['output_prefix']}.bin/.idx: {summary['docs']} docs, {summary['tokens']} tokens, "
          f"{summary['bytes'] / 1e6:.2f} MB in {summary['seconds']:.2f}s "
          f"({summary['docs_per_s']:.0f} docs/s, {summary['mb_per_s']:.2f} MB/s, {summary['workers']} workers)")
    print(json.dumps(summary, sort_keys=True), flush=True)
    return summary


if __name__ == "__main__":
    main()
