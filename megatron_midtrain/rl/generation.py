"""Autoregressive generation (rollouts) with a megatron ``GPTModel`` stage under TP and PP.

:func:`generate` samples responses for a list of token-id prompts, with megatron-core's own
KV cache (:class:`megatron.core.inference.contexts.StaticInferenceContext`: every attention
layer keeps its keys/values in preallocated buffers and offsets RoPE by the tokens already
seen) or, for reference and benchmarks, by re-running the whole sequence at every step.

Collective over the model-parallel group (TP x PP): every rank of that group calls it with
the same prompts and parameters and gets the same :class:`GenerationResult`. Data-parallel
replicas are independent (each passes its own prompts; nothing is exchanged between them).

How one forward pass runs (prefill, then one per new token):

* first pipeline stage: embeds the tokens; every other stage receives the previous stage's
  hidden states ``[s, b, hidden]`` with ``torch.distributed.recv`` on the pipeline group and
  hands them to the model with ``model.set_input_tensor`` (as megatron's schedules do), runs
  its layers, and ``send``\\ s its output on; each stage keeps the KV cache of its own layers;
* the last stage gets the full-vocabulary logits of the last position (megatron gathers the
  TP shards, ``runtime_gather_output=True``), drops the padding columns (``>= vocab_size``)
  and picks the next token: argmax (ties -> smallest id), or temperature + nucleus (top-p)
  sampling with a ``torch.Generator`` seeded by ``seed``;
* the chosen tokens are broadcast from TP rank 0 of the last stage to its TP group and then
  from the last stage over the pipeline group, so every rank feeds the same tokens to the
  next step and returns the same responses, bit for bit.

Batching: rows are sorted by prompt length and cut into batches of at most ``max_batch_rows``
rows. Within a batch, shorter prompts are left-padded and the padding is masked out of
attention (a pad position sees only itself, so no attention row is empty). RoPE scores
depend only on the distance between positions, so a padded row's attention is the unpadded
one up to float rounding; a batch whose prompts have the same length takes no mask at all.
Mixed lengths in one batch matter for speed: GRPO prompts all differ in length, and one batch
of 128 rows costs about as much per step as a batch of 8 on a small model. A row that has
finished (EOS, stop string) keeps being computed until every row of its batch has finished;
its extra tokens are discarded.

Sequence parallelism, if the model was built with it, is switched off for the call (a
decode step has one token, which cannot be split over TP ranks) and restored afterwards;
the model runs in eval mode under ``torch.inference_mode`` and gets its training flag back.

Per-token cost (what a decode step does besides the model's forward):

* the tokens live in one preallocated ``[b, prompt + max_new_tokens]`` device buffer (no
  per-step ``cat``); the decode mask is a slice of the padding flags;
* EOS is tracked on the device (``kept`` / ``eos_done`` per row); the host reads the
  finished flags only after 1, 2, 4, ... steps and then every :data:`CHECK_EVERY_CUDA` (16)
  on CUDA, every step on the CPU (where a read costs no device sync). A batch that finished
  between two reads ran a few extra decode steps: their tokens are discarded and the sampling
  generator is set back to its state after the last needed step, so the random stream, and
  hence every sampled token for a given seed, is that of a loop checking after every token;
* stop strings are checked incrementally (:class:`_StopScan`): the newest tokens' window
  only, not a re-decode of the whole response per token (which was quadratic);
* the KV cache holds keys with RoPE already applied
  (:mod:`megatron_midtrain.model.rotary_cache`): megatron's static cache re-rotated every
  cached key at every step, the largest single cost of a decode step on the CPU demo.

Measured on the CPU demo (``benchmarks/rollout.py --hf``: 64 rows x (32 prompt + 64 new
tokens), greedy, 2 shared CPU cores, best of 5, measured with the same benchmark script before and after): ours 8,245 -> 8,630 tok/s
against HF ``generate`` 12,096 / 9,915 tok/s in the same runs, i.e. 0.68x -> 0.87x; with the TP1
linear shortcuts (:mod:`megatron_midtrain.model.tp1_inference`, active during the call) 9,809 ->
12,354 tok/s against HF 12,014 / 11,830, i.e. 0.82x -> 1.04x; on the idle machine, with
``torch.inference_mode`` (below), five runs gave 1.04x-1.20x. ``inference_mode`` instead of
``no_grad`` alone: +9% CPU-time tok/s in an interleaved A/B (best of 15). In one
interleaved A/B process (best of 7) the rotated-key cache alone took the old loop from 8,575 to
9,836 tok/s; the loop changes alone are within the noise on the CPU (no host syncs exist there
to save; they are for CUDA). What is left on the CPU is megatron's remaining per-module Python overhead
around the same matmuls HF runs (cProfile: matmul ~63%, SDPA ~15% of ``generate``). Sampled
tokens and finish reasons are unchanged for a given seed (the generator is consumed exactly as
before; tests/test_refactor_baseline.py reproduces the GRPO/RMT records).

megatron-core's inference engine (``megatron.core.inference``) as a backend was tried on the
demo model (TP1, local spec, CPU, with the compat layer's torch proxy extended to the inference
modules) and does not run there: ``StaticInferenceEngine`` (which in 0.16.1 builds a
``DynamicInferenceContext``) fails to initialise its buffers ("Error initializing dynamic
engine: Torch not compiled with CUDA enabled") and falls back to the legacy static path, whose
``TextGenerationController.generate_all_output_tokens_static_batch`` calls ``.cuda()`` on its
tensors (text_generation_controller.py:1067, out of reach of a module-level proxy); dynamic
batching's attention needs flash-attn kernels (``flash_decode_and_prefill``) in any case. Even
on a GPU its sampling uses its own generator and top-k/top-p code, so the same seed would not
give today's rollouts (the GRPO/RMT records would change), and it would bypass our TP/PP token
sharing and stop-string semantics. So generation stays native (no ``method.rollout_engine``
key); a GPU comparison is still to be measured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_midtrain.errors import UserError
from megatron_midtrain.model.tp1_inference import tp1_linear_shortcuts
from megatron_midtrain.rl.generation_pipeline import StagePipeline, forget_inference_tensors, sequence_parallel_off

FINISH_REASONS = ("eos", "stop", "length")


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 or greedy=True -> argmax
    top_p: float = 1.0
    greedy: bool = False
    eos_id: Optional[int] = None  # stop a row when it emits this token (kept in the response)
    # stop a row when its decoded response contains one (tokens up to and including the token
    # that completed it are kept)
    stop_strings: tuple[str, ...] = ()

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


@dataclass
class GenerationResult:
    responses: list[list[int]]  # generated token ids per prompt row, trimmed after EOS/stop
    finish_reasons: list[str]  # "eos" | "stop" | "length"
    generated_tokens: int  # sum of len(responses)
    seconds: float  # wall time of the call


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------


def _check(model, prompts, params: SamplingParams, vocab_size: int, detokenize, max_batch_rows: int) -> None:
    if params.max_new_tokens < 0:
        raise UserError(f"max_new_tokens={params.max_new_tokens} is negative", "use 0 or more")
    if params.temperature < 0:
        raise UserError(f"temperature={params.temperature} is negative", "use 0 (greedy) or a positive value")
    if not 0.0 < params.top_p <= 1.0:
        raise UserError(f"top_p={params.top_p} is outside (0, 1]", "use a value in (0, 1]; 1 disables nucleus sampling")
    if params.stop_strings and detokenize is None:
        raise UserError("stop_strings need a detokenize function", "pass detokenize=tokenizer.decode")
    if any(not s for s in params.stop_strings):
        raise UserError("stop_strings contains an empty string", "remove it")
    if max_batch_rows < 1:
        raise UserError(f"max_batch_rows={max_batch_rows} must be >= 1", "use 1 or more")
    padded = getattr(model, "vocab_size", vocab_size)
    if not 0 < vocab_size <= padded:
        raise UserError(f"vocab_size={vocab_size} is outside 1..{padded} (the model's padded vocabulary)",
                        "pass the tokenizer's vocabulary size")
    if params.eos_id is not None and not 0 <= params.eos_id < vocab_size:
        raise UserError(f"eos_id={params.eos_id} is outside the vocabulary (0..{vocab_size - 1})", "pass the tokenizer's EOS id")
    limit = getattr(model, "max_sequence_length", None)
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise UserError(f"prompt {i} is empty", "give every prompt at least one token (e.g. BOS)")
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise UserError(f"prompt {i} has a token id outside the vocabulary (0..{vocab_size - 1})",
                            "tokenize with the model's tokenizer")
        if limit is not None and len(prompt) + params.max_new_tokens > limit:
            raise UserError(f"prompt {i} ({len(prompt)} tokens) + max_new_tokens={params.max_new_tokens} exceeds the "
                            f"model context ({limit})", "shorten the prompt or lower max_new_tokens")


# ----------------------------------------------------------------------------------------
# sampling (last pipeline stage)
# ----------------------------------------------------------------------------------------


def sample_next(logits: torch.Tensor, params: SamplingParams, vocab_size: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``[b, V_padded]`` full-vocabulary logits -> ``[b]`` int64 token ids (< ``vocab_size``)."""
    logits = logits[:, :vocab_size].float()
    if params.is_greedy:
        return logits.argmax(dim=-1)  # first maximum: ties go to the smallest id
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly more likely tokens
        keep = before < params.top_p
        keep[:, 0] = True
        choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
        return order.gather(-1, choice)[:, 0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class _StopScan:
    """Incremental stop-string check, one object per batch (host side).

    Re-decoding a row's whole response after every token (as a plain ``stop in
    detokenize(response)`` does) costs O(n) per token, O(n^2) per row. Instead, after each token
    only the last :attr:`window` tokens are decoded: a stop string of B UTF-8 bytes completed by
    the newest token spans at most B tokens when every token decodes to at least one byte, and
    the window keeps 8 more tokens of left context (decoders that treat the first token
    specially, e.g. SentencePiece's leading space, or a multi-byte character cut at the window
    start, only ever affect that context). A hit in the window is confirmed on the full response
    once (no false positives), so the result is ``stop in detokenize(response[:n])`` at the first
    such ``n``, as before, for any stop string that spans at most ``window - 8`` tokens.
    """

    def __init__(self, stops: tuple[str, ...], detokenize):
        self.stops, self.detokenize = stops, detokenize
        self.window = max(len(stop.encode("utf-8")) for stop in stops) + 8

    def hit(self, response: list[int]) -> bool:
        n = len(response)
        text = self.detokenize(response[max(0, n - self.window):])
        if not any(stop in text for stop in self.stops):
            return False
        return n <= self.window or any(stop in self.detokenize(response) for stop in self.stops)


#: Decode steps between two reads of the "every row finished" flags, at most (CUDA): the flags
#: are read after 1, 2, 4, 8, 16 steps and then every 16, so a batch that finishes early runs at
#: most ``min(steps, 16) - 1`` extra decode steps (their tokens are discarded; the sampling
#: generator is rewound, see :func:`_generate_batch`), while a long generation pays one host
#: sync per 16 tokens instead of one per token. On the CPU reading a flag costs no device
#: sync, so it is read after every step (no extra steps).
CHECK_EVERY_CUDA = 16


def _attention_mask(key_pad: torch.Tensor, queries: int) -> torch.Tensor:
    """Megatron mask ``[b, 1, queries, keys]`` (True = forbidden) for the last ``queries`` positions.

    Causal (bottom-right aligned) and no attention to padding keys, except a pad position's
    own key: a query with every key masked would give NaN, which would then reach real rows
    through ``0 * NaN`` in the value sum.
    """
    keys = key_pad.shape[1]
    q_pos = torch.arange(keys - queries, keys, device=key_pad.device)[:, None]
    k_pos = torch.arange(keys, device=key_pad.device)[None, :]
    forbidden = (k_pos > q_pos)[None] | (key_pad[:, None, :] & (k_pos != q_pos)[None])
    return forbidden[:, None]


def _generate_batch(pipe: StagePipeline, prompts: list[list[int]], params: SamplingParams, vocab_size: int,
                    generator, detokenize, use_kv_cache: bool, check_every: int, rewind_generator: bool):
    """One batch of prompts (left-padded to the longest) -> (responses, finish reasons).

    The tokens stay on the device in one preallocated ``[b, prompt + max_new_tokens]`` buffer;
    EOS is tracked on the device. The host reads the finished flags (and, with stop strings,
    the new tokens) after 1, 2, 4, ... steps up to every ``check_every`` steps; when the batch
    turns out to have finished before the step it has reached, the extra steps are dropped and,
    if ``rewind_generator`` (a later batch samples from the same generator), the generator is
    set back to its state after the last needed step, so the random stream is the one of a loop
    that stopped exactly there.
    """
    b, length = len(prompts), max(len(p) for p in prompts)
    max_new = params.max_new_tokens
    if max_new == 0:
        return [[] for _ in range(b)], ["length"] * b
    device = pipe.device
    pad = torch.tensor([length - len(p) for p in prompts], dtype=torch.long, device=device)
    padded = bool(pad.any())
    tokens = torch.zeros(b, length + max_new, dtype=torch.long, device=device)
    # Any id serves as padding: it is masked out of every real row's attention.
    tokens[:, :length] = torch.tensor([[0] * (length - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    # padding flags of every key position the batch can reach (generated tokens are never padding)
    key_pad = torch.arange(length + max_new, device=device)[None, :] < pad[:, None]
    context = None
    if use_kv_cache:
        from megatron.core.inference.contexts import StaticInferenceContext

        context = StaticInferenceContext(max_batch_size=b, max_sequence_length=length + max_new)
    eos = params.eos_id
    scan = _StopScan(params.stop_strings, detokenize) if params.stop_strings else None
    # device side (no stop strings): tokens kept per row, and whether the row emitted EOS
    kept = torch.full((b,), max_new, dtype=torch.long, device=device)
    eos_done = torch.zeros(b, dtype=torch.bool, device=device)
    # host side (stop strings): responses so far, finish reasons
    host_rows: list[list[int]] = [[] for _ in range(b)]
    host_reasons: list[Optional[str]] = [None] * b
    states = []  # generator state after each step since the last check (only when rewinding)
    rewind = rewind_generator and generator is not None and check_every > 1
    steps, checked, next_check, stop_at = 0, 0, 1, None
    for step in range(max_new):
        cur = length + step  # tokens in the sequence before this step's token
        if context is not None and step > 0:
            inputs, start = tokens[:, cur - 1:cur], cur - 1
            # one query (the newest, never padding) against every key so far
            mask = key_pad[:, None, None, :cur] if padded else None
        else:
            inputs, start = tokens[:, :cur], 0
            mask = _attention_mask(key_pad[:, :cur], cur) if padded else None
        logits = pipe.forward(inputs, start, context, pad if padded else None, mask)
        if context is not None and step == 0:
            context.enable_decode_mode()
        chosen = sample_next(logits, params, vocab_size, generator) if pipe.last else None
        chosen = pipe.share(chosen, b)
        tokens[:, cur] = chosen
        steps = step + 1
        if rewind:
            states.append(generator.get_state())
        if scan is None and eos is not None:
            first = (chosen == eos) & ~eos_done
            kept = torch.where(first, steps, kept)
            eos_done |= first
        if steps < next_check and steps < max_new:
            continue
        # --- read the finished flags (one host sync) ---
        if scan is None:
            if eos is not None and bool(eos_done.all()):
                stop_at = int(kept.max())
        else:
            block = tokens[:, length + checked:length + steps].tolist()
            for row, new in enumerate(block):
                response = host_rows[row]
                for token in new:
                    if host_reasons[row] is not None:
                        break
                    response.append(token)
                    if eos is not None and token == eos:
                        host_reasons[row] = "eos"
                    elif scan.hit(response):
                        host_reasons[row] = "stop"
                    elif len(response) >= max_new:
                        host_reasons[row] = "length"
            if all(r is not None for r in host_reasons):
                stop_at = max(len(r) for r in host_rows)
        if stop_at is not None:
            break
        checked, next_check, states = steps, steps + min(steps, check_every), []
    if stop_at is not None and stop_at < steps and rewind:
        generator.set_state(states[stop_at - checked - 1])
    if scan is not None:
        return host_rows, [r or "length" for r in host_reasons]
    steps = stop_at or steps
    rows = tokens[:, length:length + steps].tolist()
    kept_rows, done_rows = kept.tolist(), eos_done.tolist()
    responses = [row[:n] for row, n in zip(rows, kept_rows)]
    return responses, ["eos" if done else "length" for done in done_rows]


def generate(model, prompts: list[list[int]], params: SamplingParams, *, vocab_size: int, seed: int = 0,
             detokenize: Optional[Callable[[list[int]], str]] = None, use_kv_cache: bool = True, device=None,
             max_batch_rows: int = 64, check_every: Optional[int] = None) -> GenerationResult:
    """Generate a response for every prompt with this rank's GPTModel stage ``model``.

    Collective over the model-parallel group (TP x PP): every rank of it must call this with
    the same ``prompts``, ``params``, ``seed`` (and a deterministic ``detokenize``), and every
    rank returns the same result. Data-parallel ranks are independent: no communication
    crosses the data-parallel group. ``model`` is the unwrapped stage (``ddp_model.module``),
    with megatron's parallel state already set up for its TP/PP layout.

    Pipeline parallelism: each forward (the prompt prefill, then one step per new token) is
    passed stage to stage with ``torch.distributed.send``/``recv`` on the pipeline group
    (non-first stages get their input through ``model.set_input_tensor``); the last stage
    picks the next tokens from the TP-gathered logits and broadcasts them to all stages.

    Batching: prompts are sorted by length and split into batches of at most
    ``max_batch_rows`` rows; shorter prompts of a batch are left-padded and masked (see the
    module docstring). Rows finishing early keep running until their batch is done; the
    extra tokens are dropped.

    Args:
        model: GPTModel stage (embedding on the first stage, output layer on the last).
        prompts: token ids per row (each non-empty, ids < ``vocab_size``).
        params: :class:`SamplingParams`. A row stops at ``eos_id`` (kept), when its decoded
            response contains one of ``stop_strings`` (tokens up to the completing one kept),
            or after ``max_new_tokens``; the finish reason is checked in that order ("eos",
            "stop", "length"). The response excludes the prompt.
        vocab_size: the tokenizer's vocabulary; logits columns past it (megatron's vocabulary
            padding) are never chosen.
        seed: seeds the ``torch.Generator`` used for sampling (one per call, consumed batch
            by batch in order of increasing prompt length); same seed, same rollouts.
        detokenize: ``list[int] -> str``, needed only for ``stop_strings``.
        use_kv_cache: False re-runs the full sequence at every step (reference path for tests
            and benchmarks: it also materialises the logits of every position).
        device: where inputs are placed (default: the current CUDA device, else the CPU).
        max_batch_rows: cap on rows per batch (bounds KV-cache memory).
        check_every: most decode steps between two host reads of the finished flags (default:
            :data:`CHECK_EVERY_CUDA` on CUDA, 1 elsewhere). Any value gives the same result.
    """
    t0 = time.perf_counter()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    _check(model, prompts, params, vocab_size, detokenize, max_batch_rows)
    if check_every is None:
        check_every = CHECK_EVERY_CUDA if device.type == "cuda" else 1
    if check_every < 1:
        raise UserError(f"check_every={check_every} must be >= 1", "use 1 or more")
    pipe = StagePipeline(model, device)

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # stable: ties keep their order
    batches = [order[k:k + max_batch_rows] for k in range(0, len(order), max_batch_rows)]

    generator = None
    if pipe.last and not params.is_greedy:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    responses: list[list[int]] = [[] for _ in prompts]
    reasons: list[str] = ["length"] * len(prompts)
    was_training = model.training
    restore_sp = sequence_parallel_off(model)
    model.eval()
    try:
        # inference_mode rather than no_grad: no version counters or view tracking on any tensor
        # of the call (measured +9% tok/s on the CPU demo). Its tensors must not outlive it in a
        # place training reads: the only such place is megatron's lru_cache'd RoPE tables, which
        # are cleared on the way out (forget_inference_tensors).
        with torch.inference_mode(), tp1_linear_shortcuts(pipe.tp_size, sequence_parallel=False):  # SP is off
            for k, rows in enumerate(batches):
                out, why = _generate_batch(pipe, [prompts[i] for i in rows], params, vocab_size, generator, detokenize,
                                           use_kv_cache, check_every, rewind_generator=k + 1 < len(batches))
                for r, i in enumerate(rows):
                    responses[i], reasons[i] = out[r], why[r]
    finally:
        forget_inference_tensors()
        if pipe.pp_size > 1:
            model.set_input_tensor(None)
        for obj, attr in restore_sp:
            setattr(obj, attr, True)
        model.train(was_training)
    return GenerationResult(responses=responses, finish_reasons=reasons,
                            generated_tokens=sum(len(r) for r in responses), seconds=time.perf_counter() - t0)
