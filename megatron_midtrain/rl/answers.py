r"""Where a response's answer is and how two answers compare (``method.answer_format``,
``method.answer_regex``, ``method.answer_normalize``); pure functions on strings.

* :func:`extract_answer` — the raw answer of a response in one of the formats
  ``answer_tag``, ``boxed``, ``answer_is``, ``plain``, ``gsm8k`` and ``regex``; ``None`` = missing.
* :func:`reference_answer` — the ground truth of a problem: a GSM8K solution ("... #### 72")
  counts by the text after its last ``####``, for every format.
* :func:`normalize_answer` — the exact-match comparison key, ``none`` (default) or ``numeric``
  (:func:`numeric_value`).

The **last** answer occurrence in a response counts, for every format (the model may restate
or correct itself while reasoning; verl's gsm8k/math scorers also take the last match).
"""

from __future__ import annotations

import re
from fractions import Fraction

from megatron_midtrain.config.rl_rules import ANSWER_NORMALIZE_MODES, PROMPT_ANSWER_FORMATS

ANSWER_FORMATS = PROMPT_ANSWER_FORMATS
NORMALIZE_MODES = ANSWER_NORMALIZE_MODES
#: GSM8K's final-answer marker: a solution ends with "#### 72".
GSM8K_MARKER = "####"

_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_IS_RE = re.compile(r"[Tt]he (?:final )?answer is[:\s]*([^\n]*)")
_BOXED_OPENERS = ("\\boxed{", "\\fbox{")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, else None."""
    best = -1
    opener_len = 0
    for opener in _BOXED_OPENERS:
        i = text.rfind(opener)
        if i > best:
            best, opener_len = i, len(opener)
    if best < 0:
        return None
    depth = 1
    start = best + opener_len
    for j in range(start, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:j]
    return None  # unbalanced: the answer was cut off (e.g. by the length limit)


def _after_last_marker(text: str) -> str | None:
    """The rest of the line after the last ``####`` (unstripped), or None without one."""
    i = text.rfind(GSM8K_MARKER)
    if i < 0:
        return None
    return text[i + len(GSM8K_MARKER):].split("\n", 1)[0]


def _last_regex_group(text: str, answer_regex) -> str | None:
    """Group 1 of the last match of ``answer_regex`` (``""`` when that group did not take part)."""
    if answer_regex is None:
        raise ValueError("answer_format='regex' needs answer_regex (a pattern with a capture group)")
    pattern = re.compile(answer_regex)  # re caches compiled patterns
    if pattern.groups < 1:
        raise ValueError(f"answer_regex={pattern.pattern!r} has no capture group")
    last = None
    for last in pattern.finditer(text):
        pass
    if last is None:
        return None
    group = last.group(1)
    return "" if group is None else group


def extract_answer(text: str, answer_format: str = "answer_tag", answer_regex=None) -> str | None:
    r"""The raw (unstripped) answer string of a response, or ``None`` when there is none.

    * ``answer_tag``: the content of the last complete ``<answer>…</answer>`` pair. An opening
      tag without a closing one (truncated generation) counts as missing.
    * ``boxed``: the content of the last ``\boxed{…}`` (``\fbox{…}`` also accepted), with nested
      braces balanced; an unbalanced one counts as missing.
    * ``answer_is``: the rest of the line after the last "The answer is" (the demo corpus's
      arithmetic format), with one trailing period removed.
    * ``plain``: the whole response (for base models without an answer format).
    * ``gsm8k``: the rest of the line after the last ``####`` (GSM8K's "#### 72"); no ``####``
      counts as missing, ``####`` followed by nothing as empty.
    * ``regex``: capture group 1 of the **last** match of ``answer_regex`` (a Python regex,
      compiled as given: use inline flags such as ``(?i)`` or ``(?s)``). No match counts as
      missing; a match whose group 1 did not take part gives ``""`` (empty). The last match,
      not the first, as for every other format and as verl's and TRL's math scorers do: a
      response may restate the question's numbers or correct itself before its final answer.

    Returns ``""``-like strings as they are: the caller distinguishes empty from missing.
    """
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format={answer_format!r} is not one of {ANSWER_FORMATS}")
    if text is None:
        return None
    if answer_format == "answer_tag":
        matches = _ANSWER_TAG_RE.findall(text)
        return matches[-1] if matches else None
    if answer_format == "boxed":
        return _last_boxed(text)
    if answer_format == "plain":
        return text
    if answer_format == "gsm8k":
        return _after_last_marker(text)
    if answer_format == "regex":
        return _last_regex_group(text, answer_regex)
    matches = _ANSWER_IS_RE.findall(text)
    if not matches:
        return None
    ans = matches[-1].rstrip()
    return ans.removesuffix(".")


