"""Tokenizers usable by megatron-core datasets, plus SentencePiece training.

megatron-core 0.16.1 datasets only read a few tokenizer attributes: ``vocab_size``,
``eod``, ``pad`` (and ``eos``/``special_tokens_dict`` for a pad collision check), and
``unique_identifiers`` (a JSON-able dict hashed into the dataset cache key). The classes
here subclass the legacy ``megatron.core.datasets.megatron_tokenizer.MegatronLegacyTokenizer``
ABC (implementing its abstract ``tokenize``, ``vocab``, ``inv_vocab``, ``vocab_size``),
without calling its ``__init__`` (which only logs a deprecation warning).

Backends:

* :class:`SentencePieceTokenizer` -- a SentencePiece ``.model`` file.
* :class:`HFTokenizer` -- a Hugging Face ``tokenizer.json`` (file, or a folder holding
  one), via the optional ``tokenizers`` package (``pip install -e .[hf]``).

:func:`load_tokenizer` picks the backend from the path.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Iterable

from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

from megatron_midtrain.errors import UserError

# Fixed special-token ids for tokenizers trained by :func:`train_sentencepiece`.
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
PAD_PIECE, BOS_PIECE, EOS_PIECE, UNK_PIECE = "<pad>", "<s>", "</s>", "<unk>"

# Token strings searched (in order) in HF vocabularies.
_HF_EOD_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>")
_HF_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>", "[BOS]")
_HF_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


class MidtrainTokenizer(MegatronLegacyTokenizer):
    """Common base: identity for megatron's dataset cache hash, pickling by path."""

    path: str

    def __init__(self, path: str, **options) -> None:  # noqa: D107 - no super().__init__ on purpose
        self.path = os.path.abspath(path)
        self._options = dict(options)
        self.unique_identifiers = OrderedDict()
        self.unique_identifiers["class"] = type(self).__name__
        self.unique_identifiers["tokenizer_path"] = [self.path]
        for key, value in options.items():
            self.unique_identifiers[key] = str(value)

    # Re-load from the path when pickled (e.g. into DataLoader workers).
    def __getstate__(self):
        return {"path": self.path, "options": self._options}

    def __setstate__(self, state):
        self.__init__(state["path"], **state["options"])

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def special_tokens_dict(self) -> dict:
        out = {"eos_token": self.eod}
        if self.bos is not None and self.bos >= 0:
            out["bos_token"] = self.bos
        if self.pad is not None and self.pad >= 0:
            out["pad_token"] = self.pad
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(MidtrainTokenizer):
    """A SentencePiece ``.model``. No BOS/EOS is added by :meth:`tokenize`; EOD is ``</s>``."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as err:
            raise UserError(
                f"cannot load SentencePiece model {self.path}: {err}",
                "point --tokenizer/tokenizer path at a valid SentencePiece .model file",
            ) from None
        self._vocab_size = int(self._sp.get_piece_size())
        eos = int(self._sp.eos_id())
        if eos < 0:
            piece_eos = self._sp.piece_to_id(EOS_PIECE)
            eos = piece_eos if piece_eos != self._sp.unk_id() else -1
        if eos < 0:
            raise UserError(
                f"SentencePiece model {self.path} has no end-of-document token (</s>)",
                "train it with eos_id set (train_sentencepiece does this)",
            )
        self._eod = eos
        self._bos = int(self._sp.bos_id())
        self._pad = int(self._sp.pad_id())
        self._vocab = None

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = {self._sp.id_to_piece(i): i for i in range(self._vocab_size)}
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: p for p, i in self.vocab.items()}

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def bos(self) -> int | None:
        return self._bos if self._bos >= 0 else None

    @property
    def pad(self) -> int:
        """Pad id, or -1 when the model has none (megatron-core's own 'no pad' value)."""
        return self._pad


class HFTokenizer(MidtrainTokenizer):
    """A Hugging Face ``tokenizer.json`` via the ``tokenizers`` package.

    EOD is the first of ``</s>``, ``<|endoftext|>``, ... found in the vocabulary (or ``eod_token``).
    """

    def __init__(self, path: str, eod_token: str | None = None) -> None:
        options = {"eod_token": eod_token} if eod_token else {}
        super().__init__(path, **options)
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError(
                f"tokenizer {self.path} needs the 'tokenizers' package, which is not installed",
                "pip install -e .[hf]  (or: pip install tokenizers)",
            ) from None
        try:
            self._tok = Tokenizer.from_file(self.path)
        except Exception as err:  # the Rust side raises a plain Exception
            raise UserError(
                f"cannot load Hugging Face tokenizer {self.path}: {str(err).splitlines()[0] if str(err) else err!r}",
                "point the tokenizer path at a valid tokenizer.json",
            ) from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        candidates = (eod_token,) if eod_token else _HF_EOD_CANDIDATES
        self._eod = next((vocab[t] for t in candidates if t in vocab), None)
        if self._eod is None:
            raise UserError(
                f"Hugging Face tokenizer {self.path} has no end-of-document token "
                f"(looked for {', '.join(candidates)})",
                "add one of those tokens to the tokenizer",
            )
        self._bos = next((vocab[t] for t in _HF_BOS_CANDIDATES if t in vocab), None)
        self._pad = next((vocab[t] for t in _HF_PAD_CANDIDATES if t in vocab), -1)
        self._vocab = vocab

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: t for t, i in self._vocab.items()}

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def bos(self) -> int | None:
        return self._bos

    @property
    def pad(self) -> int:
        """Pad id, or -1 when the tokenizer has none (megatron-core's own 'no pad' value)."""
        return self._pad


