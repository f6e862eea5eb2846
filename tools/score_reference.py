#!/usr/bin/env python
"""Score a frozen reference model once, for offline ReMiT training (reference.mode=offline).

Writes the reference's log-prob of every target token of exactly the samples that training
steps 1..train.max_steps will consume, into a store directory. Give it the *training*
overrides (data, seq length, global batch, seed...) plus the reference and the store::

    python tools/score_reference.py data.paths=[...] data.seq_length=4096 train.max_steps=5000 \\
        reference.checkpoint=runs/ref reference.scores=scores/ref-5000 [--dtype float16|float32]

    torchrun --nproc-per-node 8 tools/score_reference.py parallel.tp=2 ...   # any TP/PP/DP

then train with ``reference.mode=offline reference.scores=scores/ref-5000``. Interrupted or
extended (larger train.max_steps) scoring resumes by re-running the same command: steps whose
samples are all stored are skipped.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_midtrain.utils.quiet import silence_known_warnings

silence_known_warnings()

from megatron_midtrain.errors import exit_on_user_error


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other arguments are Hydra overrides of the training config (key=value).",
    )
    p.add_argument("--dtype", choices=("float16", "float32"), default="float32",
                   help="storage dtype of the log-probs (default float32: offline training then matches co-located "
                        "exactly; float16 halves the disk space)")
    p.add_argument("--log-interval", type=int, default=0, metavar="STEPS",
                   help="progress line every STEPS scored steps (default: about 20 lines per run)")
    args, overrides = p.parse_known_args(argv)
    flags = [o for o in overrides if o.startswith("-")]
    if flags:
        p.error(f"unrecognized arguments: {' '.join(flags)}")
    return args, overrides


@exit_on_user_error
def main(argv=None) -> None:
    args, overrides = parse_args(argv)
    from megatron_midtrain.reference.offline import score_reference

    score_reference(overrides, dtype=args.dtype, log_interval=args.log_interval)


if __name__ == "__main__":
    main()
