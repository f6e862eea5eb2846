"""KV-cache generation (megatron_midtrain.rl.generation) at TP1, TP2 and PP2 on CPU (gloo).

One spawned 2-rank world runs every layout in turn (spawning and importing megatron is the
slow part): TP1 (as DP2: the two ranks generate for different prompts, independently), TP2
(also with sequence parallelism switched on) and PP2. The model is a tiny random GQA Llama with a
300-token vocabulary padded to 384, initialised identically in every layout. The tests then
compare the returned results: the KV cache against full recomputation (greedy: exactly),
ranks of one model-parallel group against each other, seeds, top-p, EOS and stop strings.
The sampler, the argument checks and the SDPA decode mask run in the pytest process.
"""

from __future__ import annotations

import types

import pytest
import torch

from megatron_midtrain.errors import UserError
from megatron_midtrain.rl.generation import GenerationResult, SamplingParams, generate, sample_next
from megatron_midtrain.testing.distributed import run_distributed

VOCAB = 300  # padded to 384 (make_vocab_size_divisible_by=128): columns 300..383 are padding
PADDED = 384
NEW = 20
INIT_SEED = 1234
PROMPT_LENGTHS = (5, 5, 9, 9, 9, 13)
SAMPLED = SamplingParams(max_new_tokens=NEW, temperature=1.0, top_p=0.9)


def _prompts(lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    prompts[1] = list(prompts[0])  # two rollouts of one prompt (same length, same tokens)
    return prompts


def detok(ids: list[int]) -> str:
    return "".join(f"<{i}>" for i in ids)


# ----------------------------------------------------------------------------------------
# the spawned world
# ----------------------------------------------------------------------------------------


def _build(tp: int, pp: int):
    from megatron.core import parallel_state, tensor_parallel

    from megatron_midtrain.config.schema import ModelConfig, ParallelConfig
    from megatron_midtrain.model.builder import build_gpt_stage, build_transformer_config
    from megatron_midtrain.model.init import init_parameters

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                      vocab_size=VOCAB, make_vocab_size_divisible_by=128, max_position_embeddings=64)
    config = build_transformer_config(cfg, ParallelConfig(tp=tp, pp=pp), torch.float32)
    model = build_gpt_stage(cfg, config, 64, use_te=False)
    # std 0.3 (not 0.02): a random model whose greedy continuations vary (at 0.02 it repeats
    # one token), with top-2 logit gaps of ~1e-2, far above float32 rounding
    init_parameters([model], INIT_SEED, 0.3, cfg.num_layers)
    return model


def _runs(model, prompts) -> dict:
    """Greedy and sampled generation, with and without the KV cache."""
    greedy = SamplingParams(max_new_tokens=NEW, greedy=True)
    return {
        "greedy_kv": generate(model, prompts, greedy, vocab_size=VOCAB),
        "greedy_full": generate(model, prompts, greedy, vocab_size=VOCAB, use_kv_cache=False),
        "sampled_kv": generate(model, prompts, SAMPLED, vocab_size=VOCAB, seed=5),
        "sampled_full": generate(model, prompts, SAMPLED, vocab_size=VOCAB, seed=5, use_kv_cache=False),
    }


