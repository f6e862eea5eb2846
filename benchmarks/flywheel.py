#!/usr/bin/env python
"""The flywheel, measured: do ReMiT and RMT beat plain next-token prediction on the demo, and why.

    python benchmarks/flywheel.py            # the full run (~1 h on 2 CPU cores; resumable)
    python benchmarks/flywheel.py --quick    # the whole pipeline at tiny sizes (minutes; CI smoke test)

Pipeline, evaluation and outputs: megatron_midtrain/flywheel/ (recipe.py has every stage).
Each stage is cached under ``--workdir`` by its config: rerun the same command to resume after an
interruption (a finished stage is reused, an unfinished one continues from its checkpoint).
Writes ``<out>/results.md``, ``<out>/results.json`` and ``<out>/flywheel.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_midtrain.utils.quiet import silence_known_warnings  # noqa: E402

silence_known_warnings()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny stages, 2 seeds, no ablations (pipeline check only)")
    parser.add_argument("--out", default=os.path.join(ROOT, "flywheel"), help="where results.md/json and flywheel.png go")
    parser.add_argument("--workdir", default=None, help="stage cache (default: <out>/work, or <out>/work-quick)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 3, --quick 2)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of the methods (default: all); NTP always runs, and the ablations of the chosen methods")
    args = parser.parse_args(argv)

    from megatron_midtrain.errors import UserError
    from megatron_midtrain.flywheel import report
    from megatron_midtrain.flywheel.recipe import METHODS, Recipe
    from megatron_midtrain.flywheel.runner import Flywheel

    recipe = Recipe.quick() if args.quick else Recipe()
    if args.seeds is not None:
        if args.seeds < 1:
            print("error: --seeds must be >= 1 (e.g. --seeds 3)", file=sys.stderr)
            return 2
        recipe.seeds = list(range(1, args.seeds + 1))
    methods = args.methods.split(",") if args.methods else None
    unknown = sorted(set(methods or []) - set(METHODS))
    if unknown:
        print(f"error: unknown --methods {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if methods and "ntp" not in methods:
        methods = ["ntp"] + methods  # every difference is against NTP
    workdir = args.workdir or os.path.join(args.out, "work-quick" if args.quick else "work")
    if args.quick:  # a synthetic entropy index (bucket = token id mod 3): the real one takes minutes
        from megatron_midtrain.data.demo import default_cache_dir
        from megatron_midtrain.testing.rollouts import demo_entropy_dirs

        recipe.entropy_dirs = demo_entropy_dirs(default_cache_dir(), os.path.join(os.path.abspath(workdir), "entropy-synthetic"))
    start = time.perf_counter()
    try:
        results = Flywheel(workdir, recipe, methods).run()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    results.update(recipe=vars(recipe), wall_s=time.perf_counter() - start,
                   command="python benchmarks/flywheel.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
                   machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, torch CPU, world size 1")
    header = "# Flywheel results" + (" (--quick: pipeline check, sizes too small to mean anything)" if args.quick else "")
    table = report.write(results, args.out, header)
    print(open(os.path.join(args.out, "results.md")).read())
    print(json.dumps(table))  # the summary (method -> metric -> mean, se, n, diff vs NTP), one line
    return 0


if __name__ == "__main__":
    sys.exit(main())
