"""Training samples -> entropy buckets (megatron_midtrain.rl.sample_entropy), on the demo data.

Fake entropy indexes hold entropy[i] = token id at i and buckets[i] = token id % 3, so the
lookup for a sample must reproduce the sample's own input tokens. Single process, no model.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from megatron_midtrain.errors import UserError
from megatron_midtrain.rl.entropy import FORMAT, dataset_alignment
from megatron_midtrain.rl.sample_entropy import NO_BUCKET, SampleEntropy

TOKENIZER_ID = "demo-tokenizer"


def _fake_index(out: str, prefix: str) -> str:
    """An entropy index of ``prefix`` that passes check_entropy_alignment: entropy = token id."""
    os.makedirs(out)
    info = dataset_alignment(prefix)
    tokens = np.memmap(prefix + ".bin", dtype=np.dtype(info["token_dtype"]), mode="r")
    np.save(os.path.join(out, "entropy.npy"), tokens.astype(np.float32))
    np.save(os.path.join(out, "buckets.npy"), (tokens % 3).astype(np.uint8))
    with open(os.path.join(out, "meta.json"), "w") as fh:
        json.dump({"format": FORMAT, "complete": True, "dataset": info, "tokenizer": TOKENIZER_ID}, fh)
    return out


def _build(root, overrides: list[str], global_batch: int):
    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.training.data import build_data, prepare_sources

    cfg = load_config(["method=ntp", f"run.dir={root}"] + overrides)
    return cfg, build_data(cfg, prepare_sources(cfg), global_batch)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Blended demo data (prose + math, 4096-token samples), a single-prefix GPTDataset, and a
    fake entropy index per prefix. megatron's blend needs a process group: one gloo rank, only
    while the datasets are built."""
    import torch.distributed as dist

    from megatron_midtrain.data.demo import ensure_demo_assets

    root = tmp_path_factory.mktemp("sample_entropy")
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method=f"file://{root / 'pg'}", rank=0, world_size=1)
    try:
        blend_cfg, blended = _build(root / "blended", ["data.seq_length=4096", "train.max_steps=2"], 64)
        assets = ensure_demo_assets()
        _, single = _build(root / "single", [f"data.paths=[{assets.math_prefix}]", f"data.tokenizer={assets.tokenizer_path}",
                                             "data.seq_length=128", "train.max_steps=4"], 128)
    finally:
        if owned:
            dist.destroy_process_group()
    prose, math = blended.prefixes
    dirs = {p: _fake_index(str(root / f"entropy_{os.path.basename(p)}"), p) for p in (prose, math)}
    return {"cfg": blend_cfg, "blended": blended, "single": single, "prose": prose, "math": math, "dirs": dirs,
            "tokenizer": assets.tokenizer_path}


def _expect_tokens(dataset, se: SampleEntropy, ids) -> None:
    got_b, got_e = se.buckets(ids), se.entropy(ids)
    assert got_b.shape == got_e.shape == (len(ids), se.seq_length)
    assert got_b.dtype == np.uint8 and got_e.dtype == np.float32
    for k, i in enumerate(ids):
        tokens = dataset[int(i)]["tokens"].numpy()
        np.testing.assert_array_equal(got_b[k], tokens % 3)
        np.testing.assert_array_equal(got_e[k], tokens.astype(np.float32))


def test_blended_samples_get_the_entropy_of_their_input_tokens(data):
    from megatron.core.datasets.blended_dataset import BlendedDataset

    from megatron_midtrain.training.data import StepBatches

    train = data["blended"].train
    assert isinstance(train, BlendedDataset) and len(train.datasets) == 2
    se = SampleEntropy(train, [data["prose"], data["math"]], [data["dirs"][data["prose"]], data["dirs"][data["math"]]],
                       tokenizer_id=TOKENIZER_ID)
    assert se.seq_length == 4096
    ids = np.arange(len(train))
    assert set(np.asarray(train.dataset_index[ids]).tolist()) == {0, 1}  # both prefixes are looked up
    _expect_tokens(train, se, ids)
    # The ids a training batch carries (a torch tensor), against that batch's own tokens and labels.
    batch = next(StepBatches(train, 64, 4, dp_rank=1, dp_size=2).iterator(step=1))
    b = se.buckets(batch["sample_ids"])
    np.testing.assert_array_equal(b, batch["tokens"].numpy() % 3)
    # position t is about label t = input t+1: the bucket of the token that precedes the label
    np.testing.assert_array_equal(b[:, 1:], batch["labels"][:, :-1].numpy() % 3)


