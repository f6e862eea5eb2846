"""RMT entropy index: the vocab-parallel entropy and tools/preprocess_entropy.py (CPU, gloo).

One child process builds a tiny checkpoint (seeded init) and a tiny indexed dataset, then runs
the tool at TP1 (full, and interrupted + resumed); a 2-rank child runs it at TP2. Entropies are
checked against torch's full-vocabulary entropy of a hand-run forward pass.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from megatron_midtrain.errors import UserError
from megatron_midtrain.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]
WINDOW, STRIDE, BLOCK = 40, 16, 64
TEXTS = [
    "The cat sat on the mat.",
    "Question: what is 3 * 4? Answer: 12. " * 3,
    "A river flows to the sea, and the sea never fills. The wind goes round and round.",
    "ünïcødé ✓ 12 + 7 = 19",
    "short",
    "Then the long document: " + "one two three four five six seven eight nine ten. " * 4,
]


def _tool():
    spec = importlib.util.spec_from_file_location("preprocess_entropy", ROOT / "tools" / "preprocess_entropy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(ckpt, data, out, *extra):
    return ["--checkpoint", ckpt, "--data", data, "--output", out, "--window", str(WINDOW), "--stride", str(STRIDE),
            "--block-tokens", str(BLOCK), "--micro-batch-tokens", "64", *map(str, extra)]


def _torch_entropy(logits):
    import torch

    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------- child processes
def _hand_built_model(ckpt_dir: str):
    """The checkpoint's GPTModel built and loaded by hand (TP1, fp32)."""
    import torch
    from megatron.core import dist_checkpointing

    from megatron_midtrain.config.schema import ModelConfig, ParallelConfig
    from megatron_midtrain.model.builder import build_gpt_stage, build_transformer_config
    from megatron_midtrain.training.checkpoint import read_meta

    model_cfg = ModelConfig(**read_meta(ckpt_dir)["model_config"])
    model = build_gpt_stage(model_cfg, build_transformer_config(model_cfg, ParallelConfig(), torch.float32), WINDOW, False)
    model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt_dir)["model"])
    return model.eval()


def _prepare(root: str) -> dict:
    import torch

    from megatron_midtrain.data.indexing import index_texts
    from megatron_midtrain.eval.checkpoint_logprobs import ensure_single_process_parallel_state
    from megatron_midtrain.testing.runs import save_initial_checkpoint
    from megatron_midtrain.training.checkpoint import read_meta

    ckpt = save_initial_checkpoint([f"run.dir={root}/run"])
    meta = read_meta(ckpt)
    data = f"{root}/corpus"
    index_texts(TEXTS, data, meta["tokenizer_path"], log=None)
    other = f"{root}/other"
    index_texts(TEXTS[::-1], other, meta["tokenizer_path"], log=None)
    tool = _tool()
    out = {"ckpt": ckpt, "data": data, "other": other, "full": f"{root}/tp1", "resumed": f"{root}/resumed"}
    out["summary"] = tool.main(_args(ckpt, data, out["full"]))
    partial = tool.main(_args(ckpt, data, out["resumed"], "--max-blocks", 1))
    out["partial"] = partial
    from megatron_midtrain.rl.entropy import check_entropy_alignment

    try:
        check_entropy_alignment(out["resumed"], data)
        out["partial_refusal"] = None
    except UserError as err:
        out["partial_refusal"] = str(err)
    out["resumed_summary"] = tool.main(_args(ckpt, data, out["resumed"]))
    try:  # the finished index's directory, reused for another dataset
        tool.run(tool.parse_args(_args(ckpt, other, out["full"])))
        out["reuse_refusal"] = None
    except UserError as err:
        out["reuse_refusal"] = str(err)

    # Expected: every sequence shorter than the window, run whole by hand; torch entropy in float64.
    ensure_single_process_parallel_state()
    model = _hand_built_model(ckpt)
    tokens = np.memmap(data + ".bin", dtype=np.dtype(json.load(open(f"{out['full']}/meta.json"))["dataset"]["token_dtype"]),
                       mode="r")
    lengths = np.fromfile(data + ".idx", dtype=np.int32, count=len(TEXTS), offset=34)
    expected, offset = {}, 0
    with torch.no_grad():
        for n in lengths.tolist():
            ids = torch.tensor(tokens[offset:offset + n].astype(np.int64))[None]
            if n <= WINDOW:
                logits = model(ids, torch.arange(n)[None], None)
                expected[offset] = _torch_entropy(logits)[0].tolist()
            offset += n
    out["expected"] = expected
    out["lengths"] = lengths.tolist()
    return out


def _tp2_pp2(ckpt: str, data: str, out: str, layout: str) -> dict:
    return _tool().main(_args(ckpt, data, f"{out}_{layout}", f"--{layout[:2]}", 2))


def _entropy_two_ranks(logits, vocab_sizes):
    import torch.distributed as dist

    from megatron_midtrain.rl.entropy import vocab_parallel_entropy

    dist.init_process_group("gloo")
    rank, shard = dist.get_rank(), logits.shape[-1] // 2
    return [vocab_parallel_entropy(logits[..., rank * shard:(rank + 1) * shard].clone(), dist.group.WORLD,
                                   vocab_size=v, chunk=3).numpy() for v in vocab_sizes]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("entropy")
    return run_distributed(_prepare, 1, str(root))[0]


@pytest.fixture(scope="module")
def tp2(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("entropy_mp") / "run")
    # one process pair per layout: megatron's pipeline schedule does not survive re-initialising groups
    summaries = [run_distributed(_tp2_pp2, 2, world["ckpt"], world["data"], out, layout, timeout_s=240)[0]
                 for layout in ("tp2", "pp2")]
    return out, summaries