_NUM_CLEAN_RE = re.compile(r"[,\s$]")
#: ``numeric``: a plain number (optional sign, digits with optional ``,`` thousands groups of
#: three, optional decimals and exponent) or an integer fraction ``a/b``.
_NUMBER_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][+-]?\d+)?")
_FRACTION_RE = re.compile(r"[+-]?\d+/\d+")


def reference_answer(answer) -> str:
    r"""The ground truth of a problem: the text after the last ``####`` (to the end of that line,
    stripped) when ``answer`` holds one, as in GSM8K's solutions ("... so 48 + 24 = 72.\n#### 72"),
    else ``str(answer)`` unchanged. Applied to the reference for every ``answer_format``, so raw
    GSM8K JSONL works as it is."""
    text = str(answer)
    after = _after_last_marker(text)
    return text if after is None else after.strip()


def _numeric_strip(ans: str) -> str:
    r"""``numeric``'s clean-up: whitespace, one trailing ``.``, a leading ``$`` (or LaTeX ``\$``,
    after an optional sign), and a Unicode minus sign."""
    s = ans.strip().replace("\u2212", "-")
    if s.endswith("."):
        s = s[:-1].rstrip()
    sign = s[:1] if s[:1] in "+-" else ""
    body = s[len(sign):].lstrip()
    for dollar in ("\\$", "$"):
        if body.startswith(dollar):
            body = body[len(dollar):].lstrip()
            break
    return sign + body


def numeric_value(ans: str) -> Fraction | None:
    """The exact value of ``ans`` under ``answer_normalize=numeric`` (None when it is not a number):
    ``"1,000"`` → 1000, ``"$5."`` → 5, ``"5.0"`` → 5, ``"-3.00"`` → -3, ``"1/2"`` → 1/2.
    Commas count only as thousands separators (``"1,5"`` is not a number)."""
    s = _numeric_strip(ans)
    if _FRACTION_RE.fullmatch(s):
        num, den = s.split("/")
        return Fraction(int(num), int(den)) if int(den) else None
    if not _NUMBER_RE.fullmatch(s) or not any(c.isdigit() for c in s.split("e")[0].split("E")[0]):
        return None
    return Fraction(s.replace(",", ""))  # exact: Fraction("0.1") == 1/10, no float rounding


def normalize_answer(ans: str, mode: str = "none") -> str:
    r"""Canonical form for exact match (two answers are equal when their forms are).

    * ``none`` (default; the comparison before ``answer_normalize`` existed): strip whitespace,
      ``$``, every ``,`` and a trailing period; numbers become their exact rational value
      (``"4.0"`` → ``"4"``, ``"1/2"`` → ``"1/2"``, ``"0.5"`` → ``"1/2"``); anything else is
      compared case-sensitively after whitespace collapsing (without that stripping).
    * ``numeric``: strip whitespace, one trailing ``.``, a leading ``$`` (or ``\$``) and ``,``
      thousands separators, then compare numbers by exact value (:func:`numeric_value`, with
      :class:`fractions.Fraction`: ``1,000`` = ``1000``, ``$5`` = ``5``, ``5.0`` = ``5``,
      ``-3`` = ``-3.00``); a non-number is compared as the stripped string (whitespace
      collapsed). Stricter about commas than ``none`` (``1,5`` is not 15).
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"answer normalisation {mode!r} is not one of {NORMALIZE_MODES}")
    if mode == "numeric":
        value = numeric_value(ans)
        return " ".join(_numeric_strip(ans).split()) if value is None else str(value)
    s = ans.strip().rstrip(".").strip()
    compact = _NUM_CLEAN_RE.sub("", s)
    try:
        value = Fraction(compact)
    except (ValueError, ZeroDivisionError):
        return " ".join(s.split())
    return str(value)
