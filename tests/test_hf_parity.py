"""Parity with Hugging Face transformers, and the export/import round trip.

Five tiny random models (Llama with Llama-3.1 RoPE scaling, Qwen2 with QKV bias, Qwen3 with
per-head QK-norm, OLMo-2 with post-norm and full-width QK-norm under GQA, SmolLM3 with a NoPE
layer) are built locally by transformers from a config with a large ``initializer_range`` and
random norm weights, so the logits are far from flat. Each is imported with
``tools/convert_checkpoint.py``; ``tools/logprobs.py``'s scoring must match transformers'
fp32 log-probs within 1e-4 at TP=1, TP=2 and PP=2 (one spawned job per layout, all five
families in it). Export then re-import must be bitwise identical, and transformers must load
the export and give the original logits.
"""

from __future__ import annotations

import json
import os

import pytest

from megatron_midtrain.testing.distributed import run_distributed

FAMILIES = ("llama", "qwen2", "qwen3", "olmo2", "smollm3")
VOCAB = 320
TOLERANCE = 1e-4
LENGTHS = (24, 17, 9)  # different lengths: batches are padded on the right


def hf_config(family: str, **overrides):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.5, rms_norm_eps=1e-6,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    if family == "llama":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
        return tf.LlamaConfig(**common, rope_theta=500000.0, rope_scaling=scaling, tie_word_embeddings=False)
    if family == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=False)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)  # head_dim != hidden / heads
    if family == "olmo2":
        return tf.Olmo2Config(**common, tie_word_embeddings=False)
    if family == "smollm3":
        common.setdefault("no_rope_layers", [1, 0])  # HF: 1 = RoPE, so layer 1 is NoPE
        return tf.SmolLM3Config(**common, tie_word_embeddings=True)
    raise ValueError(family)


def build_hf_model(family: str, out_dir: str, seed: int = 0):
    """A random transformers model saved as safetensors; norms and biases randomised too."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(family)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(out_dir)
    return model


def token_sequences(seed: int = 1) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in LENGTHS]


def hf_logprobs(model, sequences) -> list[list[float]]:
    import torch

    out = []
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq])
            logp = torch.log_softmax(model(ids).logits.float(), dim=-1)[0, :-1]
            out.append(logp.gather(-1, ids[0, 1:, None])[:, 0].tolist())
    return out


def max_abs_diff(a, b) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _checkpoint_tensors(path: str) -> dict:
    from megatron_midtrain.convert.mcore_io import CheckpointReader
    from megatron_midtrain.eval.checkpoint_logprobs import _model_config_from_meta, peek_checkpoint

    info = peek_checkpoint(path)
    reader = CheckpointReader(info.path, _model_config_from_meta(info.meta, info.path))
    return {(k, layer): t for layer in [None] + reader.layers for k, t in reader.load(layer).items()}


def _prepare(root: str) -> dict:
    """World size 1: build, import, score at TP1, export, re-import, compare."""
    import torch
    import transformers as tf
    from safetensors.torch import load_file

    from tools.convert_checkpoint import main as convert
    from tools.logprobs import compute

    report = {}
    sequences = token_sequences()
    for family in FAMILIES:
        hf_dir, ckpt = os.path.join(root, family, "hf"), os.path.join(root, family, "ckpt")
        model = build_hf_model(family, hf_dir)
        ref = hf_logprobs(model, sequences)
        convert(["import-hf", "--hf-dir", hf_dir, "--out", ckpt])
        tp1 = [lp for lp, _ in compute(ckpt, sequences)]
        # Round trip: export, re-import; both directions must be exact.
        export, ckpt2 = os.path.join(root, family, "export"), os.path.join(root, family, "ckpt2")
        convert(["export-hf", "--checkpoint", ckpt, "--out", export])
        convert(["import-hf", "--hf-dir", export, "--out", ckpt2])
        a, b = _checkpoint_tensors(ckpt), _checkpoint_tensors(ckpt2)
        ckpt_identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        orig, back = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(os.path.join(export, "model.safetensors"))
        if hf_config(family).tie_word_embeddings:
            orig.pop("lm_head.weight", None)
        hf_identical = orig.keys() == back.keys() and all(torch.equal(orig[k], back[k]) for k in orig)
        reloaded = tf.AutoModelForCausalLM.from_pretrained(export).eval()
        ids = torch.tensor([sequences[0]])
        with torch.no_grad():
            logits_diff = (reloaded(ids).logits - model(ids).logits).abs().max().item()
        report[family] = {"ref": ref, "tp1": tp1, "ckpt_identical": ckpt_identical, "hf_identical": hf_identical,
                          "export_logits_diff": logits_diff, "num_tensors": len(a)}
    # Negative control: the NoPE layer matters in the SmolLM3 test model (flags not ignorable).
    smol = tf.AutoModelForCausalLM.from_pretrained(os.path.join(root, "smollm3", "hf"), no_rope_layers=[1, 1]).eval()
    report["smollm3"]["all_rope_diff"] = max_abs_diff(hf_logprobs(smol, sequences), report["smollm3"]["ref"])
    return report


def _score_layout(root: str, tp: int, pp: int) -> dict | None:
    import torch.distributed as dist

    from megatron_midtrain.eval.scorer import init_parallel
    from tools.logprobs import compute

    init_parallel(tp, pp)
    sequences = token_sequences()
    out = {}
    for family in FAMILIES:
        result = compute(os.path.join(root, family, "ckpt"), sequences)
        if result is not None:
            out[family] = [lp for lp, _ in result]
    return out if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    pytest.importorskip("transformers")
    root = str(tmp_path_factory.mktemp("hf_parity"))
    report = run_distributed(_prepare, 1, root, backend="gloo")[0]
    return root, report


def _record(name: str, diffs: dict) -> None:
    print(f"\n{name}: " + json.dumps({k: f"{v:.2e}" for k, v in diffs.items()}))


def test_models_are_not_trivial(prepared):
    _, report = prepared
    for family in FAMILIES:
        ref = report[family]["ref"]
        spread = max(max(r) for r in ref) - min(min(r) for r in ref)
        assert spread > 5.0, f"{family}: log-probs span only {spread:.2f} nats; the parity check would be weak"
    assert report["smollm3"]["all_rope_diff"] > 1e-2


def test_parity_tp1(prepared):
    _, report = prepared
    diffs = {f: max_abs_diff(report[f]["tp1"], report[f]["ref"]) for f in FAMILIES}
    _record("TP1 max |logp - logp_hf|", diffs)
    for family, d in diffs.items():
        assert d < TOLERANCE, f"{family}: TP1 differs from transformers by {d}"


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_parity_parallel(prepared, tp, pp):
    root, report = prepared
    scores = run_distributed(_score_layout, 2, root, tp, pp, backend="gloo")[0]
    diffs = {f: max_abs_diff(scores[f], report[f]["ref"]) for f in FAMILIES}
    _record(f"TP{tp} PP{pp} max |logp - logp_hf|", diffs)
    for family, d in diffs.items():
        assert d < TOLERANCE, f"{family}: TP{tp}/PP{pp} differs from transformers by {d}"


def test_round_trip_bitwise(prepared):
    _, report = prepared
    for family in FAMILIES:
        r = report[family]
        assert r["ckpt_identical"], f"{family}: export + re-import changed the checkpoint"
        assert r["hf_identical"], f"{family}: the exported safetensors differ from the original"
        assert r["export_logits_diff"] == 0.0, f"{family}: transformers' logits of the export differ by {r['export_logits_diff']}"
