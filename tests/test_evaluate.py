"""tools/evaluate.py end to end on a tiny local lm-eval task (YAML + local JSON files, no
network): a multiple-choice task (log-likelihoods) and a generation task (greedy decoding).
The in-process megatron backend and the Hugging Face export backend must agree exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_convert_cli import make_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MC_YAML = """task: tiny_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
test_split: test
fewshot_split: train
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN_YAML = """task: tiny_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_task(folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    docs = [
        {"question": "the cat sat on the", "choices": [" mat", " bone", " dog"], "answer": 0},
        {"question": "a dog ate the", "choices": [" bone", " cat", " mat"], "answer": 0},
        {"question": "the end of the", "choices": [" dog", " end", " cat"], "answer": 1},
        {"question": "the cat", "choices": [" sat", " ate", " the"], "answer": 0},
        {"question": "a dog", "choices": [" sat", " ate", " mat"], "answer": 1},
    ]
    for split, rows in (("train", docs[:2]), ("test", docs)):
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    gen = [{"question": "the cat sat on", "answer": " the mat"}, {"question": "a dog ate", "answer": " the bone"}]
    with open(os.path.join(folder, "gen.jsonl"), "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in gen)
    with open(os.path.join(folder, "tiny_local_mc.yaml"), "w") as fh:
        fh.write(MC_YAML.format(train=os.path.join(folder, "train.jsonl"), test=os.path.join(folder, "test.jsonl")))
    with open(os.path.join(folder, "tiny_local_gen.yaml"), "w") as fh:
        fh.write(GEN_YAML.format(test=os.path.join(folder, "gen.jsonl")))
    return folder


def run_tool(tool: str, *args, env=None):
    env = dict(os.environ, PYTHONPATH=REPO, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", tool), *args], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("lm_eval")
    tf = pytest.importorskip("transformers")
    import torch

    root = tmp_path_factory.mktemp("evaluate")
    hf = str(root / "hf")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, eos_token_id=0,
                            bos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(hf)
    make_tokenizer(hf)  # <|endoftext|> is id 0: EOD, no BOS
    ckpt = str(root / "ckpt")
    proc = run_tool("convert_checkpoint.py", "import-hf", "--hf-dir", hf, "--out", ckpt)
    assert proc.returncode == 0, proc.stderr
    return ckpt, write_task(str(root / "tasks")), root


def _evaluate(ckpt, tasks_dir, *extra):
    proc = run_tool("evaluate.py", "--checkpoint", ckpt, "--tasks", "tiny_local_mc,tiny_local_gen", "--include-path", tasks_dir,
                    "--bootstrap-iters", "0", *extra, env={"HF_DATASETS_CACHE": os.path.join(tasks_dir, "cache")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path = json.loads(proc.stdout.strip().splitlines()[-1])["results_path"]
    with open(path) as fh:
        return path, json.load(fh)


def test_evaluate_megatron_and_hf_backends_agree(checkpoint):
    ckpt, tasks, root = checkpoint
    path, mine = _evaluate(ckpt, tasks)
    assert os.path.dirname(path) == os.path.join(ckpt, "eval")  # an imported checkpoint is its own run dir
    _, theirs = _evaluate(ckpt, tasks, "--backend", "hf", "--output", str(root / "hf.json"))
    for results in (mine, theirs):
        assert set(results["results"]) == {"tiny_local_mc", "tiny_local_gen"}
        assert 0.0 <= results["results"]["tiny_local_mc"]["acc,none"] <= 1.0
        assert results["n-samples"]["tiny_local_mc"]["effective"] == 5
        assert results["n-samples"]["tiny_local_gen"]["effective"] == 2
    assert mine["megatron_midtrain"]["backend"] == "megatron" and theirs["megatron_midtrain"]["backend"] == "hf"
    for task, metric in (("tiny_local_mc", "acc,none"), ("tiny_local_gen", "exact_match,none")):
        assert mine["results"][task][metric] == theirs["results"][task][metric], (task, mine["results"], theirs["results"])


def test_unknown_task_is_refused(checkpoint):
    from lm_eval.tasks import TaskManager

    from megatron_midtrain.errors import UserError
    from megatron_midtrain.eval import harness

    _, tasks, _ = checkpoint
    local = TaskManager(include_path=tasks, include_defaults=False)
    harness.check_tasks(harness.resolve_tasks(["tiny_local_mc"], None), local)
    with pytest.raises(UserError, match=r"unknown lm-eval task\(s\): no_such_task_xyz"):
        harness.check_tasks(harness.resolve_tasks(["no_such_task_xyz", "tiny_local_mc"], None), local)


def test_remit_preset_tasks_exist_in_the_harness():
    lm_eval = pytest.importorskip("lm_eval")
    import re

    from megatron_midtrain.eval.presets import PRESETS

    specs = PRESETS["remit_fewshot"]
    assert [s.num_fewshot for s in specs] == [8, 4, 5, 3, 3, 0, 3, 3, 25, 5]  # appendix D.3
    # Each name is a task or group defined by a YAML of the installed harness (a text scan:
    # the harness's own index parses every task file and takes tens of seconds here).
    tasks_dir = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    wanted = {s.task for s in specs}
    found = set()
    for folder, _, files in os.walk(tasks_dir):
        for name in files:
            if name.endswith(".yaml"):
                with open(os.path.join(folder, name), errors="replace") as fh:
                    found.update(m.group(2) for m in re.finditer(r"^(task|group): *([\w.-]+) *$", fh.read(), re.M))
    assert wanted <= found, sorted(wanted - found)


def _train_with_hook(run_dir: str, tasks_dir: str) -> dict:
    from megatron_midtrain.testing.runs import train_and_report

    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=os.path.join(tasks_dir, "cache"))
    return train_and_report([f"run.dir={run_dir}", "train.max_steps=2", "parallel.tp=2", "lm_eval.tasks=[tiny_local_mc]",
                             f"lm_eval.include_path={tasks_dir}", "lm_eval.limit=3", "lm_eval.interval=0"])


def test_in_training_lm_eval_hook(tmp_path):
    """lm_eval.tasks during training (TP2: the harness's forward passes are collective)."""
    pytest.importorskip("lm_eval")
    from megatron_midtrain.testing.distributed import run_distributed

    tasks = write_task(str(tmp_path / "tasks"))
    report = run_distributed(_train_with_hook, 2, str(tmp_path / "run"), tasks, backend="gloo")[0]
    records = report["records"]
    assert [r["step"] for r in records] == [1, 2]
    assert "lm_eval/tiny_local_mc/acc" not in records[0]  # interval 0: only at the end
    assert 0.0 <= records[1]["lm_eval/tiny_local_mc/acc"] <= 1.0
    with open(tmp_path / "run" / "eval" / "lm_eval_step2.json") as fh:
        assert json.load(fh)["n-samples"]["tiny_local_mc"]["effective"] == 3
