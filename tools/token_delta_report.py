#!/usr/bin/env python
"""Token-level comparison of two checkpoints: an HTML heat map of Δlog p and ReMiT weights.

For every token of every input document (after the first, which has no prefix to condition on),
both checkpoints score ``log p(x_t | x_<t)``; the report shows

    Δ_t = log p_ref(x_t) − log p_base(x_t)

as the background of the token (blue: the reference is more confident, red: less; stronger
colour = larger |Δ|), and the ReMiT weight the base model (the policy) would give the token
against this reference, ``remit_token_weights(logp_base, logp_ref, clip_eps, center="sequence")``
with the whole document as the sequence (as in the ReMiT paper's token visualisations).

Outputs (in ``--out DIR``):

* ``report.html``: self-contained page (inline CSS, no scripts); hover a token for its text,
  both log-probs, Δ and the weight.
* ``tokens.jsonl``: one line per document (in input order), a JSON list with one object per
  token ``{"token", "id", "logp_base", "logp_ref", "delta", "remit_weight"}``; every token of
  the document is listed, and the first one has ``null`` scores.

Example::

    python tools/token_delta_report.py --base runs/a --ref runs/b --input texts.jsonl --out report/
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_midtrain.errors import UserError, exit_on_user_error  # noqa: E402

#: Tokens of context used to turn single ids into text (see :func:`token_texts`).
_DECODE_CONTEXT = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, metavar="CKPT", help="base (policy) checkpoint: run dir, checkpoints/ or iter dir")
    p.add_argument("--ref", required=True, metavar="CKPT", help="reference checkpoint (same tokenizer)")
    p.add_argument("--input", required=True, metavar="JSONL", help="one JSON object per line holding the text")
    p.add_argument("--json-key", default="text", help="JSON field holding the text (default: text)")
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/report.html and DIR/tokens.jsonl")
    p.add_argument("--clip-eps", type=float, default=0.2, help="ReMiT clipping epsilon (default: 0.2)")
    p.add_argument("--max-docs", type=int, default=None, help="only the first N documents")
    p.add_argument("--append-eod", action="store_true", help="append the EOD token to each document (as in training)")
    p.add_argument("--scale", type=float, default=None,
                   help="|Δ| shown at full colour (default: 95th percentile of |Δ| over the report)")
    p.add_argument("--stride", type=int, default=None,
                   help="window stride for documents longer than the model context (default: half the context)")
    return p.parse_args(argv)


def read_texts(path: str, json_key: str, max_docs: int | None) -> list[str]:
    if not os.path.isfile(path):
        raise UserError(f"input file {path} does not exist", "check the --input path")
    texts: list[str] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if max_docs is not None and len(texts) >= max_docs:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{path}:{lineno}: not valid UTF-8 ({err.reason})", "convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: invalid JSON ({err.msg})", "give one JSON object per line") from None
            if not isinstance(obj, dict) or json_key not in obj:
                raise UserError(f"{path}:{lineno}: no key {json_key!r} in the JSON object",
                                "pass --json-key with the field holding the text")
            if not isinstance(obj[json_key], str):
                raise UserError(f"{path}:{lineno}: {json_key!r} is not a string", "pass --json-key with the text field")
            texts.append(obj[json_key])
    if not texts:
        raise UserError(f"input file {path} holds no documents", "give one JSON object per line")
    return texts


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Text of each token such that, for ordinary text, the pieces concatenate to the decoded document.

    Each token's text is the difference between decoding a short window ending with it and the
    same window without it (decoders strip or merge at boundaries, so single-id decoding is
    not reliable). Byte-fallback tokens of one multi-byte character: the earlier ones get an
    empty text and the token completing the character carries it.
    """
    out = []
    for i in range(len(ids)):
        start = max(0, i - _DECODE_CONTEXT)
        prev = tokenizer.detokenize(ids[start:i]).rstrip("\ufffd") if i > start else ""
        cur = tokenizer.detokenize(ids[start:i + 1])
        if i < len(ids) - 1:
            # A trailing U+FFFD may be an incomplete multi-byte character that a later byte token
            # completes: leave it to that token (the last token keeps whatever is left).
            cur = cur.rstrip("\ufffd")
        common = os.path.commonprefix([prev, cur])
        out.append(cur[len(common):])
    return out


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:+.4f}" if x != 0 else "0"


