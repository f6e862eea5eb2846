"""Entropy buckets (and values) of training samples, looked up in the per-prefix entropy index.

The entropy index (:mod:`megatron_midtrain.rl.entropy`) is aligned 1:1 with a dataset's ``.bin``
tokens; training sees samples of megatron-core's ``GPTDataset`` / ``BlendedDataset``. This module
maps a global training sample id to the ``.bin`` positions of its tokens and reads the index
there.

How a sample is mapped (megatron-core's own bookkeeping, not a re-derivation)
-----------------------------------------------------------------------------
* ``BlendedDataset``: ``dataset_index[id]`` picks the member ``GPTDataset`` and
  ``dataset_sample_index[id]`` the sample inside it (exactly what ``BlendedDataset.__getitem__``
  does).
* ``GPTDataset``: megatron's own ``GPTDataset._query_document_sample_shuffle_indices`` is run
  against a view of the dataset whose ``.dataset`` (the ``IndexedDataset``) is replaced by
  :class:`_PositionReader`: its ``get(sequence, offset, length)`` returns the global token
  positions ``sequence_pointers[sequence] / dtype_size + offset + arange(length)`` instead of the
  tokens. So the shuffle index, the sample index (document index + offset of each sample
  boundary), the document index, ``add_extra_token_to_sequence`` and the padding are all megatron's;
  the view's pad id is -1, which marks padded positions. The view is checked once against the
  real tokens of sample 0 of each dataset, so a change in megatron's query logic fails loudly.

Position ``t`` of a training sample has input ``tokens[t]`` and label ``tokens[t+1]`` of the
``seq_length + 1`` tokens megatron draws; it gets the entropy/bucket stored at the ``.bin``
position of ``tokens[t]``: the base model's uncertainty about the token that follows it, i.e.
about the label. Where the sample crosses a document boundary, the input is the previous document's
last token (EOD) and the stored value is the base model's distribution after that EOD in its own
document. Positions whose input or label is padding (no dataset token) get bucket
:data:`NO_BUCKET` (255) and entropy NaN.
"""

from __future__ import annotations

import os

import numpy as np

from megatron_midtrain.errors import UserError
from megatron_midtrain.rl.entropy import open_entropy_index

#: Bucket of a position with no dataset token (padding).
NO_BUCKET = 255


class _PositionReader:
    """Stand-in for a GPTDataset's ``IndexedDataset``: ``get`` returns the global ``.bin`` token
    positions (int64) of the requested piece of a sequence instead of its tokens."""

    def __init__(self, indexed):
        index = indexed.index
        # sequence_pointers are byte offsets into the .bin; the entropy index counts tokens.
        self.starts = np.asarray(index.sequence_pointers, dtype=np.int64) // int(index.dtype_size)
        self.lengths = np.asarray(index.sequence_lengths, dtype=np.int64)

    def get(self, idx, offset: int = 0, length=None) -> np.ndarray:
        offset = int(offset)
        if length is None:
            length = int(self.lengths[idx]) - offset
        start = int(self.starts[idx]) + offset
        return np.arange(start, start + int(length), dtype=np.int64)


class _PositionView:
    """A GPTDataset seen through :class:`_PositionReader`: megatron's own sample query, run on this
    view, yields the ``.bin`` positions of a sample's tokens, -1 where megatron pads."""

    def __init__(self, gpt):
        self._gpt = gpt
        self.dataset = _PositionReader(gpt.dataset)
        self._pad_token_id = -1

    def __getattr__(self, name):  # everything else (indices, config) is the real dataset's
        return getattr(self._gpt, name)

    def positions(self, sample: int) -> np.ndarray:
        """``[seq_length + add_extra_token]`` int64 positions (-1 = padding) of ``sample``."""
        text, _ = type(self._gpt)._query_document_sample_shuffle_indices(self, int(sample))
        return text


def _gpt_members(train_dataset) -> list:
    """The GPTDatasets behind ``train_dataset`` (a BlendedDataset's members, or itself)."""
    members = getattr(train_dataset, "datasets", None)
    return list(members) if members is not None else [train_dataset]


