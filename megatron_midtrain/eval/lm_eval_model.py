"""An lm-evaluation-harness model class backed by a megatron_midtrain model (any TP/PP).

All three request types reduce to the collective :class:`~megatron_midtrain.eval.scorer.Scorer`:

* ``loglikelihood(context, continuation)``: sum of the continuation's token log-probs and
  whether every continuation token is the greedy choice. Tokenisation follows the harness's
  HF model: trailing spaces of the context move to the continuation, the pair is encoded
  whole and split at the context's length, and an empty context is replaced by the BOS (or
  EOD) token. Inputs longer than the context window keep their last ``max_length`` tokens.
* ``loglikelihood_rolling(text)``: the harness's disjoint rolling windows.
* ``generate_until(context, until=..., max_gen_toks=...)``: greedy decoding (no KV cache:
  each new token re-runs the prefix; meant for small evaluations and tests).

Every rank must issue the same requests in the same order (each process runs the harness
with ``rank 0 / world 1``), which holds because the harness is deterministic.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megatron_midtrain.eval.scorer import Scorer


class MegatronLM(LM):
    def __init__(self, scorer: Scorer, tokenizer, max_gen_toks: int = 256):
        super().__init__()
        self.scorer = scorer
        self.tok = tokenizer
        self.max_length = scorer.max_length
        self.max_gen_toks = max_gen_toks
        self.prefix_token = tokenizer.bos if tokenizer.bos is not None else tokenizer.eod

    # -------------------------------------------------------------- helpers
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = list(self.tok.tokenize(context + continuation))
        ctx = list(self.tok.tokenize(context)) if context else []
        cont = whole[len(ctx):]
        if not ctx:
            ctx = [self.prefix_token]
            cont = list(self.tok.tokenize(continuation))
        return ctx, cont

    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        # Sequences longer than the window keep their last max_length tokens (the continuation).
        seqs = [(ctx + cont)[-self.max_length:] for ctx, cont in pairs]
        scores = self.scorer.score(seqs)
        out = []
        for (ctx, cont), s in zip(pairs, scores):
            n = min(len(cont), len(s.logp))
            out.append((float(sum(s.logp[-n:])) if n else 0.0, bool(all(s.greedy[-n:])) if n else True))
        return out

    # -------------------------------------------------------------- harness API
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._score_pairs([self._encode_pair(*req.args) for req in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        results = []
        for req in requests:
            tokens = list(self.tok.tokenize(req.args[0]))
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                tokens, prefix_token=self.prefix_token, max_seq_len=self.max_length, context_len=1)]
            results.append(sum(ll for ll, _ in self._score_pairs(windows)))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = list(self.tok.tokenize(context)) or [self.prefix_token]
            generated: list[int] = []
            text = ""
            for _ in range(budget):
                window = (ids + generated)[-self.max_length:]
                nxt = self.scorer.score([window])[0].argmax[-1]
                if nxt == self.tok.eod:
                    break
                generated.append(nxt)
                text = self.tok.detokenize(generated)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out