def resolve_tokenizer_path(path: str | os.PathLike) -> tuple[str, str]:
    """``(kind, file)`` for a tokenizer path; kind is ``"sentencepiece"`` or ``"hf"``."""
    p = os.path.abspath(os.fspath(path))
    fix = "pass a SentencePiece .model file, a tokenizer.json, or a folder containing tokenizer.json"
    if os.path.isdir(p):
        cand = os.path.join(p, "tokenizer.json")
        if os.path.isfile(cand):
            return "hf", cand
        models = sorted(f for f in os.listdir(p) if f.endswith(".model"))
        if len(models) == 1:
            return "sentencepiece", os.path.join(p, models[0])
        raise UserError(f"tokenizer folder {p} has no tokenizer.json (or single .model file)", fix)
    if not os.path.exists(p):
        raise UserError(f"tokenizer path {p} does not exist", fix)
    if not os.access(p, os.R_OK):
        raise UserError(f"tokenizer path {p} is not readable", "fix its permissions")
    if p.endswith(".json"):
        return "hf", p
    if p.endswith(".model"):
        return "sentencepiece", p
    raise UserError(f"cannot tell the tokenizer type of {p}", fix)


def load_tokenizer(path: str | os.PathLike) -> MidtrainTokenizer:
    """Load a tokenizer: ``.model`` -> SentencePiece; ``*.json`` or folder with tokenizer.json -> HF."""
    kind, file = resolve_tokenizer_path(path)
    if kind == "hf":
        return HFTokenizer(file)
    return SentencePieceTokenizer(file)


def train_sentencepiece(
    text: str | os.PathLike | Iterable[str],
    model_prefix: str | os.PathLike,
    vocab_size: int = 2048,
    model_type: str = "bpe",
    num_threads: int = 2,
    character_coverage: float = 1.0,
    max_sentence_length: int = 16384,
) -> str:
    """Train a SentencePiece model and return the path of ``<model_prefix>.model``.

    ``text`` is a file path (one sentence/paragraph per line) or an iterable of strings
    (each may contain newlines; every line becomes one training sentence). Special ids are
    fixed: pad=0 ``<pad>``, bos=1 ``<s>``, eos/EOD=2 ``</s>``, unk=3 ``<unk>``. Digits are
    split, unknown characters fall back to bytes, and text is not normalized (exact round
    trip). Training sees every sentence, unshuffled, with a fixed thread count, so the
    same input gives the same model.
    """
    import sentencepiece as spm

    kwargs = dict(
        model_prefix=os.fspath(model_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        pad_piece=PAD_PIECE, bos_piece=BOS_PIECE, eos_piece=EOS_PIECE, unk_piece=UNK_PIECE,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=num_threads,
        max_sentence_length=max_sentence_length,
        minloglevel=2,
    )
    if isinstance(text, (str, os.PathLike)):
        path = os.fspath(text)
        if not os.path.isfile(path):
            raise UserError(f"tokenizer training file {path} does not exist", "pass an existing text file")
        spm.SentencePieceTrainer.train(input=path, **kwargs)
    else:
        def sentences():
            for doc in text:
                for line in doc.split("\n"):
                    if line.strip():
                        yield line

        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), **kwargs)
    return os.fspath(model_prefix) + ".model"


def tokenizer_fingerprint(tokenizer) -> str:
    """Stable id of a tokenizer's vocabulary (pieces and ids), independent of its file path.

    Stored in checkpoints so that a reference model trained with another tokenizer is refused.
    """
    import hashlib
    import json

    items = sorted((str(piece), int(idx)) for piece, idx in tokenizer.vocab.items())
    digest = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
    return f"{type(tokenizer).__name__}:{tokenizer.vocab_size}:{digest}"
