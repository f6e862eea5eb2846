"""Checkpoints move between megatron's local layer spec (the CPU, ``import-hf``) and the
Transformer Engine (TE) spec (GPUs), at any TP, with weights and optimizer state intact.

TE needs CUDA, so the TE side is **emulated** (megatron_midtrain/testing/te_emulation.py): our
real builder builds megatron's real TE layer spec (``build_layer_spec(use_te=True)``, OLMo-2's
unfused TE linears included), with each TE wrapper replaced by a CPU stand-in that has TE's
parameter names, megatron's own TE-wrapper ``sharded_state_dict`` methods (recovered from
megatron-core, not re-typed) and a non-empty TE-style ``_extra_state``. The stand-ins compute
what the local modules compute, so losses can be compared across specs.

One spawned world of 2 ranks, per family (Llama: fused pre-norms, tied head; Qwen3: per-head
QK-norm as TENorm; OLMo-2: post-norms, full-width QK-norm, unfused TE linears):

* local TP2 trains 2 steps and saves; a local TP2 resume and a TE TP2 resume each take step 3:
  same loss and grad norm (measured bitwise equal; asserted to 1e-6 relative, as the DDP
  bucket order differs between the specs) and the same weights after the step: the optimizer
  state crossed specs too;
* the local step-2 checkpoint loads into the TE spec at TP1 too (its TE modules keep their own
  ``_extra_state``: the local checkpoint stores None), which then takes step 3 like the local
  TP2 resume (≤ 1e-5 relative: TP2 -> TP1 changes float rounding);
* the TE-written step-3 checkpoint (which holds TE ``_extra_state`` the local spec does not
  have) loads into the local spec at TP1; every load gives every parameter exactly the saving
  model's value;
* a TE checkpoint into the TE spec restores TE's ``_extra_state``;
* a bf16 TE-spec checkpoint (what a GPU run writes) loads into the fp32 local spec exactly;
* what cannot load raises one UserError on every rank: a weights-only checkpoint as a resume
  (no optimizer state) and a checkpoint of another module structure (unmapped norm names).

Only a GPU run with real TE can verify: TE's own ``_extra_state`` payloads and which TE modules
(by TE version) carry one, that real TE accepts the loaded state dict (e.g. its DotProductAttention
without its ``_extra_state``), and bf16 / fused-kernel numerics. benchmarks/gpu_acceptance.py
resumes a TE-spec checkpoint under the TE spec; loading a CPU-written (local-spec) checkpoint
there is not part of it yet.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from megatron_midtrain.testing.distributed import run_distributed

# The emulation stands in for TE on the CPU (fp32, gloo); with CUDA the trainer would build the
# real TE spec in bf16, which is the GPU acceptance run's business.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU emulation of the TE spec")

PRESETS = {"llama": "demo_llama_tiny", "qwen3": "qwen3_tiny", "olmo2": "olmo2_tiny"}
COMMON = ["train.max_steps=3", "optimizer.lr=1e-2"]


def _extra_states_loaded(model) -> dict:
    """{module name: what its TE stand-in's set_extra_state received} (None = never called)."""
    return {name: m.extra_state_loaded for name, m in model.named_modules() if hasattr(m, "extra_state_loaded")}


def _run(overrides: list[str], te: bool, probe=None) -> dict:
    """Build (and resume) a Trainer and train to train.max_steps. Rank 0 gets the records and
    every parameter's full tensor as loaded (``loaded``) and after training (``final``)."""
    from contextlib import nullcontext

    import torch.distributed as dist

    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.testing.grads import full_gradients
    from megatron_midtrain.testing.runs import with_test_defaults
    from megatron_midtrain.testing.te_emulation import emulated_te_spec
    from megatron_midtrain.training.metrics import read_metrics
    from megatron_midtrain.training.trainer import Trainer

    cfg = load_config(with_test_defaults(overrides))
    with emulated_te_spec() if te else nullcontext():
        trainer = Trainer(cfg)
    try:
        extra = _extra_states_loaded(trainer.model.module)
        loaded = full_gradients([trainer.model], params=True)
        trainer.train()
        final = full_gradients([trainer.model], params=True)
        out = {"extra_loaded": extra, "probe": probe(trainer) if probe else None}
    finally:
        trainer.close(keep_distributed=True)
    if dist.get_rank() == 0:
        out.update(records=read_metrics(cfg.run.dir), loaded=loaded.tensors, final=final.tensors)
    return out


def _copy(src: str, dst: str) -> str:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        shutil.copytree(src, dst)
    dist.barrier()
    return dst


def _weight_diff(got: dict, ref: dict) -> float:
    """Largest per-parameter relative difference (inf if the parameter sets differ)."""
    from megatron_midtrain.testing.grads import relative_difference

    if set(got) != set(ref):
        return float("inf")
    return max(relative_difference(got[k], ref[k]) for k in ref)


def _stored_keys(ckpt_dir: str) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return {k.split("/")[0] for k in FileSystemReader(ckpt_dir).read_metadata().state_dict_metadata}


def _edge_cases(trainer, root: str) -> dict:
    """On a local-spec TP1 trainer: a bf16 TE-spec checkpoint (what a GPU run writes) loaded as
    fp32 weights, and the checkpoints that cannot load, with the UserError each raises."""
    import json

    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_midtrain.errors import UserError
    from megatron_midtrain.model.builder import build_gpt_stage, build_transformer_config
    from megatron_midtrain.model.init import init_parameters
    from megatron_midtrain.testing.grads import full_gradients
    from megatron_midtrain.testing.te_emulation import emulated_te_spec
    from megatron_midtrain.training import checkpoint as ckpt

    model, cfg = trainer.model.module, trainer.cfg
    meta = json.dumps({"arch": ckpt.arch_signature(cfg.model), "step": 0})
    out = {}

    def write(name: str, module) -> str:
        path = os.path.join(root, name)
        if dist.get_rank() == 0:
            os.makedirs(path)
            with open(os.path.join(path, ckpt.META), "w") as fh:
                fh.write(meta)
        dist.barrier()
        dist_checkpointing.save({"model": module.sharded_state_dict()}, path)
        return path

    with emulated_te_spec(trainer=False):
        te_bf16 = build_gpt_stage(cfg.model, build_transformer_config(cfg.model, cfg.parallel, torch.bfloat16),
                                  cfg.data.seq_length, use_te=True)
    init_parameters([te_bf16], 99, 0.5, cfg.model.num_layers)  # other values than the trainer's
    ckpt.load_model_weights(write("te_bf16", te_bf16), model, cfg.model)
    got, ref = full_gradients([model], params=True), full_gradients([te_bf16], params=True)
    out["bf16_diff"] = _weight_diff(got.tensors, ref.tensors) if got is not None else None

    weights_only = write("weights_only", model)  # what import-hf writes
    ckpt.load_model_weights(weights_only, model, cfg.model)  # loads as weights ...
    try:  # ... but not as a resume
        ckpt.load_checkpoint(weights_only, model, trainer.optimizer, trainer.scheduler, cfg.model)
    except UserError as err:
        out["weights_only"] = str(err)
    # A checkpoint of another module structure: unfused norms under their own names.
    layers = model.decoder.layers
    maps = [layer.submodules_config.sharded_state_dict_keys_map for layer in layers]
    for layer in layers:
        layer.submodules_config.sharded_state_dict_keys_map = {}
    try:
        foreign = write("foreign", model)
    finally:
        for layer, keys_map in zip(layers, maps):
            layer.submodules_config.sharded_state_dict_keys_map = keys_map
    try:
        ckpt.load_model_weights(foreign, model, cfg.model)
    except UserError as err:
        out["foreign"] = str(err)
    return out


def portability_job(root: str, families: list[str]) -> dict:
    """Rank job: the TP2 phase for every family, then (re-grouped) the TP1 phase."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    res = {f: {} for f in families}

    def dirs(fam):
        return {k: os.path.join(root, fam, k) for k in ("local", "local_resume", "te_resume", "local_tp1", "te_tp1", "te_te")}

    for fam in families:
        d, r, over = dirs(fam), res[fam], [f"model={PRESETS[fam]}", "parallel.tp=2"] + COMMON
        r["saved"] = _run(over + [f"run.dir={d['local']}", "train.exit_at_step=2"], te=False)
        _copy(d["local"], d["local_resume"])
        _copy(d["local"], d["te_resume"])
        r["local_resume"] = _run(over + [f"run.dir={d['local_resume']}"], te=False)
        r["te_resume"] = _run(over + [f"run.dir={d['te_resume']}"], te=True)
        _copy(d["te_resume"], d["local_tp1"])
        _copy(d["local"], d["te_tp1"])
        _copy(d["te_resume"], d["te_te"])
    # Same world, new layout: TP1 (DP2). Only megatron's groups are rebuilt.
    parallel_state.destroy_model_parallel()
    dist.barrier()
    for i, fam in enumerate(families):
        d, r, over = dirs(fam), res[fam], [f"model={PRESETS[fam]}"] + COMMON
        probe = (lambda t: _edge_cases(t, os.path.join(root, "edge_cases"))) if i == 0 else None
        r["local_tp1"] = _run(over + [f"run.dir={d['local_tp1']}"], te=False, probe=probe)
        r["te_tp1"] = _run(over + [f"run.dir={d['te_tp1']}"], te=True)  # trains step 3 at TP1
        if i == 0:
            r["te_te"] = _run(over + [f"run.dir={d['te_te']}"], te=True)
            r["te_keys"] = _stored_keys(os.path.join(d["te_resume"], "checkpoints", "iter_0000003"))
            r["local_keys"] = _stored_keys(os.path.join(d["local"], "checkpoints", "iter_0000002"))
    return res if dist.get_rank() == 0 else {}


@pytest.fixture(scope="module")
def portability(tmp_path_factory):
    return run_distributed(portability_job, 2, str(tmp_path_factory.mktemp("portable")), list(PRESETS),
                           timeout_s=1800)[0]


def _step(result, step):
    return next(r for r in result["records"] if r["step"] == step)


@pytest.mark.parametrize("family", list(PRESETS))
def test_local_checkpoint_resumes_under_te_spec(portability, family):
    r = portability[family]
    local = _step(r["local_resume"], 3)
    te, te_tp1 = _step(r["te_resume"], 3), _step(r["te_tp1"], 3)
    print(f"{family}: step 3 after the local TP2 checkpoint: loss local TP2 {local['loss']!r}, TE TP2 {te['loss']!r}, "
          f"TE TP1 {te_tp1['loss']!r}; grad norm {local['grad_norm']!r} / {te['grad_norm']!r} / {te_tp1['grad_norm']!r}")
    # Same layout: only the DDP bucket order differs (the grad norm sums in another order).
    assert te["loss"] == pytest.approx(local["loss"], rel=1e-6)
    assert te["grad_norm"] == pytest.approx(local["grad_norm"], rel=1e-6)
    assert _weight_diff(r["te_resume"]["final"], r["local_resume"]["final"]) <= 1e-5
    # TP2 -> TP1 as well: TP-invariant up to float rounding.
    assert te_tp1["loss"] == pytest.approx(local["loss"], rel=1e-5)
    assert te_tp1["grad_norm"] == pytest.approx(local["grad_norm"], rel=1e-5)
    assert _weight_diff(r["te_tp1"]["final"], r["local_resume"]["final"]) <= 1e-5
    # Local checkpoints store None as extra state: no TE module was handed one.
    for run in ("te_resume", "te_tp1"):
        assert r[run]["extra_loaded"] and all(v is None for v in r[run]["extra_loaded"].values())


@pytest.mark.parametrize("family", list(PRESETS))
def test_weights_equal_per_parameter_across_specs_and_tp(portability, family):
    r = portability[family]
    saved, te_saved = r["saved"]["final"], r["te_resume"]["final"]
    assert _weight_diff(r["te_resume"]["loaded"], saved) == 0.0  # local TP2 -> TE TP2
    assert _weight_diff(r["te_tp1"]["loaded"], saved) == 0.0  # local TP2 -> TE TP1
    assert _weight_diff(r["local_tp1"]["loaded"], te_saved) == 0.0  # TE TP2 -> local TP1


def test_te_extra_state_round_trips(portability):
    r = portability[next(iter(PRESETS))]
    only_te = r["te_keys"] - r["local_keys"]
    # The TE checkpoint holds TE-only extra state (the final TENorm's), which the local spec
    # skipped when it loaded it; TE -> TE restores every stand-in's extra state except core
    # attention's, which megatron's TEDotProductAttention never checkpoints.
    assert only_te and all(k.endswith("_extra_state") for k in only_te), only_te
    loaded = r["te_te"]["extra_loaded"]
    restored = {n for n, v in loaded.items() if v is not None}
    assert restored == {n for n in loaded if "core_attention" not in n}, loaded
    assert _weight_diff(r["te_te"]["loaded"], r["te_resume"]["final"]) == 0.0


def test_bf16_te_checkpoint_loads_as_fp32_local_weights(portability):
    # What a GPU run writes (bf16, TE spec) into what the CPU builds (fp32, local): exact.
    assert portability[next(iter(PRESETS))]["local_tp1"]["probe"]["bf16_diff"] == 0.0


def test_unloadable_checkpoints_say_what_to_do(portability):
    messages = portability[next(iter(PRESETS))]["local_tp1"]["probe"]
    print(messages)
    assert "no optimizer state" in messages["weights_only"] and "train.init_from=" in messages["weights_only"]
    assert "lacks" in messages["foreign"] and "layer_norm_weight" in messages["foreign"]
    assert all("; fix: " in messages[k] for k in ("weights_only", "foreign"))
