"""Answer formats practitioners use (issue 14): ``answer_format=gsm8k`` / ``regex``,
``answer_normalize=numeric``, GSM8K-style reference answers, and one GRPO run on a GSM8K-style file."""

import json
from fractions import Fraction

import pytest

from megatron_midtrain.errors import UserError
from megatron_midtrain.rl.prompts import build_prompt
from megatron_midtrain.rl.rewards import (
    STATUS_CORRECT,
    STATUS_EMPTY,
    STATUS_MISSING,
    STATUS_WRONG,
    extract_answer,
    normalize_answer,
    numeric_value,
    reference_answer,
    score_exact_match,
    score_prefix_match,
)

GSM8K_ROWS = [
    {"prompt": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
               "How many clips did Natalia sell altogether in April and May?\n",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"prompt": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
               "How much did she earn?\n",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
               "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------- gsm8k
def test_gsm8k_extraction():
    assert extract_answer("48 + 24 = 72\n#### 72", "gsm8k") == " 72"
    assert extract_answer("#### 1,000", "gsm8k") == " 1,000"
    # the last "####" counts, to the end of its line
    assert extract_answer("#### 3 (first try)\nno, wait\n#### 4\nthanks", "gsm8k") == " 4"
    assert extract_answer("a #### 5 #### 6", "gsm8k") == " 6"
    assert extract_answer("#### 7\r\n", "gsm8k").strip() == "7"
    assert extract_answer("no marker, 72", "gsm8k") is None
    assert extract_answer("so\n####", "gsm8k") == ""
    assert extract_answer("so\n####\n72", "gsm8k") == ""  # the answer is on the marker's line


def test_reference_answer_of_a_gsm8k_solution():
    assert reference_answer(GSM8K_ROWS[0]["answer"]) == "72"
    assert reference_answer("x #### 1 then #### 2 \n") == "2"
    assert reference_answer("29") == "29" and reference_answer(29) == "29"  # no marker: unchanged
    assert reference_answer("  spaced  ") == "  spaced  "


@pytest.mark.parametrize("fmt,response", [
    ("answer_is", "The answer is 72."), ("answer_tag", "<answer>72</answer>"), ("boxed", "\\boxed{72}"),
    ("plain", "72"), ("gsm8k", "#### 72"),
])
def test_gsm8k_reference_works_for_every_format(fmt, response):
    assert score_exact_match(response, GSM8K_ROWS[0]["answer"], fmt).status == STATUS_CORRECT
    assert score_exact_match(response, "... #### 73", fmt).status == STATUS_WRONG


def test_gsm8k_grading_and_penalties():
    def grade(resp, target="72", normalize="none"):
        return score_exact_match(resp, target, "gsm8k", missing_penalty=-2.0, empty_penalty=-0.5, normalize=normalize)

    assert grade("24 + 48 = 72\n#### 72").status == STATUS_CORRECT
    assert grade("#### 71").status == STATUS_WRONG and grade("#### 71").reward == 0.0
    r = grade("I think 72")
    assert (r.status, r.reward, r.prediction) == (STATUS_MISSING, -2.0, None)
    r = grade("#### \n72")
    assert (r.status, r.reward, r.prediction) == (STATUS_EMPTY, -0.5, "")
    for normalize in ("none", "numeric"):
        assert grade("#### 1,000", "1000", normalize).correct
        assert grade("#### $5.", "5", normalize).correct
        assert grade("#### 72.0", "#### 72", normalize).correct
        assert grade("#### 3\n#### 4", "4", normalize).correct and not grade("#### 3\n#### 4", "3", normalize).correct
    assert score_exact_match("#### 72", 72, answer_format="gsm8k", normalize="numeric").reward == 1.0


# ---------------------------------------------------------------------------------- regex
def test_regex_extraction_takes_the_last_match():
    rx = r"Final answer: *(-?\d+)"
    assert extract_answer("Final answer: 3. Hmm, no. Final answer: 4", "regex", rx) == "4"
    assert extract_answer("no final answer here", "regex", rx) is None
    assert extract_answer("ANSWER=9", "regex", r"(?i)answer=(\d+)") == "9"  # inline flags
    assert extract_answer("x", "regex", r"(a)|x") == ""  # matched, group 1 not taken part: empty
    with pytest.raises(ValueError, match="needs answer_regex"):
        extract_answer("x", "regex")
    with pytest.raises(ValueError, match="no capture group"):
        extract_answer("x", "regex", r"x")


def test_regex_grading_and_penalties():
    rx = r"Answer: *(\S*)"
    ok = score_exact_match("Answer: 1,000", "1000", "regex", answer_regex=rx, normalize="numeric")
    assert ok.status == STATUS_CORRECT and ok.prediction == "1,000"
    assert score_exact_match("Answer: 9", "10", "regex", answer_regex=rx).status == STATUS_WRONG
    r = score_exact_match("I give up", "10", "regex", -3.0, -0.25, answer_regex=rx)
    assert (r.status, r.reward) == (STATUS_MISSING, -3.0)
    r = score_exact_match("Answer: ", "10", "regex", -3.0, -0.25, answer_regex=rx)
    assert (r.status, r.reward) == (STATUS_EMPTY, -0.25)
    # RMT's prefix match reads the same formats
    assert score_prefix_match("Answer: Paris", [" Paris", " is"], "regex", answer_regex=rx).reward == 1.0
    assert score_prefix_match("#### Paris is", [" Paris", " is"], "gsm8k").reward == 1.0
    assert score_prefix_match("Paris", [" Paris"], "gsm8k", missing_penalty=-4.0).status == STATUS_MISSING


# ---------------------------------------------------------------------------------- numeric
@pytest.mark.parametrize("a,b", [
    ("1,000", "1000"), ("$5", "5"), ("$5.", "5"), ("5.0", "5"), ("-3", "-3.00"), (" 72 ", "72.000"),
    ("1,234,567.50", "1234567.5"), ("\\$12", "12"), ("-$4", "-4"), ("\u22127", "-7"), ("0.5", "1/2"),
    ("1e3", "1000"), ("+2", "2"), ("abc.", "abc"), ("$ten", "ten"), ("a  b", "a b"),
])
def test_numeric_equal(a, b):
    assert normalize_answer(a, "numeric") == normalize_answer(b, "numeric"), (a, b)


@pytest.mark.parametrize("a,b", [
    ("1,5", "15"),  # a comma is only a thousands separator
    ("10,00", "1000"), ("5", "6"), ("0.1", "0.10000000000000001"),  # exact values, no float rounding
    ("72 apples", "72"), ("Paris", "paris"), ("-3", "3"),
])
def test_numeric_different(a, b):
    assert normalize_answer(a, "numeric") != normalize_answer(b, "numeric"), (a, b)


def test_numeric_value():
    assert numeric_value("$1,000.") == 1000 and isinstance(numeric_value("5.0"), Fraction)
    assert numeric_value("0.1") == Fraction(1, 10)
    for text in ("", ".", "$", "e5", "1/0", "1,00", "1.2.3", "five", "1 000"):
        assert numeric_value(text) is None, text
    with pytest.raises(ValueError, match="normalisation"):
        normalize_answer("1", "fuzzy")


def test_normalize_none_is_unchanged():
    """The default keeps the comparison that existed before answer_normalize (outputs pinned)."""
    cases = {"4.0": "4", "1,000": "1000", "$5": "5", "0.5": "1/2", "1/2": "1/2", "29.": "29", " a  b ": "a b",
             "1,5": "15", "1 000": "1000", "$ten": "$ten", "Paris": "Paris"}
    assert {k: normalize_answer(k) for k in cases} == cases
    assert normalize_answer("x", "none") == normalize_answer("x")


# ---------------------------------------------------------------------------------- config
def _grpo(*overrides):
    from megatron_midtrain.config.loader import load_config

    return load_config(["method=grpo", *overrides]).method


@pytest.mark.parametrize("overrides,fragment", [
    (["method.answer_format=regex"], "needs method.answer_regex"),
    (["method.answer_format=regex", "method.answer_regex='(unclosed'"], "does not compile"),
    (["method.answer_format=regex", "method.answer_regex='Answer: \\d+'"], "no capture group"),
    (["method.answer_format=gsm8k", "method.answer_regex='(\\d+)'"], "answer_regex is set but method.answer_format=gsm8k"),
    (["method.answer_normalize=fuzzy"], "answer_normalize='fuzzy' is unknown"),
    (["method.answer_format=json"], "answer_format='json' is unknown"),
])
def test_bad_answer_config_is_one_clear_error(overrides, fragment):
    with pytest.raises(UserError, match=fragment) as err:
        _grpo(*overrides)
    assert "\n" not in str(err.value) and "fix:" in str(err.value)


def test_answer_config_through_hydra():
    m = _grpo("method.answer_format=regex", "method.answer_regex='Answer: *(\\d+)'", "method.answer_normalize=numeric")
    assert (m.answer_format, m.answer_regex, m.answer_normalize) == ("regex", "Answer: *(\\d+)", "numeric")
    assert extract_answer("Answer: 12", m.answer_format, m.answer_regex) == "12"
    m = _grpo("method.answer_format=gsm8k")
    assert (m.answer_regex, m.answer_normalize) == (None, "none")


def test_rmt_refuses_what_prefix_match_cannot_use():
    from megatron_midtrain.config.methods import RMTMethodConfig

    with pytest.raises(UserError, match="answer_normalize=numeric does not apply to method=rmt"):
        RMTMethodConfig(answer_normalize="numeric")
    with pytest.raises(UserError, match="no {answer_hint}"):
        RMTMethodConfig(answer_format="regex", answer_regex="A: (.*)")
    RMTMethodConfig(answer_format="regex", answer_regex="A: (.*)", prompt_template="{context}\nA:")
    assert "####" in build_prompt("ctx", 4, answer_format="gsm8k")
    assert build_prompt("ctx", 4, "{context} A:", answer_format="regex") == "ctx A:"
    with pytest.raises(ValueError, match="answer_hint"):
        build_prompt("ctx", 4, answer_format="regex")


# ---------------------------------------------------------------------------------- a GSM8K-style file
def test_gsm8k_jsonl_is_read_and_graded(tmp_path):
    from megatron_midtrain.rl.tasks import Prompt, read_problems, score_verifiable

    problems = read_problems(write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS), "method.task_file")
    assert [p["prompt"] for p in problems] == [r["prompt"] for r in GSM8K_ROWS]
    assert problems[0]["answer"] == GSM8K_ROWS[0]["answer"]  # kept as written, graded by its "#### 72"
    cfg = _grpo("method.answer_format=gsm8k", "method.answer_normalize=numeric", "method.missing_penalty=-1.5")
    natalia = Prompt(ids=[], answer=problems[0]["answer"])
    graded = {name: score_verifiable(text, natalia, cfg) for name, text in {
        "correct": "48 / 2 = 24 in May, 48 + 24 = 72.\n#### 72",
        "wrong": "48 + 48 = 96\n#### 96",
        "equal": "#### 72.0",
        "missing": "The answer is 72",
    }.items()}
    assert {k: (r.status, r.reward) for k, r in graded.items()} == {
        "correct": (STATUS_CORRECT, 1.0), "wrong": (STATUS_WRONG, 0.0), "equal": (STATUS_CORRECT, 1.0),
        "missing": (STATUS_MISSING, -1.5)}
    weng = Prompt(ids=[], answer=problems[1]["answer"])
    assert score_verifiable("0.2 x 50 = 10\n#### $10.00", weng, cfg).correct


def test_gsm8k_jsonl_with_nothing_after_the_marker_is_refused(tmp_path):
    from megatron_midtrain.rl.tasks import read_problems

    path = write_jsonl(tmp_path / "bad.jsonl", [GSM8K_ROWS[0], {"prompt": "q", "answer": "work\n####  "}])
    with pytest.raises(UserError, match="line 2's answer has nothing after its last ####"):
        read_problems(path, "method.task_file")


def test_grpo_run_on_a_gsm8k_file(tmp_path):
    """method=grpo under the real trainer on a GSM8K-style file with answer_format=gsm8k (the
    random demo policy is rarely right; the point is that the config path runs and logs)."""
    from megatron_midtrain.testing.distributed import run_distributed
    from megatron_midtrain.testing.runs import train_and_report

    task = write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)
    held_out = write_jsonl(tmp_path / "eval.jsonl", GSM8K_ROWS[::-1])
    overrides = ["method=grpo", f"method.task_file={task}", f"method.eval_file={held_out}", "method.eval_problems=2",
                 "method.answer_format=gsm8k", "method.answer_normalize=numeric", "method.stop_strings=[]",
                 "method.prompts_per_step=2", "method.group_size=2", "method.rollout_micro_batch_size=4",
                 "method.max_new_tokens=8", "train.max_steps=2", f"run.dir={tmp_path / 'run'}"]
    records = run_distributed(train_and_report, 1, overrides)[0]["records"]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert 0.0 <= r["rl/accuracy"] <= 1.0 and 0.0 <= r["rl/format_error"] <= 1.0
    assert "rl/heldout_accuracy_before" in records[0] and "rl/heldout_accuracy" in records[-1]
