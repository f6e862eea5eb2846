#!/usr/bin/env python
"""Peak memory of HF <-> megatron_midtrain conversion for Llama-3.1-8B-shaped models.

For each layer count N, writes a synthetic bf16 Hugging Face folder with the exact Llama 3.1
8B shapes (hidden 4096, FFN 14336, GQA 32/8, vocab 128256, untied) but N layers, then runs
``tools/convert_checkpoint.py import-hf`` and ``export-hf`` as child processes, sampling
their /proc status every 20 ms:

* ``peak_rss``  = VmHWM (high-water mark of resident memory, file-backed pages included),
* ``peak_anon`` = the largest RssAnon sample (process-private memory: what conversion holds).

Conversion streams tensor by tensor, so peak memory should not grow with N; holding a whole
model would add the model size. The script fits peak = a + b * N over the measured N and
prints the extrapolation to the real 32 layers next to the 32-layer model size.

    python benchmarks/convert_memory.py                      # N = 1, 2, 4 (about 7 GB of disk)
    python benchmarks/convert_memory.py --layers 32          # the full 8B (about 50 GB of disk)
    python benchmarks/convert_memory.py --smoke              # smallest setting (CI smoke test, seconds)

``--smoke`` runs the same import/export children on a Llama-3.1-shaped model shrunk to hidden
256, FFN 512, 4/2 heads and vocab 1024 (N = 1 unless given; a few MB of disk): it checks that
the benchmark runs, not the 8B figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LLAMA31_8B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}
#: --smoke: the same architecture, tiny.
LLAMA31_SMOKE = dict(LLAMA31_8B, vocab_size=1024, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2)
TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "convert_checkpoint.py")


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def measure(cmd: list[str]) -> dict:
    """Run ``cmd``; return wall time, VmHWM and the peak RssAnon sample (bytes)."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(TOOL)))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    hwm = anon = 0
    while proc.poll() is None:
        st = _status(proc.pid)
        hwm = max(hwm, st.get("VmHWM", 0))
        anon = max(anon, st.get("RssAnon", 0))
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_rss": hwm, "peak_anon": anon}


def model_bytes(layers: int, bytes_per_value: int = 2, c: dict = LLAMA31_8B) -> int:
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * f + 2 * h
    return (2 * v * h + h + layers * per_layer) * bytes_per_value


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layer counts N (default 1 2 4; --smoke: 1)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary directory, removed)")
    p.add_argument("--smoke", action="store_true", help="tiny Llama-3.1-shaped model instead of the 8B shapes (CI smoke test)")
    args = p.parse_args(argv)
    shape = LLAMA31_SMOKE if args.smoke else LLAMA31_8B
    layers = args.layers or ([1] if args.smoke else [1, 2, 4])
    size = lambda n: model_bytes(n, c=shape)  # noqa: E731
    full_layers = LLAMA31_8B["num_hidden_layers"]

    import torch

    from megatron_midtrain.convert.synthetic import write_synthetic_hf

    work = args.workdir or tempfile.mkdtemp(prefix="convert_memory_")
    rows = []
    try:
        for n in layers:
            hf, ckpt, back = (os.path.join(work, f"{name}_{n}") for name in ("hf", "ckpt", "export"))
            for d in (hf, ckpt, back):
                shutil.rmtree(d, ignore_errors=True)
            write_synthetic_hf(hf, dict(shape, num_hidden_layers=n), dtype=torch.bfloat16)
            imp = measure([sys.executable, TOOL, "import-hf", "--hf-dir", hf, "--out", ckpt])
            exp = measure([sys.executable, TOOL, "export-hf", "--checkpoint", ckpt, "--out", back])
            row = {"layers": n, "model_bytes": size(n), "import": imp, "export": exp}
            rows.append(row)
            print(f"N={n:3d} model {row['model_bytes'] / 2**30:6.2f} GiB | import: peak RSS {imp['peak_rss'] / 2**30:5.2f} GiB, "
                  f"peak anon {imp['peak_anon'] / 2**30:5.2f} GiB, {imp['seconds']:.0f}s | export: peak RSS "
                  f"{exp['peak_rss'] / 2**30:5.2f} GiB, peak anon {exp['peak_anon'] / 2**30:5.2f} GiB, {exp['seconds']:.0f}s",
                  flush=True)
            for d in (hf, ckpt, back):
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    full = size(full_layers)
    summary = {"shape": "smoke" if args.smoke else "llama3.1-8b", "rows": rows, "full_model_bytes": full}
    if len(rows) >= 2:
        for phase in ("import", "export"):
            for key in ("peak_rss", "peak_anon"):
                xs = [r["layers"] for r in rows]
                ys = [r[phase][key] for r in rows]
                mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
                slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
                at32 = my + slope * (full_layers - mx)
                summary[f"{phase}_{key}_per_layer"] = slope
                summary[f"{phase}_{key}_at_32_layers"] = at32
                print(f"{phase} {key}: {slope / 2**20:+.1f} MiB per layer (one layer = {size(1) - size(0):.3g} B = "
                      f"{(size(1) - size(0)) / 2**20:.0f} MiB) -> {at32 / 2**30:.2f} GiB at {full_layers} layers, "
                      f"vs {full / 2**30:.2f} GiB for the whole {full_layers}-layer model in bf16")
    print(json.dumps(summary, sort_keys=True))
    return summary


if __name__ == "__main__":
    main()
