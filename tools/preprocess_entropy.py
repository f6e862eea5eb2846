#!/usr/bin/env python
"""Per-token entropy index of an indexed dataset under a frozen base model (RMT, SPEC §3).

    python tools/preprocess_entropy.py --checkpoint runs/base --data data/corpus_text_document \\
        --output entropy/corpus [--quantiles 0.33 0.67 | --thresholds 1.0 3.0]

    torchrun --nproc-per-node 8 tools/preprocess_entropy.py --tp 2 --pp 2 ...   # any TP/PP/DP

The implementation (and the description of the outputs) is
:mod:`megatron_midtrain.rl.entropy_index`; the RMT demo calls it in-process.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_midtrain.rl.entropy_index import main, parse_args, run  # noqa: E402,F401

if __name__ == "__main__":
    main()
