"""Tests for the data pipeline: corpus, tokenizers, indexing, validation, demo assets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

from megatron_midtrain.data import corpus
from megatron_midtrain.data.indexing import build_indexed_dataset, index_texts, validate_indexed_dataset
from megatron_midtrain.data.tokenizer import load_tokenizer, train_sentencepiece
from megatron_midtrain.errors import UserError

warnings.filterwarnings("ignore", message="Transformer Engine and Apex")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_RE = re.compile(r"Step \d+: (-?\d+) ([-+*/]) (-?\d+) = (-?\d+)\.")


def _write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")


@pytest.fixture(scope="module")
def small_docs():
    return corpus.generate_corpus(seed=7, num_prose=200, num_math=200)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, small_docs):
    d = tmp_path_factory.mktemp("sp")
    return train_sentencepiece((x["text"] for x in small_docs), d / "tok", vocab_size=512)


@pytest.fixture(scope="module")
def jsonl_input(tmp_path_factory, small_docs):
    path = tmp_path_factory.mktemp("in") / "docs.jsonl"
    _write_jsonl(path, small_docs)
    return str(path)


def _one_line_user_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    for n in needles:
        assert n in msg, msg
    return msg


# ---------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_math_checks_out():
    a = corpus.generate_corpus(seed=3, num_prose=50, num_math=300)
    b = corpus.generate_corpus(seed=3, num_prose=50, num_math=300)
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(a) != json.dumps(corpus.generate_corpus(seed=4, num_prose=50, num_math=300))
    assert [d["kind"] for d in a] == ["prose"] * 50 + ["math"] * 300
    for d in a[:50]:
        assert len(d["text"]) > 100 and d["text"].count(".") >= 4
    for d in a[50:]:
        steps = STEP_RE.findall(d["text"])
        assert len(steps) >= 2
        prev = None
        for x, op, y, z in steps:
            x, y, z = int(x), int(y), int(z)
            expected = {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op]
            if op == "/":
                assert x % y == 0
            assert expected == z, d["text"]
            if prev is not None:
                assert prev in (x, y)  # each step uses the previous result
            prev = z
        assert corpus.extract_final_answer(d["text"]) == str(d["answer"]) == str(prev)
        prompt, completion = corpus.split_question_answer(d["text"])
        assert prompt == corpus.format_math_prompt(d["question"])
        assert corpus.check_answer(completion, d["answer"])
        assert not corpus.check_answer(completion, d["answer"] + 1)
    assert corpus.extract_final_answer("no answer here") is None


def test_default_corpus_size_and_held_out_eval():
    docs = corpus.generate_corpus()
    mb = sum(len(d["text"].encode()) for d in docs) / 1e6
    assert 1.5 <= mb <= 3.0
    train_q = {d["question"] for d in docs if d["kind"] == "math"}
    ev = corpus.generate_math_eval(200, exclude_questions=train_q)
    assert len(ev) == 200 and not ({e["question"] for e in ev} & train_q)
    assert all(e["prompt"].endswith(corpus.MATH_ANSWER_PREFIX) for e in ev)


# ---------------------------------------------------------------------------- tokenizers


def test_sentencepiece_round_trip_and_determinism(tmp_path, sp_model, small_docs):
    tok = load_tokenizer(sp_model)
    assert tok.vocab_size == 512
    assert (tok.pad, tok.bos, tok.eod) == (0, 1, 2)
    assert tok.inv_vocab[tok.eod] == "</s>" and tok.vocab["</s>"] == 2
    for d in small_docs[:50] + small_docs[-50:]:
        ids = tok.tokenize(d["text"])
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == d["text"]
    assert tok.detokenize(tok.tokenize("unseen ünïcode ✓\n  x")) == "unseen ünïcode ✓\n  x"
    # prompt + completion tokenized separately == whole document tokenized (no dummy prefix)
    math = [d for d in small_docs if d["kind"] == "math"][0]
    p, c = corpus.split_question_answer(math["text"])
    assert tok.tokenize(p) + tok.tokenize(c) == tok.tokenize(math["text"])
    # same input -> same model
    again = load_tokenizer(train_sentencepiece((x["text"] for x in small_docs), tmp_path / "t2", 512))
    assert again.vocab == tok.vocab
    # picklable (DataLoader workers)
    import pickle

    assert pickle.loads(pickle.dumps(tok)).tokenize("hello world") == tok.tokenize("hello world")


def test_load_tokenizer_bad_paths(tmp_path):
    with pytest.raises(UserError) as e:
        load_tokenizer(tmp_path / "nope.model")
    _one_line_user_error(e, str(tmp_path / "nope.model"))
    with pytest.raises(UserError) as e:
        load_tokenizer(tmp_path)  # empty folder
    _one_line_user_error(e, str(tmp_path))
    bad = tmp_path / "garbage.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError) as e:
        load_tokenizer(bad)
    _one_line_user_error(e, str(bad))


# ---------------------------------------------------------------------------- indexing


def _read_back(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))], ds


def test_indexing_matches_tokenizer(tmp_path, sp_model, jsonl_input, small_docs):
    tok = load_tokenizer(sp_model)
    summary = build_indexed_dataset(jsonl_input, tmp_path / "out", sp_model, workers=1, log=None)
    seqs, ds = _read_back(tmp_path / "out")
    expected = [tok.tokenize(d["text"]) + [tok.eod] for d in small_docs]
    assert seqs == expected
    assert ds.index.dtype == np.uint16
    assert len(ds.document_indices) == len(small_docs) + 1
    assert summary["docs"] == len(small_docs) and summary["tokens"] == sum(map(len, expected))
    for key in ("docs_per_s", "mb_per_s", "seconds", "bytes"):
        assert summary[key] > 0
    info = validate_indexed_dataset(tmp_path / "out", vocab_size=tok.vocab_size)
    assert info["documents"] == len(small_docs) and info["max_token_id"] < tok.vocab_size
    assert sorted(os.listdir(tmp_path)) == ["out.bin", "out.idx"]  # no temp files left

    # no EOD, plain text input (one doc per line), in-memory texts
    txt = tmp_path / "docs.txt"
    txt.write_text("first doc here\n\nsecond one\n")
    build_indexed_dataset(str(txt), tmp_path / "txt", sp_model, append_eod=False, log=None)
    assert _read_back(tmp_path / "txt")[0] == [tok.tokenize("first doc here"), tok.tokenize("second one")]
    index_texts(["a b", "c"], tmp_path / "mem", sp_model, log=None)
    assert _read_back(tmp_path / "mem")[0] == [tok.tokenize("a b") + [2], tok.tokenize("c") + [2]]


def test_two_workers_equal_one_worker(tmp_path, sp_model, jsonl_input):
    build_indexed_dataset(jsonl_input, tmp_path / "w1", sp_model, workers=1, chunk_docs=16, log=None)
    build_indexed_dataset([jsonl_input, jsonl_input], tmp_path / "w2x", sp_model, workers=2,
                          chunk_docs=16, log=None)
    s = build_indexed_dataset(jsonl_input, tmp_path / "w2", sp_model, workers=2, chunk_docs=16, log=None)
    assert s["workers"] == 2
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()
    assert (tmp_path / "w2x.bin").read_bytes() == (tmp_path / "w1.bin").read_bytes() * 2


def test_bad_json_leaves_no_output(tmp_path, sp_model, small_docs):
    path = tmp_path / "bad.jsonl"
    _write_jsonl(path, small_docs[:100])
    with open(path, "a") as f:
        f.write("{not json\n")
    for workers in (1, 2):
        with pytest.raises(UserError) as e:
            build_indexed_dataset(str(path), tmp_path / "out", sp_model, workers=workers,
                                  chunk_docs=16, log=None)
        _one_line_user_error(e, "bad.jsonl:101")
    with pytest.raises(UserError) as e:
        build_indexed_dataset(str(path), tmp_path / "out", sp_model, json_key="body", log=None)
    _one_line_user_error(e, "'body'")
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"fine line\n\xff\xfe broken\n")
    with pytest.raises(UserError) as e:
        build_indexed_dataset(str(bad_utf8), tmp_path / "out", sp_model, workers=2, log=None)
    _one_line_user_error(e, "bad.txt:2", "UTF-8")
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "bad.txt"]


def _run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_cli_end_to_end(tmp_path, sp_model, jsonl_input):
    r = _run_cli("--input", jsonl_input, "--tokenizer", str(sp_model), "--output-prefix",
                 str(tmp_path / "cli"), "--workers", "2", "--log-interval-s", "0")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["docs"] == 400 and summary["workers"] == 2
    assert "docs/s" in lines[-2] and "MB/s" in lines[-2]
    assert "indexing:" in r.stderr  # progress lines
    build_indexed_dataset(jsonl_input, tmp_path / "lib", sp_model, workers=1, log=None)
    assert (tmp_path / "cli.bin").read_bytes() == (tmp_path / "lib.bin").read_bytes()
    assert (tmp_path / "cli.idx").read_bytes() == (tmp_path / "lib.idx").read_bytes()


def test_cli_missing_input_is_one_error_line(tmp_path, sp_model):
    out = tmp_path / "out"
    out.mkdir()
    r = _run_cli("--input", str(tmp_path / "missing.jsonl"), "--tokenizer", str(sp_model),
                 "--output-prefix", str(out / "x"))
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "missing.jsonl" in errors[0]
    assert "Traceback" not in r.stderr
    assert os.listdir(out) == []
    r = _run_cli("--input", str(sp_model), "--tokenizer", str(tmp_path / "nope.model"),
                 "--output-prefix", str(out / "x"))
    assert r.returncode == 2 and "error:" in r.stderr and "nope.model" in r.stderr
    assert os.listdir(out) == []


# ---------------------------------------------------------------------------- validation


def test_validate_rejects_broken_datasets(tmp_path, sp_model, jsonl_input):
    build_indexed_dataset(jsonl_input, tmp_path / "good", sp_model, workers=1, log=None)
    good_bin = (tmp_path / "good.bin").read_bytes()
    good_idx = (tmp_path / "good.idx").read_bytes()
    validate_indexed_dataset(tmp_path / "good", vocab_size=512)

    def make(name, bin_bytes, idx_bytes):
        if bin_bytes is not None:
            (tmp_path / f"{name}.bin").write_bytes(bin_bytes)
        if idx_bytes is not None:
            (tmp_path / f"{name}.idx").write_bytes(idx_bytes)
        return tmp_path / name

    cases = {
        "missing .idx": (make("noidx", good_bin, None), None, "noidx.idx"),
        "missing .bin": (make("nobin", None, good_idx), None, "nobin.bin"),
        "truncated .bin": (make("shortbin", good_bin[:-10], good_idx), None, "shortbin.bin"),
        "truncated .idx": (make("shortidx", good_bin, good_idx[:-100]), None, "shortidx.idx"),
        "tiny .idx": (make("tinyidx", good_bin, good_idx[:20]), None, "tinyidx.idx"),
        "vocab too large": (tmp_path / "good", 100, "vocab size is 100"),
    }
    for what, (prefix, vocab, needle) in cases.items():
        with pytest.raises(UserError) as e:
            validate_indexed_dataset(prefix, vocab_size=vocab)
        _one_line_user_error(e, needle)


# ---------------------------------------------------------------------------- HF tokenizer


def test_hf_tokenizer_json_backend(tmp_path, small_docs):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "[UNK]"], vocab_size=5000)
    hf.train_from_iterator([d["text"] for d in small_docs], trainer=trainer)
    folder = tmp_path / "hf"
    folder.mkdir()
    hf.save(str(folder / "tokenizer.json"))

    tok = load_tokenizer(folder)
    assert type(tok).__name__ == "HFTokenizer"
    assert tok.eod == hf.token_to_id("</s>") and tok.pad == hf.token_to_id("<pad>")
    assert tok.vocab_size == hf.get_vocab_size()
    ids = tok.tokenize("Tom has 3 boxes.")
    assert ids and tok.detokenize(ids).replace(" ", "") == "Tomhas3boxes."

    inp = tmp_path / "in.jsonl"
    _write_jsonl(inp, small_docs[:120])
    build_indexed_dataset(str(inp), tmp_path / "hf_out", str(folder / "tokenizer.json"), workers=2,
                          chunk_docs=32, log=None)
    seqs, _ = _read_back(tmp_path / "hf_out")
    assert seqs == [tok.tokenize(d["text"]) + [tok.eod] for d in small_docs[:120]]
    validate_indexed_dataset(tmp_path / "hf_out", vocab_size=tok.vocab_size)


# ---------------------------------------------------------------------------- demo assets + GPTDataset


def test_demo_assets_and_gpt_dataset(tmp_path, monkeypatch):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_midtrain.data import demo

    monkeypatch.setenv("MIDTRAIN_CACHE", str(tmp_path / "envcache"))
    assert demo.default_cache_dir() == str(tmp_path / "envcache")

    cache = tmp_path / "cache"
    assets = demo.ensure_demo_assets(cache)
    assert assets.vocab_size == 2048 and assets.root.startswith(str(cache))
    assert [p for p in os.listdir(cache) if ".tmp-" in p] == []  # temp build dir renamed away
    again = demo.ensure_demo_assets(cache)
    assert again == assets
    tok = load_tokenizer(assets.tokenizer_path)
    assert tok.vocab_size == assets.vocab_size
    for prefix in (assets.prose_prefix, assets.math_prefix):
        validate_indexed_dataset(prefix, vocab_size=assets.vocab_size)

    train_q = set()
    with open(assets.corpus_path) as f:
        for line in f:
            d = json.loads(line)
            if d["kind"] == "math":
                train_q.add(d["question"])
    evals = demo.load_math_eval(assets)
    assert len(evals) == demo.DEFAULT_NUM_MATH_EVAL and not ({e["question"] for e in evals} & train_q)

    seq = 64
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=seq,
        blend=([assets.prose_prefix, assets.math_prefix], [0.7, 0.3]),
        split="98,2,0",
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=None,  # BlendedDataset with a cache dir calls torch.distributed.get_rank()
        mmap_bin_files=True,
    )
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [500, 20, 0], lambda: True, config).build()
    assert len(train) == 500 and len(valid) == 20 and test is None
    ids = set()
    for i in range(0, 500, 50):
        s = train[i]
        assert s["tokens"].shape == (seq,) and s["labels"].shape == (seq,)
        assert int(s["tokens"].max()) < assets.vocab_size
        assert s["loss_mask"].shape == (seq,)
        ids.add(int(s["dataset_id"]))
    assert ids == {0, 1}  # both datasets are sampled


def test_demo_concurrent_builds_share_one_result(tmp_path):
    from megatron_midtrain.data import demo

    kwargs = dict(vocab_size=400, num_prose=100, num_math=100, num_math_eval=20)
    results, errors = [], []

    def build():
        try:
            results.append(demo.ensure_demo_assets(tmp_path, **kwargs))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    dirs = [p for p in os.listdir(tmp_path) if not p.endswith(".lock")]
    assert dirs == [os.path.basename(results[0].root)]
    # different parameters -> a different directory
    other = demo.ensure_demo_assets(tmp_path, **{**kwargs, "seed": 99})
    assert other.root != results[0].root