def _blend_indices(blended) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index) of a BlendedDataset, loaded as its __getitem__ does
    when megatron deferred them (``defer_npy_index_mmap``)."""
    if blended.dataset_index is None:
        blended.dataset_index = np.load(blended.path_to_dataset_index, allow_pickle=True, mmap_mode="r")
        blended.dataset_sample_index = np.load(blended.path_to_dataset_sample_index, allow_pickle=True,
                                               mmap_mode="r")
    return blended.dataset_index, blended.dataset_sample_index


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(os.fspath(a)) == os.path.realpath(os.fspath(b))


class SampleEntropy:
    """Entropy buckets (and values) of training samples, from one entropy index per dataset prefix."""

    def __init__(self, train_dataset, prefixes: list[str], entropy_dirs: list[str], tokenizer_id: str | None = None):
        prefixes, entropy_dirs = [os.fspath(p) for p in prefixes], [os.fspath(d) for d in entropy_dirs]
        if len(entropy_dirs) != len(prefixes):
            raise UserError(f"{len(entropy_dirs)} entropy index dirs given for {len(prefixes)} dataset prefixes "
                            f"({', '.join(prefixes)})",
                            "give one entropy dir (tools/preprocess_entropy.py --output) per data path, in the same order")
        # Every index is checked, also one whose dataset the training split happens not to use.
        opened = [open_entropy_index(d, p, tokenizer_id) for d, p in zip(entropy_dirs, prefixes)]

        self.train_dataset = train_dataset
        self._blended = getattr(train_dataset, "datasets", None) is not None
        self._views, self._entropy, self._buckets = [], [], []
        for gpt in _gpt_members(train_dataset):
            path = getattr(gpt, "dataset_path", None) or gpt.dataset.path_prefix
            match = [i for i, p in enumerate(prefixes) if _same_path(p, path)]
            if not match:
                raise UserError(f"training dataset {path} has no entropy index (entropy dirs were given for "
                                f"{', '.join(prefixes) or 'no prefix'})",
                                "give one entropy dir per data path, in the order of data.paths")
            entropy, buckets, _ = opened[match[0]]
            view = _PositionView(gpt)
            self._check_view(view, gpt)
            self._views.append(view)
            self._entropy.append(entropy)
            self._buckets.append(buckets)
        config = self._views[0].config
        self.seq_length = int(config.sequence_length)
        self._extra = bool(config.add_extra_token_to_sequence)

    @staticmethod
    def _check_view(view: _PositionView, gpt) -> None:
        """Sample 0 through the view must read the very tokens megatron itself returns."""
        if len(gpt) == 0:
            return
        want, _ = gpt._query_document_sample_shuffle_indices(0)
        pos = view.positions(0)
        bin_tokens = np.memmap(gpt.dataset.path_prefix + ".bin", dtype=gpt.dataset.index.dtype, mode="r")
        real = pos >= 0
        if pos.shape != want.shape or not np.array_equal(bin_tokens[pos[real]].astype(np.int64), want[real]):
            raise RuntimeError(f"sample->token mapping of {gpt.dataset.path_prefix} disagrees with megatron-core's "
                               "GPTDataset (has _query_document_sample_shuffle_indices changed?)")

    def __len__(self) -> int:
        return len(self.train_dataset)

    def locate(self, sample_ids) -> tuple[np.ndarray, np.ndarray]:
        """``(member [n] int64, positions [n, seq_length] int64)``: which GPTDataset (index into the
        blend's ``datasets``; 0 for a plain GPTDataset) and the ``.bin`` position of each training
        position's input token; -1 where the input or the label is padding."""
        if hasattr(sample_ids, "detach"):  # torch tensor (e.g. batch["sample_ids"])
            sample_ids = sample_ids.detach().cpu().numpy()
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        size = len(self.train_dataset)
        if ids.size and (ids.min() < 0 or ids.max() >= size):
            raise IndexError(f"sample ids must lie in [0, {size}), got {ids.min()}..{ids.max()}")
        if self._blended:
            dataset_index, dataset_sample_index = _blend_indices(self.train_dataset)
            member = np.asarray(dataset_index[ids], dtype=np.int64)
            local = np.asarray(dataset_sample_index[ids], dtype=np.int64)
        else:
            member, local = np.zeros_like(ids), ids
        width = self.seq_length + int(self._extra)
        drawn = np.empty((ids.size, width), dtype=np.int64)
        for k, (m, j) in enumerate(zip(member.tolist(), local.tolist())):
            drawn[k] = self._views[m].positions(j)
        if self._extra:  # input tokens = drawn[:-1], labels = drawn[1:]
            pos = drawn[:, :-1].copy()
            pos[drawn[:, 1:] < 0] = -1
        else:  # megatron rolls the labels and pads the last one
            pos = drawn.copy()
            pos[:, -1] = -1
        return member, pos

    def _gather(self, sample_ids, tables: list, dtype, fill) -> np.ndarray:
        member, pos = self.locate(sample_ids)
        out = np.full(pos.shape, fill, dtype=dtype)
        for m in np.unique(member).tolist():
            rows = member == m
            p = pos[rows]
            real = p >= 0
            block = np.full(p.shape, fill, dtype=dtype)
            block[real] = tables[m][p[real]]
            out[rows] = block
        return out

    def buckets(self, sample_ids) -> np.ndarray:
        """``[n, seq_length]`` uint8: the entropy bucket of each label position (255 = no token)."""
        return self._gather(sample_ids, self._buckets, np.uint8, NO_BUCKET)

    def entropy(self, sample_ids) -> np.ndarray:
        """``[n, seq_length]`` float32: the base model's entropy about each label (NaN = no token)."""
        return self._gather(sample_ids, self._entropy, np.float32, np.nan)
