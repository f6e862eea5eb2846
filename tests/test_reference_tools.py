"""Offline scoring tools: tools/token_delta_report.py and tools/select_miniplm.py (CPU, gloo).

Two tiny demo checkpoints (2 and 4 NTP steps, different seeds) are trained once per module;
the tools run as real command lines. Log-probs are checked against an independent
computation (model rebuilt by hand, full forward, torch.log_softmax).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_midtrain.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "The cat sat on the mat.\nThen <b>12 + 7</b> = 19 & ünïcødé ✓",
    "Question: what is 3 * 4? Answer: 12.",
    "A river flows to the sea, and the sea never fills.",
]


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / f"{name}.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))


#: Documents for select_miniplm: 8 short ones and one longer than the 1024-token context.
CORPUS = [TEXTS[i % 3] + " " * (i // 3) + f" item {i}." for i in range(8)] + [" ".join(TEXTS) * 16]
WINDOW, STRIDE = 12, 5


# ---------------------------------------------------------------- work done in one child process
def _direct_logprobs(model, sequences: list[list[int]]) -> list[list[float]]:
    """log p(x_t | x_<t), t >= 1: one full forward per sequence, torch.log_softmax in float64."""
    import torch

    out = []
    with torch.no_grad():
        for ids in sequences:
            x = torch.tensor([ids])
            logits = model(x, torch.arange(len(ids))[None], None)
            out.append(torch.log_softmax(logits.double(), dim=-1)[0, :-1].gather(-1, x[0, 1:, None])[:, 0].tolist())
    return out


def _hand_built_model(ckpt_dir: str):
    """The checkpoint's GPTModel built and loaded without the scoring module."""
    import torch
    from megatron.core import dist_checkpointing

    from megatron_midtrain.config.schema import ModelConfig, ParallelConfig
    from megatron_midtrain.model.builder import build_gpt_stage, build_transformer_config
    from megatron_midtrain.training.checkpoint import read_meta, resolve_checkpoint_dir

    path = resolve_checkpoint_dir(ckpt_dir)
    meta = read_meta(path)
    model_cfg = ModelConfig(**meta["model_config"])
    model = build_gpt_stage(model_cfg, build_transformer_config(model_cfg, ParallelConfig(), torch.float32), 128, False)
    model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, path)["model"])
    return model.eval(), meta


def _prepare(dir_a: str, dir_b: str) -> dict:
    """Train both checkpoints, then compute every expected value the tests compare against."""
    from megatron_midtrain.data.tokenizer import load_tokenizer
    from megatron_midtrain.eval.checkpoint_logprobs import ensure_single_process_parallel_state, load_checkpoint_logprobs, plan_windows
    from megatron_midtrain.testing.runs import train_and_report

    train_and_report([f"run.dir={dir_a}", "train.max_steps=2"])
    train_and_report([f"run.dir={dir_b}", "train.max_steps=4", "run.seed=7", "optimizer.lr=1e-2"])
    ensure_single_process_parallel_state()
    (model_a, meta), (model_b, _) = _hand_built_model(dir_a), _hand_built_model(dir_b)
    tok = load_tokenizer(meta["tokenizer_path"])
    text_ids = [tok.tokenize(t) for t in TEXTS]
    corpus_ids = [tok.tokenize(t) + [tok.eod] for t in CORPUS]
    out = {
        "base": dir_a, "ref": dir_b, "tokenizer": meta["tokenizer_path"], "text_ids": text_ids, "corpus_ids": corpus_ids,
        "texts_base": _direct_logprobs(model_a, text_ids), "texts_ref": _direct_logprobs(model_b, text_ids),
        # the long corpus document exceeds the context: only the short ones have a full-prefix reference
        "corpus_base": _direct_logprobs(model_a, corpus_ids[:-1]), "corpus_ref": _direct_logprobs(model_b, corpus_ids[:-1]),
    }
    # Windowed scoring: the scoring model with a tiny window vs the same windows run by hand.
    ids = tok.tokenize(TEXTS[0] + " " + TEXTS[2])
    scorer = load_checkpoint_logprobs(dir_a)
    out["window_ids"] = ids
    out["window_full"] = scorer.token_logprobs(ids)
    scorer.window, scorer.stride = WINDOW, STRIDE
    out["window_scored"] = scorer.token_logprobs(ids)
    expected = [None] * (len(ids) - 1)
    for a, b, first in plan_windows(len(ids), WINDOW, STRIDE):
        lp = _direct_logprobs(model_a, [ids[a:b]])[0]
        for t in range(first, b):
            expected[t - 1] = lp[t - a - 1]
    out["window_expected"] = expected
    return out


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return run_distributed(_prepare, 1, str(tmp_path_factory.mktemp("base")), str(tmp_path_factory.mktemp("ref")))[0]


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("texts") / "texts.jsonl"
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS))
    return path


