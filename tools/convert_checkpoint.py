#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and megatron_midtrain (both directions, streaming).

    python tools/convert_checkpoint.py import-hf --hf-dir /models/OLMo-2-0425-1B --out ckpt/olmo2_1b
    python tools/convert_checkpoint.py export-hf --checkpoint runs/x --out hf/x

import-hf reads config.json + *.safetensors from a local folder (no network) and writes a
checkpoint directory (usable as train.init_from / reference.checkpoint / --checkpoint), its
model config (OUT/model.yaml) and the tokenizer files. export-hf writes a folder that
``transformers.AutoModelForCausalLM.from_pretrained`` loads. Supported families: llama,
qwen2, qwen3, olmo2, smollm3. Tensors are converted one at a time (peak memory ~ the largest
tensor plus one output shard), into a temporary directory renamed into place at the end.
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
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="Hugging Face folder -> megatron_midtrain checkpoint")
    imp.add_argument("--hf-dir", required=True, metavar="DIR", help="local HF model folder (config.json + safetensors)")
    imp.add_argument("--out", required=True, metavar="CKPT", help="checkpoint directory to create")
    imp.add_argument("--tp", type=int, default=1, help="check that the model splits at this TP (the checkpoint loads at any TP)")
    imp.add_argument("--pp", type=int, default=1, help="check that the model splits at this PP (the checkpoint loads at any PP)")
    imp.add_argument("--dtype", default="auto", help="auto (keep the HF dtype), float32, bfloat16 or float16")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    exp = sub.add_parser("export-hf", help="megatron_midtrain checkpoint -> Hugging Face folder")
    exp.add_argument("--checkpoint", required=True, metavar="CKPT", help="run dir, checkpoints/ or a checkpoint directory")
    exp.add_argument("--out", required=True, metavar="DIR", help="HF folder to create")
    exp.add_argument("--family", default=None, help="HF model family (default: the imported one, or inferred)")
    exp.add_argument("--dtype", default="auto", help="auto (keep the checkpoint dtype), float32, bfloat16 or float16")
    exp.add_argument("--max-shard-size-gb", type=float, default=2.0, help="safetensors shard size (default 2 GB)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> dict:
    args = parse_args(argv)
    from megatron_midtrain.convert import api

    if args.command == "import-hf":
        report = api.import_hf(args.hf_dir, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype, overwrite=args.overwrite)
        print(f"imported {report.family} from {os.path.abspath(args.hf_dir)} into {report.out}: {report.tensors} HF tensors, "
              f"{report.bytes / 2**20:.1f} MiB in {report.seconds:.1f}s")
    else:
        if args.max_shard_size_gb <= 0:
            raise UserError("--max-shard-size-gb must be > 0", "e.g. --max-shard-size-gb 2")
        report = api.export_hf(args.checkpoint, args.out, family=args.family, dtype=args.dtype,
                               max_shard_bytes=int(args.max_shard_size_gb * 2**30), overwrite=args.overwrite)
        print(f"exported {report.family} to {report.out}: {report.tensors} tensors, {report.bytes / 2**20:.1f} MiB "
              f"in {report.seconds:.1f}s")
    for note in report.notes:
        print(f"note: {note}")
    summary = {"command": args.command, "out": report.out, "family": report.family, "tensors": report.tensors,
               "bytes": report.bytes, "seconds": round(report.seconds, 3)}
    print(json.dumps(summary, sort_keys=True), flush=True)
    return summary


if __name__ == "__main__":
    main()