def _colour(delta: float | None, scale: float) -> str:
    if delta is None or scale <= 0:
        return "transparent"
    alpha = min(abs(delta) / scale, 1.0) * 0.85
    if alpha < 0.005:
        return "transparent"
    rgb = "37,99,235" if delta > 0 else "220,38,38"
    return f"rgba({rgb},{alpha:.3f})"


def _visible(text: str) -> str:
    """Token text for display: escaped, with newlines kept and an empty text made visible."""
    if text == "":
        return "&#8203;"  # zero-width space: the span still exists to hover
    return html.escape(text, quote=False)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #111; }
.doc { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.7;
       border: 1px solid #ddd; padding: 0.8em; margin: 0.5em 0 1.5em; }
.doc span { border-radius: 2px; }
.doc span:hover { outline: 1px solid #000; }
.legend { display: flex; align-items: center; gap: 0.6em; margin: 1em 0; }
.bar { width: 320px; height: 14px; border: 1px solid #999;
       background: linear-gradient(to right, rgba(220,38,38,0.85), #fff, rgba(37,99,235,0.85)); }
table.meta td { padding: 0 1em 0 0; }
h2 { font-size: 1.05em; margin-bottom: 0.2em; }
.stats { color: #555; font-size: 0.9em; }
"""


def render_html(docs: list[dict], args, base, ref, scale: float) -> str:
    esc = lambda s: html.escape(str(s), quote=True)  # noqa: E731
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>Token Δlog p report</title>", f"<style>{CSS}</style></head><body>",
        "<h1>Token Δlog p: reference − base</h1>",
        '<table class="meta">',
        f"<tr><td>base</td><td>{esc(base.path)} (step {esc(base.step)})</td></tr>",
        f"<tr><td>reference</td><td>{esc(ref.path)} (step {esc(ref.step)})</td></tr>",
        f"<tr><td>input</td><td>{esc(os.path.abspath(args.input))} ({len(docs)} documents)</td></tr>",
        f"<tr><td>ReMiT weight</td><td>clip(2·σ(Δ − mean<sub>doc</sub> Δ), 1 − ε, 1 + ε), ε = {esc(args.clip_eps)}</td></tr>",
        "</table>",
        (
            f'<div class="legend"><span>Δ = −{scale:.3g} (reference less confident)</span><div class="bar"></div>'
            f"<span>Δ = +{scale:.3g} (reference more confident)</span></div>"
        ),
        (
            '<p class="stats">Δ = log p<sub>ref</sub>(token) − log p<sub>base</sub>(token); colour saturates at '
            f"|Δ| = {scale:.3g}. The first token of a document has no prefix and is not scored. "
            "Hover a token for details.</p>"
        ),
    ]
    for d in docs:
        deltas = [t["delta"] for t in d["tokens"] if t["delta"] is not None]
        weights = [t["remit_weight"] for t in d["tokens"] if t["remit_weight"] is not None]
        eps = args.clip_eps
        stats = f"{len(d['tokens'])} tokens"
        if deltas:
            stats += (
                f"; mean Δ {sum(deltas) / len(deltas):+.4f}; mean weight {sum(weights) / len(weights):.4f}; "
                f"weight at 1−ε: {sum(w <= 1 - eps + 1e-6 for w in weights) / len(weights):.1%}, "
                f"at 1+ε: {sum(w >= 1 + eps - 1e-6 for w in weights) / len(weights):.1%}"
            )
        parts.append(f"<h2>Document {d['doc']}</h2><div class=\"stats\">{esc(stats)}</div><div class=\"doc\">")
        for t in d["tokens"]:
            tip = (
                f"token {json.dumps(t['token'], ensure_ascii=False)} (id {t['id']})\n"
                f"log p base: {_fmt(t['logp_base'])}\nlog p ref: {_fmt(t['logp_ref'])}\n"
                f"Δ: {_fmt(t['delta'])}\nReMiT weight: {'n/a' if t['remit_weight'] is None else format(t['remit_weight'], '.4f')}"
            )
            parts.append(
                f'<span style="background:{_colour(t["delta"], scale)}" title="{esc(tip)}">{_visible(t["token"])}</span>'
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "".join(parts)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


@exit_on_user_error
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.max_docs is not None and args.max_docs < 1:
        raise UserError(f"--max-docs must be >= 1, got {args.max_docs}", "pass a positive number")
    if not 0.0 <= args.clip_eps < 1.0:
        raise UserError(f"--clip-eps must be in [0, 1), got {args.clip_eps}", "the paper uses 0.2")
    if args.scale is not None and args.scale <= 0:
        raise UserError(f"--scale must be > 0, got {args.scale}", "pass a positive |Δ|")
    texts = read_texts(args.input, args.json_key, args.max_docs)  # bad input fails before any model work
    from megatron_midtrain.eval.checkpoint_logprobs import check_same_tokenizer, peek_checkpoint

    check_same_tokenizer([peek_checkpoint(args.base, "--base"), peek_checkpoint(args.ref, "--ref")], ["--base", "--ref"])

    from megatron_midtrain.utils.quiet import silence_known_warnings

    silence_known_warnings()
    import torch

    from megatron_midtrain.losses.remit import remit_token_weights
    from megatron_midtrain.eval.checkpoint_logprobs import load_checkpoint_logprobs

    t0 = time.perf_counter()
    base = load_checkpoint_logprobs(args.base, stride=args.stride)
    ref = load_checkpoint_logprobs(args.ref, stride=args.stride)
    check_same_tokenizer([base, ref], ["--base", "--ref"])
    tok = base.tokenizer
    print(f"loaded base {base.path} and reference {ref.path} in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)

    docs = []
    t0 = time.perf_counter()
    n_tokens = 0
    for i, text in enumerate(texts):
        ids = [int(x) for x in tok.tokenize(text)]
        if args.append_eod:
            ids.append(tok.eod)
        lp_base = base.token_logprobs(ids)
        lp_ref = ref.token_logprobs(ids)
        if lp_base:
            pb, pr = torch.tensor([lp_base]), torch.tensor([lp_ref])
            weights = remit_token_weights(pb, pr, torch.ones_like(pb, dtype=torch.bool), args.clip_eps, "sequence")[0].tolist()
        else:
            weights = []
        pieces = token_texts(tok, ids)
        tokens = []
        for t, (piece, tid) in enumerate(zip(pieces, ids)):
            if t == 0:
                tokens.append({"token": piece, "id": tid, "logp_base": None, "logp_ref": None, "delta": None, "remit_weight": None})
            else:
                b, r = lp_base[t - 1], lp_ref[t - 1]
                tokens.append({"token": piece, "id": tid, "logp_base": b, "logp_ref": r, "delta": r - b,
                               "remit_weight": weights[t - 1]})
        docs.append({"doc": i, "tokens": tokens})
        n_tokens += len(ids)
        el = time.perf_counter() - t0
        print(f"scored {i + 1}/{len(texts)} docs, {n_tokens} tokens, {n_tokens / max(el, 1e-9):.0f} tok/s",
              file=sys.stderr, flush=True)

    abs_deltas = sorted(abs(t["delta"]) for d in docs for t in d["tokens"] if t["delta"] is not None)
    if args.scale is not None:
        scale = args.scale
    elif abs_deltas and abs_deltas[-1] > 0:
        scale = abs_deltas[min(len(abs_deltas) - 1, math.ceil(0.95 * len(abs_deltas)) - 1)] or abs_deltas[-1]
    else:
        scale = 1.0
    os.makedirs(args.out, exist_ok=True)
    html_path = os.path.join(args.out, "report.html")
    jsonl_path = os.path.join(args.out, "tokens.jsonl")
    _write_atomic(jsonl_path, "".join(json.dumps(d["tokens"], ensure_ascii=False) + "\n" for d in docs))
    _write_atomic(html_path, render_html(docs, args, base, ref, scale))
    summary = {"docs": len(docs), "tokens": n_tokens, "scale": scale, "report": html_path, "tokens_jsonl": jsonl_path,
               "seconds": round(time.perf_counter() - t0, 3)}
    print(f"wrote {html_path} and {jsonl_path}: {len(docs)} docs, {n_tokens} tokens")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