# ---------------------------------------------------------------- token_delta_report
def test_token_delta_report_matches_direct_logprobs(world, texts_file, tmp_path):
    base, ref = world["base"], world["ref"]
    proc = _run_tool("token_delta_report", "--base", base, "--ref", ref, "--input", texts_file,
                     "--json-key", "body", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scored 3/3 docs" in proc.stderr

    docs = [{"tokens": json.loads(line)} for line in (tmp_path / "tokens.jsonl").read_text().splitlines()]
    ids = world["text_ids"]
    assert [len(d["tokens"]) for d in docs] == [len(i) for i in ids]
    assert [[t["id"] for t in d["tokens"]] for d in docs] == ids
    # the token texts rebuild each document exactly (byte-fallback characters included)
    assert ["".join(t["token"] for t in d["tokens"]) for d in docs] == TEXTS

    for d, exp_b, exp_r in zip(docs, world["texts_base"], world["texts_ref"]):
        first, rest = d["tokens"][0], d["tokens"][1:]
        assert first["logp_base"] is None and first["remit_weight"] is None
        np.testing.assert_allclose([t["logp_base"] for t in rest], exp_b, atol=1e-5, rtol=0)
        np.testing.assert_allclose([t["logp_ref"] for t in rest], exp_r, atol=1e-5, rtol=0)
        delta = np.array([t["delta"] for t in rest])
        np.testing.assert_allclose(delta, np.array(exp_r) - np.array(exp_b), atol=2e-5, rtol=0)
        # ReMiT weights: clip(2 sigmoid(delta - mean delta), 0.8, 1.2) over the document
        centred = delta - delta.mean()
        expected_w = np.clip(2.0 / (1.0 + np.exp(-centred)), 0.8, 1.2)
        np.testing.assert_allclose([t["remit_weight"] for t in rest], expected_w, atol=1e-5, rtol=0)
    assert any(t["remit_weight"] > 1.0 for d in docs for t in d["tokens"][1:])  # the models really differ

    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("<span style=") == sum(len(i) for i in ids)
    body = page.split("<body>")[1]
    assert "&lt;" in body and "&gt;" in body and "&amp;" in body and "<b>" not in body  # token text is escaped
    assert "rgba(37,99,235" in page and "rgba(220,38,38" in page  # both colours used
    assert "<script" not in page and "http" not in body  # self-contained


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs a headless Chromium (apt-get install chromium)")
def test_token_delta_report_renders_in_headless_chromium(world, texts_file, tmp_path):
    proc = _run_tool("token_delta_report", "--base", world["base"], "--ref", world["ref"], "--input", texts_file,
                     "--json-key", "body", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    png = tmp_path / "report.png"
    shot = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1000,600",
                           f"--screenshot={png}", (tmp_path / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000  # a real, non-blank render


def test_identical_models_give_zero_delta_and_unit_weights(world, texts_file, tmp_path):
    base = world["base"]
    proc = _run_tool("token_delta_report", "--base", base, "--ref", base, "--input", texts_file,
                     "--json-key", "body", "--out", tmp_path, "--max-docs", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    docs = [{"tokens": json.loads(line)} for line in (tmp_path / "tokens.jsonl").read_text().splitlines()]
    assert len(docs) == 2
    scored = [t for d in docs for t in d["tokens"][1:]]
    assert scored and all(t["delta"] == 0.0 and t["remit_weight"] == 1.0 for t in scored)


def test_window_plan_scores_every_token_once():
    from megatron_midtrain.eval.checkpoint_logprobs import plan_windows

    for n in range(30):
        for window in (2, 5, 8):
            for stride in range(1, window):
                plan = plan_windows(n, window, stride)
                assert [t for a, b, first in plan for t in range(first, b)] == list(range(1, n)), (n, window, stride)
                assert all(b - a <= window and a < first <= b for a, b, first in plan)


def test_windowed_scoring_matches_windows_run_by_hand(world):
    n = len(world["window_ids"])
    assert n > 3 * WINDOW and len(world["window_full"]) == len(world["window_scored"]) == n - 1
    np.testing.assert_allclose(world["window_scored"], world["window_expected"], atol=1e-5, rtol=0)
    # the first window sees the full prefix; later tokens see a truncated one (so they differ)
    np.testing.assert_allclose(world["window_scored"][: WINDOW - 1], world["window_full"][: WINDOW - 1], atol=1e-5, rtol=0)
    assert not np.allclose(world["window_scored"], world["window_full"], atol=1e-3)


# ---------------------------------------------------------------- select_miniplm
def test_selection_rounding_and_ties():
    tool = _load_tool("select_miniplm")
    assert tool.num_to_keep(0.5, 9) == 5  # round half up (Python's round(4.5) would give 4)
    assert tool.num_to_keep(0.8, 10) == 8 and tool.num_to_keep(0.8, 3) == 2 and tool.num_to_keep(1.0, 7) == 7
    assert tool.select_top([0.1, 0.5, 0.5, None, 0.5, -1.0], 3) == [1, 2, 4]
    assert tool.select_top([0.1, 0.5, 0.5, None, 0.5, -1.0], 2) == [1, 2]  # ties: lower index first
    assert tool.select_top([0.1, None, -1.0], 3) == [0, 1, 2]  # unscored ranks last


def test_select_miniplm_keeps_top_documents(world, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_midtrain.data.indexing import index_texts

    teacher, small = world["ref"], world["base"]
    index_texts(CORPUS, tmp_path / "in", world["tokenizer"], log=None)
    docs = world["corpus_ids"]
    assert len(docs[-1]) > 1024  # longer than the context: scored in windows

    out = tmp_path / "sel" / "out"
    proc = _run_tool("select_miniplm", "--teacher", teacher, "--small-ref", small, "--input", tmp_path / "in",
                     "--output-prefix", out, "--keep", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "docs/s" in proc.stderr

    rows = [json.loads(line) for line in Path(f"{out}.scores.jsonl").read_text().splitlines()]
    summary = json.loads(Path(f"{out}.selection.json").read_text())
    assert summary["n_docs"] == 9 and summary["n_keep"] == 5  # floor(0.5 * 9 + 0.5)
    scores = [r["score"] for r in rows]
    order = sorted(range(9), key=lambda i: (-scores[i], i))
    kept = sorted(order[:5])
    assert [r["doc"] for r in rows if r["kept"]] == kept
    assert summary["threshold"] == min(scores[i] for i in kept)

    # scores = mean(logp_teacher - logp_small) over tokens after the first, computed independently
    # (the long document is skipped here: it is only scorable in windows)
    lp_t, lp_s = world["corpus_ref"], world["corpus_base"]
    for i in range(8):
        assert scores[i] == pytest.approx(float(np.mean(np.array(lp_t[i]) - np.array(lp_s[i]))), abs=1e-5)
    assert rows[-1]["tokens"] == len(docs[-1]) and scores[-1] is not None

    ds = IndexedDataset(str(out))
    assert len(ds.document_indices) - 1 == 5
    assert [ds[i].tolist() for i in range(len(ds))] == [docs[i] for i in kept]
    assert not [p for p in os.listdir(out.parent) if ".tmp" in p]


# ---------------------------------------------------------------- refusals
def test_other_tokenizer_is_refused(world, texts_file, tmp_path):
    base, ref = world["base"], world["ref"]
    src = next(Path(ref).glob("checkpoints/iter_*"))
    fake = tmp_path / "fake_ckpt"
    shutil.copytree(src, fake)
    meta = json.loads((fake / "meta.json").read_text())
    meta["tokenizer"] = "SentencePieceTokenizer:2048:0000000000000000"
    (fake / "meta.json").write_text(json.dumps(meta))
    proc = _run_tool("token_delta_report", "--base", base, "--ref", fake, "--input", texts_file,
                     "--json-key", "body", "--out", tmp_path / "out")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert str(fake) in lines[0] and "iter_0000002" in lines[0] and "0000000000000000" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing_file", "unknown_key", "no_meta"])
def test_bad_input_gets_one_error_line(case, world, texts_file, tmp_path):
    base = world["base"]
    args = {"--base": base, "--ref": base, "--input": texts_file, "--json-key": "body", "--out": tmp_path / "o"}
    if case == "missing_file":
        args["--input"] = tmp_path / "nope.jsonl"
    elif case == "unknown_key":
        args["--json-key"] = "content"
    else:
        (tmp_path / "empty_ckpt").mkdir()
        args["--ref"] = tmp_path / "empty_ckpt"
    proc = _run_tool("token_delta_report", *[x for kv in args.items() for x in kv])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    expected = {"missing_file": "nope.jsonl", "unknown_key": "'content'", "no_meta": "empty_ckpt"}[case]
    assert expected in lines[0]