# ---------------------------------------------------------------- the pure function
def test_entropy_matches_torch_single_process():
    import torch

    from megatron_midtrain.rl.entropy import vocab_parallel_entropy

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 37) * 4
    logits[0, 0, 3] = 60.0  # a near-one-hot row
    np.testing.assert_allclose(vocab_parallel_entropy(logits, chunk=4).numpy(), _torch_entropy(logits).numpy(),
                               atol=1e-5, rtol=0)
    # padded vocabulary columns are left out
    np.testing.assert_allclose(vocab_parallel_entropy(logits, vocab_size=30).numpy(),
                               _torch_entropy(logits[..., :30]).numpy(), atol=1e-5, rtol=0)
    assert vocab_parallel_entropy(logits.to(torch.bfloat16)).dtype == torch.float32


def test_entropy_matches_torch_on_two_gloo_ranks():
    import torch

    torch.manual_seed(1)
    logits = torch.randn(2, 7, 40) * 3
    for full, padded in run_distributed(_entropy_two_ranks, 2, logits, [None, 33]):
        np.testing.assert_allclose(full, _torch_entropy(logits).numpy(), atol=1e-5, rtol=0)
        # rank 1's shard [20, 40) is partly padding (>= 33)
        np.testing.assert_allclose(padded, _torch_entropy(logits[..., :33]).numpy(), atol=1e-5, rtol=0)


def test_buckets_and_quantiles():
    from megatron_midtrain.rl.entropy import bucketize, quantile_thresholds

    h = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
    assert bucketize(h, (1.0, 2.0)).tolist() == [0, 0, 1, 1, 2, 2]
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, size=200_000).astype(np.float32)
    exact = quantile_thresholds(x, (0.25, 0.75))
    approx = quantile_thresholds(x, (0.25, 0.75), exact_limit=10, chunk=30_000, bins=1 << 16)
    np.testing.assert_allclose(approx, exact, atol=1e-3)
    with pytest.raises(UserError):
        bucketize(h, (2.0, 1.0))


# ---------------------------------------------------------------- the tool
def test_tool_writes_aligned_entropy_matching_torch(world):
    from megatron_midtrain.rl.entropy import check_entropy_alignment, open_entropy_index

    out = world["full"]
    meta = check_entropy_alignment(out, world["data"])
    entropy, buckets, _ = open_entropy_index(out, world["data"])
    assert entropy.shape == (sum(world["lengths"]),) and buckets.shape == entropy.shape
    assert meta["complete"] and meta["tokenizer"] and meta["checkpoint"] == os.path.realpath(world["ckpt"])
    assert len(world["expected"]) >= 3 and any(n > WINDOW for n in world["lengths"])  # windows exercised too
    for offset, exp in world["expected"].items():
        np.testing.assert_allclose(entropy[offset:offset + len(exp)], exp, atol=1e-5, rtol=0)
    assert np.all(entropy > 0) and np.all(np.isfinite(entropy))
    t1, t2 = meta["thresholds"]
    np.testing.assert_array_equal(buckets, np.searchsorted([t1, t2], entropy.astype(np.float64), side="right"))
    report = json.loads(Path(out, "report.json").read_text())
    props = report["bucket_proportions"]
    assert abs(sum(props.values()) - 1) < 1e-9 and all(0.2 < p < 0.45 for p in props.values())  # terciles
    assert report["tokens_per_s"] > 0 and sum(report["histogram"]["counts"]) == entropy.size
    assert Path(out, "entropy_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert world["summary"]["complete"]


def test_tp1_tp2_and_pp2_agree(world, tp2):
    out, (tp2_summary, pp2_summary) = tp2
    assert tp2_summary["complete"] and pp2_summary["complete"]
    a = np.load(Path(world["full"], "entropy.npy"))
    for layout in ("tp2", "pp2"):
        np.testing.assert_allclose(np.load(Path(f"{out}_{layout}", "entropy.npy")), a, atol=1e-5, rtol=0)


def test_interrupted_run_resumes_to_the_same_result(world):
    assert not world["partial"]["complete"] and world["partial"]["missing_blocks"] > 0
    assert world["partial_refusal"] and "incomplete" in world["partial_refusal"]
    assert world["resumed_summary"]["complete"]
    # the resumed run only computed the blocks left over
    assert world["resumed_summary"]["tokens_this_run"] < sum(world["lengths"])
    np.testing.assert_array_equal(np.load(Path(world["resumed"], "entropy.npy")), np.load(Path(world["full"], "entropy.npy")))
    np.testing.assert_array_equal(np.load(Path(world["resumed"], "buckets.npy")), np.load(Path(world["full"], "buckets.npy")))


def test_misaligned_index_is_refused(world, tmp_path):
    from megatron_midtrain.rl.entropy import check_entropy_alignment

    with pytest.raises(UserError) as err:
        check_entropy_alignment(world["full"], world["other"])  # same tokens, other document order
    msg = str(err.value)
    assert "\n" not in msg and "does not line up" in msg and "preprocess_entropy.py" in msg
    with pytest.raises(UserError, match="tokenizer"):
        check_entropy_alignment(world["full"], world["data"], tokenizer_id="SentencePieceTokenizer:1:x")
    with pytest.raises(UserError, match="no meta.json"):
        check_entropy_alignment(tmp_path, world["data"])


def test_reusing_an_output_dir_for_other_data_is_refused(world):
    msg = world["reuse_refusal"]
    assert msg and "different dataset" in msg and "\n" not in msg