def test_lookup_of_64_samples_of_4096_tokens_is_fast(data):
    train = data["blended"].train
    se = SampleEntropy(train, [data["prose"], data["math"]], [data["dirs"][data["prose"]], data["dirs"][data["math"]]])
    ids = torch.arange(64)
    se.buckets(ids)  # warm the page cache
    start = time.perf_counter()
    b, e = se.buckets(ids), se.entropy(ids)
    seconds = time.perf_counter() - start
    assert b.shape == e.shape == (64, 4096) and not (b == NO_BUCKET).any() and not np.isnan(e).any()
    assert seconds < 1.0, f"buckets + entropy of 64 x 4096 tokens took {seconds:.2f}s"


def test_single_gpt_dataset(data):
    from megatron.core.datasets.gpt_dataset import GPTDataset

    train = data["single"].train
    assert isinstance(train, GPTDataset) and len(train) >= 512
    se = SampleEntropy(train, [data["math"]], [data["dirs"][data["math"]]], tokenizer_id=TOKENIZER_ID)
    rng = np.random.default_rng(0)
    ids = np.concatenate([[0, len(train) - 1], rng.choice(len(train), 300, replace=False)])
    _expect_tokens(train, se, ids)
    with pytest.raises(IndexError):
        se.buckets([len(train)])


def test_padded_positions_get_no_bucket(data):
    """A validation split that keeps its last partial sample: megatron pads it, and exactly the
    positions it masks out of the loss get bucket 255 / entropy NaN."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_midtrain.data.tokenizer import load_tokenizer

    config = GPTDatasetConfig(random_seed=1, sequence_length=128, blend=([data["math"]], None), split="90,10,0",
                              tokenizer=load_tokenizer(data["tokenizer"]), reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
                              drop_last_partial_validation_sequence=False, path_to_cache=None, mmap_bin_files=True)
    _, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True, config).build()
    se = SampleEntropy(valid, [data["math"]], [data["dirs"][data["math"]]])
    ids = np.arange(len(valid))
    b, e = se.buckets(ids), se.entropy(ids)
    padded = np.where((b == NO_BUCKET).any(axis=1))[0]
    assert len(padded) == 1
    for k in ids:
        sample = valid[int(k)]
        masked = sample["loss_mask"].numpy() == 0
        np.testing.assert_array_equal(b[k] == NO_BUCKET, masked)
        np.testing.assert_array_equal(np.isnan(e[k]), masked)
        np.testing.assert_array_equal(b[k][~masked], sample["tokens"].numpy()[~masked] % 3)


def _one_line(excinfo, *needles) -> None:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg and "fix:" in msg, msg
    for n in needles:
        assert n in msg, msg


def test_mismatched_or_missing_indexes_are_refused(data):
    train, prose, math, dirs = data["blended"].train, data["prose"], data["math"], data["dirs"]
    with pytest.raises(UserError) as err:  # swapped: each index was built for the other prefix
        SampleEntropy(train, [prose, math], [dirs[math], dirs[prose]])
    _one_line(err, "does not line up", dirs[math])
    with pytest.raises(UserError) as err:
        SampleEntropy(train, [prose, math], [dirs[prose]])
    _one_line(err, "1 entropy index dirs", "2 dataset prefixes")
    with pytest.raises(UserError) as err:  # the blend also draws from math, which has no index here
        SampleEntropy(train, [prose], [dirs[prose]])
    _one_line(err, "has no entropy index", math)
    with pytest.raises(UserError) as err:
        SampleEntropy(train, [prose, math], [dirs[prose], dirs[math]], tokenizer_id="another-tokenizer")
    _one_line(err, "tokenizer", TOKENIZER_ID)
