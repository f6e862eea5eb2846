"""tools/convert_checkpoint.py and tools/logprobs.py from the command line: bad input gets one
``error: ...; fix: ...`` line, exit code 2 and nothing written; HF tokenizer folders are carried
into the checkpoint (the reference-tokenizer check and tools/preprocess_data.py use them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {  # a tiny Llama-shaped config.json
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
}


def run_tool(tool: str, *args, cwd=None):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", tool), *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=cwd)


class _Done:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_inprocess(main, capsys, *args):
    """A tool's main() in this process, for inputs refused before any process group exists."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return _Done(code, out.out, out.err)


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "; fix: " in lines[0], proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def no_partial_left(parent: str) -> bool:
    return not [n for n in os.listdir(parent) if ".partial-" in n]


def make_tokenizer(folder: str, vocab: int = 256) -> str:
    """A byte-level BPE tokenizer.json trained on a few sentences, with <|endoftext|> as EOD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the cat sat on the mat. " * 4, "a dog ate the bone; the end."] * 8, trainer=trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}, fh)
    return folder


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    import torch

    from megatron_midtrain.convert.synthetic import write_synthetic_hf

    folder = str(tmp_path_factory.mktemp("tiny_hf") / "llama")
    write_synthetic_hf(folder, TINY, std=0.5, dtype=torch.float32)
    make_tokenizer(folder)
    return folder


def test_bad_inputs_one_line_nothing_written(tmp_path, tiny_hf, capsys):
    from safetensors.torch import load_file, save_file

    from tools.convert_checkpoint import main as convert

    out = str(tmp_path / "out")
    # The command-line contract once as a real process; the rest in-process (same code path).
    assert_user_error(run_tool("convert_checkpoint.py", "import-hf", "--hf-dir", str(tmp_path / "nope"), "--out", out),
                      "does not exist")

    def tool(*args):
        return run_inprocess(convert, capsys, *args)

    # Unsupported family: the error lists the supported ones.
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    assert_user_error(tool("import-hf", "--hf-dir", str(gpt2), "--out", out),
                      "'gpt2' is not supported", "llama, olmo2, qwen2, qwen3, smollm3")
    # config.json and weights disagree: shape mismatch named with the tensor.
    bad_shape = tmp_path / "bad_shape"
    bad_shape.mkdir()
    for name in os.listdir(tiny_hf):
        os.link(os.path.join(tiny_hf, name), bad_shape / name)
    (bad_shape / "config.json").unlink()
    (bad_shape / "config.json").write_text(json.dumps(dict(TINY, intermediate_size=48)))
    assert_user_error(tool("import-hf", "--hf-dir", str(bad_shape), "--out", out),
                      "has shape", "mlp")
    # A missing tensor.
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "config.json").write_text(json.dumps(TINY))
    tensors = load_file(os.path.join(tiny_hf, "model.safetensors"))
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, str(missing / "model.safetensors"))
    assert_user_error(tool("import-hf", "--hf-dir", str(missing), "--out", out),
                      "missing", "v_proj")
    # Unsupported option inside a supported family.
    swa = tmp_path / "swa"
    swa.mkdir()
    (swa / "config.json").write_text(json.dumps(dict(TINY, model_type="qwen2", use_sliding_window=True)))
    assert_user_error(tool("import-hf", "--hf-dir", str(swa), "--out", out),
                      "use_sliding_window")
    # A layout the model cannot split into.
    assert_user_error(tool("import-hf", "--hf-dir", tiny_hf, "--out", out, "--tp", "3"),
                      "TP=3")
    assert not os.path.exists(out) and no_partial_left(str(tmp_path))


def test_import_tokenizer_export_and_logprobs_cli(tmp_path, tiny_hf, capsys):
    from megatron_midtrain.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from megatron_midtrain.eval.checkpoint_logprobs import check_same_tokenizer, peek_checkpoint

    ckpt = str(tmp_path / "ckpt")
    proc = run_tool("convert_checkpoint.py", "import-hf", "--hf-dir", tiny_hf, "--out", ckpt, "--tp", "2", "--pp", "2")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["family"] == "llama" and summary["tensors"] == 3 + 2 * 9
    info = peek_checkpoint(ckpt)
    # The HF tokenizer folder is carried along and fingerprinted like a training tokenizer.
    assert info.tokenizer_id == tokenizer_fingerprint(load_tokenizer(tiny_hf))
    assert os.path.isfile(info.meta["tokenizer_path"]) and info.meta["layout"] == [2, 2, 1]
    with open(os.path.join(ckpt, "model.yaml")) as fh:
        assert "vocab_size: 256" in fh.read()
    # A reference with another tokenizer is refused, the same one accepted.
    other = make_tokenizer(str(tmp_path / "other_tok"), vocab=270)
    fake = type("C", (), {"path": "other", "tokenizer_id": tokenizer_fingerprint(load_tokenizer(other))})()
    check_same_tokenizer([info, info])
    with pytest.raises(Exception, match="uses tokenizer"):
        check_same_tokenizer([info, fake])
    # tools/preprocess_data.py accepts the checkpoint's (HF) tokenizer folder.
    text = tmp_path / "docs.jsonl"
    text.write_text("\n".join(json.dumps({"text": "the cat sat on the mat"}) for _ in range(5)) + "\n")
    prep = run_tool("preprocess_data.py", "--input", str(text), "--tokenizer", os.path.dirname(info.meta["tokenizer_path"]),
                    "--output-prefix", str(tmp_path / "docs"), "--workers", "1")
    assert prep.returncode == 0, prep.stderr
    assert json.loads(prep.stdout.strip().splitlines()[-1])["docs"] == 5
    # The output exists now: a second import is refused, the first is untouched.
    from tools.convert_checkpoint import main as convert

    again = run_inprocess(convert, capsys, "import-hf", "--hf-dir", tiny_hf, "--out", ckpt)
    assert_user_error(again, "already exists")
    # logprobs CLI (single process): one output line per input line, n - 1 values each.
    tokens = tmp_path / "tokens.jsonl"
    tokens.write_text(json.dumps({"tokens": [5, 9, 200, 3]}) + "\n" + json.dumps({"tokens": [7, 7]}) + "\n")
    out = tmp_path / "lp.jsonl"
    lp = run_tool("logprobs.py", "--checkpoint", ckpt, "--input", str(tokens), "--output", str(out), "--greedy")
    assert lp.returncode == 0, lp.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(r["logprobs"]) for r in rows] == [3, 1] and all(v < 0 for r in rows for v in r["logprobs"])
    assert [len(r["greedy"]) for r in rows] == [3, 1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"tokens": [1, 999]}) + "\n")
    from tools.logprobs import main as logprobs

    assert_user_error(run_inprocess(logprobs, capsys, "--checkpoint", ckpt, "--input", str(bad), "--output", str(tmp_path / "x")),
                      "outside the vocabulary")
    # export-hf: a family that cannot express the model is refused; the right one works.
    assert_user_error(run_inprocess(convert, capsys, "export-hf", "--checkpoint", ckpt, "--out", str(tmp_path / "e"),
                                    "--family", "olmo2"), "cannot be written as olmo2")
    assert_user_error(run_inprocess(convert, capsys, "export-hf", "--checkpoint", ckpt, "--out", str(tmp_path / "e"),
                                    "--family", "gpt2"), "not supported")
    assert not os.path.exists(tmp_path / "e") and no_partial_left(str(tmp_path))
