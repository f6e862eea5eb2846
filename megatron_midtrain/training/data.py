"""Training data: megatron-core GPT + blended datasets, and a resumable batch order.

megatron-core builds the (cached) document/sample/shuffle indices and the
weighted blend; we only decide which global sample ids form each optimizer
step. Step ``s`` always consumes samples ``[s*G, (s+1)*G)`` of the training
split (G = global batch in samples), split contiguously across data-parallel
ranks, so the data order is independent of TP/PP/DP and resuming needs only the
step number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_midtrain.errors import UserError


@dataclass
class DataBundle:
    tokenizer: object
    train: object
    valid: object | None
    prefixes: list[str]
    weights: list[float] | None


def resolve_sources(cfg) -> tuple[str, list[str], list[float] | None]:
    """(tokenizer path, dataset prefixes, weights) from the config, building the demo assets if needed."""
    data = cfg.data
    if data.paths:
        if not data.tokenizer:
            raise UserError("data.paths is set but data.tokenizer is empty", "set data.tokenizer=PATH (the tokenizer used by tools/preprocess_data.py)")
        weights = list(data.weights) if data.weights else None
        if weights is not None and len(weights) != len(data.paths):
            raise UserError(f"data.weights has {len(weights)} entries for {len(data.paths)} data.paths", "give one weight per path")
        return data.tokenizer, list(data.paths), weights
    from megatron_midtrain.data.demo import default_cache_dir, ensure_demo_assets

    assets = ensure_demo_assets(cfg.run.cache_dir or default_cache_dir())
    w = data.demo_math_weight
    # megatron's blend rejects zero weights: leave such datasets out.
    pairs = [(p, x) for p, x in ((str(assets.prose_prefix), 1.0 - w), (str(assets.math_prefix), w)) if x > 0]
    return data.tokenizer or str(assets.tokenizer_path), [p for p, _ in pairs], [x for _, x in pairs]


def prepare_sources(cfg) -> tuple[object, list[str], list[float] | None]:
    """Tokenizer + validated dataset prefixes. Reads only; nothing is written to the run dir."""
    from megatron_midtrain.data.indexing import validate_indexed_dataset
    from megatron_midtrain.data.tokenizer import load_tokenizer

    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if rank0:
        tok_path, prefixes, weights = resolve_sources(cfg)
    from megatron_midtrain.training.distributed import broadcast_object

    tok_path, prefixes, weights = broadcast_object((tok_path, prefixes, weights) if rank0 else None)
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}",
            "use the model's tokenizer or raise model.vocab_size",
        )
    for prefix in prefixes:
        validate_indexed_dataset(prefix, vocab_size=cfg.model.vocab_size)
    return tokenizer, prefixes, weights


def build_data(cfg, sources, global_batch_size: int) -> DataBundle:
    """megatron-core GPT/blended datasets; their index cache goes under the run directory."""
    tokenizer, prefixes, weights = sources
    train_samples = cfg.train.max_steps * global_batch_size
    valid_samples = max(1, cfg.train.eval_batches) * global_batch_size
    run_cache = os.path.join(cfg.run.dir, "data_index_cache")
    ds_config = GPTDatasetConfig(
        random_seed=cfg.run.seed,
        sequence_length=cfg.data.seq_length,
        blend=(prefixes, weights),
        split=cfg.data.split,
        tokenizer=tokenizer,
        reset_position_ids=cfg.data.reset_position_ids,
        reset_attention_mask=cfg.data.reset_attention_mask,
        eod_mask_loss=cfg.data.eod_mask_loss,
        create_attention_mask=cfg.data.reset_attention_mask,
        path_to_cache=run_cache,
        mmap_bin_files=True,
    )
    try:
        train, valid, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, [train_samples, valid_samples, 0], lambda: True, ds_config
        ).build()
    except (AssertionError, ValueError) as err:
        raise UserError(f"could not build the datasets from {prefixes}: {err}", "check data.paths, data.split and data.seq_length") from err
    return DataBundle(tokenizer=tokenizer, train=train, valid=valid, prefixes=prefixes, weights=weights)


class StepBatches:
    """Micro-batches of one optimizer step for this data-parallel rank."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.dataset = dataset
        self.gbs = global_batch_size
        self.mbs = micro_batch_size
        self.per_rank = global_batch_size // dp_size
        self.dp_rank = dp_rank

    @property
    def num_microbatches(self) -> int:
        return self.per_rank // self.mbs

    def iterator(self, step: int):
        start = step * self.gbs + self.dp_rank * self.per_rank
        for m in range(self.num_microbatches):
            ids = range(start + m * self.mbs, start + (m + 1) * self.mbs)
            samples = [self.dataset[i % len(self.dataset)] for i in ids]
            batch = collate(samples)
            # Global sample ids: the key of per-sample side data such as offline reference scores.
            batch["sample_ids"] = torch.tensor([i % len(self.dataset) for i in ids], dtype=torch.long)
            yield batch


def collate(samples: list[dict]) -> dict:
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = torch.as_tensor(values)
    return batch


def to_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of a micro-batch (data and method extras: reference scores, GRPO advantages,
    Φ_RL masks, normalisers) on ``device``; other values (callables, floats) as they are.

    The one place where a micro-batch meets the model's device: the losses are pure functions
    that assume all their inputs share the logits' device (tests/test_device_placement.py
    proves it on the CPU with ``meta`` logits).
    """
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
