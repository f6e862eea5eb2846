"""The flywheel benchmark's own arithmetic: statistics, token classes and the ReMiT weight summary.

(The pipeline end to end, with its cache and resume, is smoke-tested in test_benchmarks.py.)
"""

import math

import numpy as np
import pytest

from megatron_midtrain.flywheel.mechanism import answer_tokens, number_tokens, weight_summary
from megatron_midtrain.flywheel.report import mean_se, summarise


def _run(method, seed, loss):
    tokens = {d: {"val_loss": loss, "next_token_acc": 0.5, "next_token_acc_high_entropy": 0.2} for d in ("math", "prose")}
    return {"method": method, "seed": seed, "tokens": tokens}


def test_mean_and_standard_error():
    m, se = mean_se([1.0, 2.0, 3.0])
    assert m == 2.0 and se == pytest.approx(1.0 / math.sqrt(3))
    assert math.isnan(mean_se([4.0])[1])


def test_difference_from_ntp_is_paired_by_seed():
    # Seeds differ a lot, the method is 0.1 better on every seed: the paired s.e. is 0,
    # while the unpaired spread of each method is large.
    runs = [_run("ntp", s, loss) for s, loss in ((1, 3.0), (2, 4.0), (3, 5.0))]
    runs += [_run("remit", s, loss - 0.1) for s, loss in ((1, 3.0), (2, 4.0), (3, 5.0))]
    table = summarise({"runs": runs})
    cell = table["remit"]["val_loss_math"]
    assert cell["n"] == 3 and cell["se"] == pytest.approx(1 / math.sqrt(3))
    assert cell["diff"] == pytest.approx(-0.1) and cell["diff_se"] == pytest.approx(0.0, abs=1e-12)
    assert "diff" not in table["ntp"]["val_loss_math"]


@pytest.fixture(scope="module")
def tokenizer(demo_cache):
    from megatron_midtrain.data.demo import ensure_demo_assets
    from megatron_midtrain.data.tokenizer import load_tokenizer

    return load_tokenizer(ensure_demo_assets(demo_cache).tokenizer_path)


def test_number_and_answer_tokens(tokenizer):
    text = "Step 1: 2 + 2 = 4. Step 2: 4 + 5 = 19. The answer is 19. The end"
    ids = np.array([tokenizer.tokenize(text)])
    answers = answer_tokens(ids, tokenizer)
    assert tokenizer.detokenize(ids[0][answers[0]].tolist()).strip() == "19"
    numbers = number_tokens(ids, tokenizer)
    digits = "".join(tokenizer.detokenize([i]) for i in ids[0][numbers[0]].tolist()).replace(" ", "")
    assert digits == "12242451919", digits  # 1 2 2 4 2 4 5 19 19
    assert not answers[0][~numbers[0]].any()  # every answer token here is a number


def test_weight_summary(tokenizer):
    ids = np.array([tokenizer.tokenize("The answer is 7. Then some words follow here")])
    n = ids.shape[1]
    probe = {"tokens": ids, "labels": ids, "mask": np.ones((1, n), dtype=bool), "logp": np.full((1, n), -2.0)}
    same = weight_summary(probe, dict(probe), 0.2, "sequence", tokenizer.eod, tokenizer)
    assert same["w_mean"] == pytest.approx(1.0) and same["frac_low"] == 0 and same["frac_high"] == 0
    # The reference is far more confident on the answer tokens: they get 1 + eps, the rest fall
    # below 1 after centring.
    ref = dict(probe, logp=np.where(answer_tokens(ids, tokenizer), 3.0, -2.0))
    s = weight_summary(probe, ref, 0.2, "sequence", tokenizer.eod, tokenizer)
    assert s["w_answers"] == pytest.approx(1.2) and s["w_other_than_answers"] < 1.0
    assert 0 < s["frac_high"] < 0.5 and s["delta_mean"] > 0


def test_ablations_follow_the_chosen_methods(tmp_path):
    from megatron_midtrain.flywheel.recipe import ABLATION_OF, ABLATIONS, Recipe
    from megatron_midtrain.flywheel.runner import Flywheel

    assert set(ABLATION_OF) == set(ABLATIONS)
    assert Flywheel(str(tmp_path), Recipe(), ["ntp", "rmt"]).ablations == ["rmt_lr1e-3", "rmt_ntp1"]
    assert Flywheel(str(tmp_path), Recipe(), ["ntp"]).ablations == []
    assert len(Flywheel(str(tmp_path), Recipe()).ablations) == len(ABLATIONS)
    assert Flywheel(str(tmp_path), Recipe.quick()).ablations == []