def _tp1_extras(model, prompts) -> dict:
    """Seeds, top-p, padded vocabulary, EOS and stop strings (TP1, rank 0)."""
    out = {
        "seed5_again": generate(model, prompts, SAMPLED, vocab_size=VOCAB, seed=5),
        "seed6": generate(model, prompts, SAMPLED, vocab_size=VOCAB, seed=6),
        "tiny_top_p": generate(model, prompts, SamplingParams(max_new_tokens=NEW, temperature=1.0, top_p=1e-6),
                               vocab_size=VOCAB, seed=3),
        "temperature0": generate(model, prompts, SamplingParams(max_new_tokens=NEW, temperature=0.0), vocab_size=VOCAB),
        "batch_rows_2": generate(model, prompts, SamplingParams(max_new_tokens=NEW, greedy=True), vocab_size=VOCAB,
                                 max_batch_rows=2),
        # one row per batch: no padding, no mask (the default puts all six lengths in one padded batch)
        "batch_rows_1": generate(model, prompts, SamplingParams(max_new_tokens=NEW, greedy=True), vocab_size=VOCAB,
                                 max_batch_rows=1),
    }
    greedy = generate(model, prompts, SamplingParams(max_new_tokens=NEW, greedy=True), vocab_size=VOCAB).responses
    # EOS: the token that most rows emit (kept; each row stops where it first emits it)
    eos = max(sorted({t for g in greedy for t in g}), key=lambda t: sum(t in g for g in greedy))
    out["eos_id"] = eos
    out["eos"] = generate(model, prompts, SamplingParams(max_new_tokens=NEW, greedy=True, eos_id=eos), vocab_size=VOCAB)
    # a stop string spanning two tokens of row 4 (steps 3-4), plus one that never occurs
    stop = detok(greedy[4][3:5])
    out["stop"] = stop
    out["stop_result"] = generate(model, prompts, SamplingParams(max_new_tokens=NEW, greedy=True, stop_strings=(stop, "<999>")),
                                  vocab_size=VOCAB, detokenize=detok)
    # the host reads the finished flags every k steps (CUDA default 16): same results for any k,
    # including sampled batches that finish early (the generator is rewound for the next batch)
    for k in (3, 16):
        out[f"stop_result_k{k}"] = generate(model, prompts, SamplingParams(max_new_tokens=NEW, greedy=True,
                                            stop_strings=(stop, "<999>")), vocab_size=VOCAB, detokenize=detok, check_every=k)
        out[f"eos_k{k}"] = generate(model, prompts, SamplingParams(max_new_tokens=NEW, greedy=True, eos_id=eos),
                                    vocab_size=VOCAB, check_every=k)
    warm = SamplingParams(max_new_tokens=NEW, temperature=0.5)
    base = generate(model, prompts, warm, vocab_size=VOCAB, seed=7, max_batch_rows=2).responses
    # EOS := a token both rollouts of prompt 0 (batch 0) emit, so that batch 0 ends early, at a
    # step where check_every=16 does not read the flags (1, 2, 4, 8, 16): it overshoots and
    # must rewind the generator before batch 1 samples
    ends = {t: max(base[0].index(t), base[1].index(t)) + 1 for t in set(base[0]) & set(base[1])}
    early = min((t for t, n in ends.items() if n not in (1, 2, 4, 8, 16)), key=ends.get, default=0)
    out["early_eos_step"] = ends.get(early)
    for k in (1, 3, 16):
        out[f"early_eos_k{k}"] = generate(model, prompts, SamplingParams(max_new_tokens=NEW, temperature=0.5, eos_id=early),
                                          vocab_size=VOCAB, seed=7, max_batch_rows=2, check_every=k)
    # padding columns made the most likely ones: still never chosen
    handle = model.output_layer.register_forward_hook(_boost_padding)
    try:
        out["boosted_greedy"] = generate(model, prompts, SamplingParams(max_new_tokens=NEW, greedy=True), vocab_size=VOCAB)
        out["boosted_hot"] = generate(model, prompts, SamplingParams(max_new_tokens=NEW, temperature=5.0), vocab_size=VOCAB)
        out["boosted_raw_argmax"] = int(model(torch.tensor([prompts[0]]), torch.arange(len(prompts[0]))[None], None)[0, -1].argmax())
    finally:
        handle.remove()
    model.train()
    generate(model, prompts[:1], SamplingParams(max_new_tokens=2, greedy=True), vocab_size=VOCAB)
    out["training_restored"] = model.training
    # generate runs under torch.inference_mode: the RoPE table a training forward of that same
    # length gets from megatron's lru_cache must be an ordinary tensor (TE's fused RoPE saves it
    # for backward, which autograd refuses for an inference tensor)
    length = len(prompts[0]) + 2
    table = model.rotary_pos_emb(length, packed_seq=False, cp_group=None)  # the key GPTModel.forward uses
    out["rope_table_after_generate_is_inference"] = table.is_inference()
    tokens = torch.tensor([prompts[0] + [1, 2]])
    loss = model(tokens, torch.arange(length)[None], None).float().square().mean()
    loss.backward()
    out["trains_after_generate"] = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters()) \
        and any(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return out


def _boost_padding(module, inputs, output):
    logits, bias = output
    logits = logits.clone()
    logits[..., VOCAB:] += 100.0
    return logits, bias


def _world() -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_midtrain.utils import cpu_compat

    cpu_compat.activate()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    prompts = _prompts()
    out = {}

    # TP1 / DP2: rank 0 runs the full prompt set; rank 1 different prompts (other batches)
    model = _build(1, 1)
    out["tp1"] = _runs(model, prompts if rank == 0 else _prompts((7, 3, 3), seed=1))
    if rank == 0:
        out["tp1_extras"] = _tp1_extras(model, prompts)
    dist.barrier()

    model = _build(2, 1)
    out["tp2"] = _runs(model, prompts)
    # A sequence-parallel model (switched on the way megatron's inference code switches it;
    # the local layer spec refuses to *build* one): generate turns it off and back on.
    from megatron.core.transformer.utils import set_model_to_sequence_parallel

    set_model_to_sequence_parallel(model, True)
    model.train()
    out["tp2_sp"] = {"greedy_kv": generate(model, prompts, SamplingParams(max_new_tokens=NEW, greedy=True), vocab_size=VOCAB)}
    out["sp_restored"] = (model.config.sequence_parallel, model.decoder.layers[0].self_attention.linear_proj.sequence_parallel,
                          model.training)

    model = _build(1, 2)
    out["pp2"] = _runs(model, prompts)
    out["pp2_first_stage"] = parallel_state.is_pipeline_first_stage()
    parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def world():
    return run_distributed(_world, 2, backend="gloo")


# ----------------------------------------------------------------------------------------
# greedy: KV cache == full recomputation, in every layout
# ----------------------------------------------------------------------------------------


def _responses(result: GenerationResult):
    return result.responses, result.finish_reasons


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_greedy_kv_cache_equals_full_recompute(world, layout):
    for rank in range(2):
        runs = world[rank][layout]
        assert _responses(runs["greedy_kv"]) == _responses(runs["greedy_full"]), (layout, rank)
        assert all(len(r) == NEW for r in runs["greedy_kv"].responses)
        assert runs["greedy_kv"].finish_reasons == ["length"] * len(runs["greedy_kv"].responses)
        assert runs["greedy_kv"].generated_tokens == sum(map(len, runs["greedy_kv"].responses))
        assert runs["greedy_kv"].seconds > 0


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_model_parallel_ranks_agree(world, layout):
    for name in ("greedy_kv", "greedy_full", "sampled_kv", "sampled_full"):
        assert _responses(world[0][layout][name]) == _responses(world[1][layout][name]), (layout, name)
    if layout == "pp2":
        assert [world[0]["pp2_first_stage"], world[1]["pp2_first_stage"]] == [True, False]


@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2_sp"])
def test_layouts_give_the_tp1_tokens(world, layout):
    assert world[0][layout]["greedy_kv"].responses == world[0]["tp1"]["greedy_kv"].responses


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_layouts_sample_the_tp1_tokens(world, layout):
    assert world[0][layout]["sampled_kv"].responses == world[0]["tp1"]["sampled_kv"].responses


def test_training_after_generate_gets_no_inference_tensors(world):
    extras = world[0]["tp1_extras"]
    assert extras["rope_table_after_generate_is_inference"] is False
    assert extras["trains_after_generate"]


def test_sequence_parallel_and_training_flag_restored(world):
    assert world[0]["sp_restored"] == (True, True, True)
    assert world[0]["tp1_extras"]["training_restored"] is True


def test_data_parallel_ranks_are_independent(world):
    other = world[1]["tp1"]["greedy_kv"]
    assert [len(r) for r in other.responses] == [NEW] * 3
    assert _responses(other) == _responses(world[1]["tp1"]["greedy_full"])


def test_rollouts_of_one_prompt(world):
    tp1 = world[0]["tp1"]
    assert tp1["greedy_kv"].responses[0] == tp1["greedy_kv"].responses[1]  # same prompt, greedy
    assert tp1["sampled_kv"].responses[0] != tp1["sampled_kv"].responses[1]  # same prompt, sampled


def test_batch_cap_does_not_change_greedy_tokens(world):
    assert world[0]["tp1_extras"]["batch_rows_2"].responses == world[0]["tp1"]["greedy_kv"].responses


def test_left_padded_batch_equals_unpadded_rows(world):
    """Prompts of 5, 9 and 13 tokens in one left-padded, masked batch give the tokens each
    prompt gets alone (RoPE is relative, the padding is masked out)."""
    assert len(set(PROMPT_LENGTHS)) > 1
    assert world[0]["tp1_extras"]["batch_rows_1"].responses == world[0]["tp1"]["greedy_kv"].responses


def test_padding_mask_blocks_pad_keys_but_not_the_diagonal():
    from megatron_midtrain.rl.generation import _attention_mask

    key_pad = torch.tensor([[True, True, False, False], [False, False, False, False]])
    forbidden = _attention_mask(key_pad, 4)[:, 0]
    causal = torch.ones(4, 4, dtype=torch.bool).triu(1)
    assert torch.equal(forbidden[1], causal)
    assert forbidden[0].tolist() == [[False, True, True, True], [True, False, True, True],
                                     [True, True, False, True], [True, True, False, False]]
    decode = _attention_mask(torch.cat([key_pad, torch.zeros(2, 1, dtype=torch.bool)], 1), 1)[:, 0, 0]
    assert decode.tolist() == [[True, True, False, False, False], [False] * 5]


# ----------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------


def test_sampling_is_seeded(world):
    tp1, extras = world[0]["tp1"], world[0]["tp1_extras"]
    assert extras["seed5_again"].responses == tp1["sampled_kv"].responses
    assert extras["seed6"].responses != tp1["sampled_kv"].responses
    assert tp1["sampled_kv"].responses == tp1["sampled_full"].responses  # the cache does not change samples


def test_tiny_top_p_and_zero_temperature_are_greedy(world):
    greedy = world[0]["tp1"]["greedy_kv"].responses
    assert world[0]["tp1_extras"]["tiny_top_p"].responses == greedy
    assert world[0]["tp1_extras"]["temperature0"].responses == greedy


def test_padding_columns_never_chosen(world):
    extras = world[0]["tp1_extras"]
    assert extras["boosted_raw_argmax"] >= VOCAB  # the hook does make them the most likely
    for name in ("boosted_greedy", "boosted_hot"):
        tokens = [t for r in extras[name].responses for t in r]
        assert len(tokens) == NEW * len(PROMPT_LENGTHS) and max(tokens) < VOCAB and min(tokens) >= 0
    for layout in ("tp1", "tp2", "pp2"):
        assert max(t for r in world[0][layout]["sampled_kv"].responses for t in r) < VOCAB


# ----------------------------------------------------------------------------------------
# EOS and stop strings
# ----------------------------------------------------------------------------------------


def _expected(greedy: list[int], eos_id=None, stops=()) -> tuple[list[int], str]:
    for k in range(1, len(greedy) + 1):
        if eos_id is not None and greedy[k - 1] == eos_id:
            return greedy[:k], "eos"
        if any(s in detok(greedy[:k]) for s in stops):
            return greedy[:k], "stop"
    return greedy, "length"


def test_eos_truncates_rows(world):
    greedy = world[0]["tp1"]["greedy_kv"].responses
    extras = world[0]["tp1_extras"]
    result = extras["eos"]
    expected = [_expected(g, eos_id=extras["eos_id"]) for g in greedy]
    assert list(zip(result.responses, result.finish_reasons)) == expected
    assert result.finish_reasons.count("eos") >= 2 and len({len(r) for r in result.responses}) >= 3
    assert result.generated_tokens == sum(map(len, result.responses)) < NEW * len(greedy)


def test_stop_strings_truncate_rows(world):
    greedy = world[0]["tp1"]["greedy_kv"].responses
    extras = world[0]["tp1_extras"]
    result = extras["stop_result"]
    expected = [_expected(g, stops=(extras["stop"], "<999>")) for g in greedy]
    assert list(zip(result.responses, result.finish_reasons)) == expected
    assert result.finish_reasons[4] == "stop" and len(result.responses[4]) <= 5
    assert extras["stop"] in detok(result.responses[4]) and extras["stop"] not in detok(result.responses[4][:-1])


def test_finished_flags_read_every_k_steps_give_the_same_rollouts(world):
    extras = world[0]["tp1_extras"]
    for k in (3, 16):
        assert _responses(extras[f"stop_result_k{k}"]) == _responses(extras["stop_result"]), k
        assert _responses(extras[f"eos_k{k}"]) == _responses(extras["eos"]), k
    reference = extras["early_eos_k1"]
    assert extras["early_eos_step"] not in (None, 1, 2, 4, 8, 16)
    assert reference.finish_reasons[:2] == ["eos", "eos"]
    assert max(map(len, reference.responses[:2])) == extras["early_eos_step"] < NEW
    for k in (3, 16):
        assert _responses(extras[f"early_eos_k{k}"]) == _responses(reference), k


def test_stop_scan_matches_a_full_decode():
    from megatron_midtrain.rl.generation import _StopScan

    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        tokens = torch.randint(0, 12, (60,), generator=gen).tolist()
        stops = (detok(tokens[40:43]), "<7><7>") if trial % 2 else ("<3><4>",)
        scan = _StopScan(stops, detok)
        first_scan = next((n for n in range(1, 61) if scan.hit(tokens[:n])), None)
        first_full = next((n for n in range(1, 61) if any(s in detok(tokens[:n]) for s in stops)), None)
        assert first_scan == first_full, (trial, stops)


# ----------------------------------------------------------------------------------------
# in-process: the sampler, argument checks, the SDPA decode mask
# ----------------------------------------------------------------------------------------


def test_sample_next_masks_padding_and_is_seeded():
    logits = torch.randn(4, PADDED, generator=torch.Generator().manual_seed(0))
    logits[:, VOCAB:] = 1e4
    assert (sample_next(logits, SamplingParams(greedy=True), VOCAB, None) < VOCAB).all()
    hot = SamplingParams(temperature=10.0)
    draws = [sample_next(logits, hot, VOCAB, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert (torch.stack(draws) < VOCAB).all()
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    tiny = sample_next(logits, SamplingParams(top_p=1e-9), VOCAB, torch.Generator().manual_seed(3))
    assert torch.equal(tiny, logits[:, :VOCAB].argmax(-1))


def test_top_p_keeps_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two, never the others
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(2000, 4).contiguous()
    drawn = sample_next(logits, SamplingParams(top_p=0.7), 4, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}
    share = (drawn == 0).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.05


@pytest.mark.parametrize("params, kwargs, message", [
    (SamplingParams(top_p=0.0), {}, "top_p"),
    (SamplingParams(temperature=-1.0), {}, "temperature"),
    (SamplingParams(stop_strings=("x",)), {}, "detokenize"),
    (SamplingParams(eos_id=VOCAB), {}, "eos_id"),
    (SamplingParams(max_new_tokens=60), {}, "context"),
    (SamplingParams(), {"prompts": [[]]}, "empty"),
    (SamplingParams(), {"prompts": [[VOCAB]]}, "outside the vocabulary"),
    (SamplingParams(), {"vocab_size": PADDED + 1}, "vocab_size"),
])
def test_bad_arguments_refused(params, kwargs, message):
    model = types.SimpleNamespace(vocab_size=PADDED, max_sequence_length=64)
    args = {"prompts": [[1, 2, 3, 4, 5]], "vocab_size": VOCAB, **kwargs}
    with pytest.raises(UserError, match=message):
        generate(model, args.pop("prompts"), params, **args)


def test_sdpa_causal_with_fewer_queries_is_bottom_right():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_midtrain.model.sdpa_attention import SDPAttention

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2)
    tp1 = types.SimpleNamespace(tp=types.SimpleNamespace(size=lambda: 1))
    attn = SDPAttention(config, 1, AttnMaskType.causal, "self", pg_collection=tp1).eval()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, 2, h, 8, generator=gen) for h in (4, 2, 2))  # [s, b, heads, d]
    full = attn(q, k, v, None)  # training shape: is_causal
    for last in (1, 3):  # the last `last` queries against all 7 keys, causal or (1 query) no mask
        part = attn(q[-last:], k, v, None)
        torch.testing.assert_close(part, full[-last:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn(q[-1:], k, v, None, attn_mask_type=AttnMaskType.no_mask), full[-1:],
                               rtol=1e-5, atol=1e-6)
