"""What a trainer is built from: the policy (megatron DDP), its optimizer and LR schedule, the frozen reference.

Each builder takes the config and returns the component; the trainer only wires them.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer

from megatron_midtrain.errors import UserError
from megatron_midtrain.model.builder import build_gpt_stage, build_transformer_config, have_transformer_engine
from megatron_midtrain.model.init import init_parameters
from megatron_midtrain.training.runtime import log0
from megatron_midtrain.training.schedule import build_lr_scheduler


def build_policy(cfg, dtype: torch.dtype, layout):
    """This rank's GPT stage, seeded-initialised and wrapped in megatron's DDP; ``(model, transformer_config)``.

    Gradients are finalised by the step (:func:`megatron_midtrain.training.forward.finalize_gradients`),
    not by the schedule: an RL step adds two schedules into one gradient buffer before reducing.
    """
    transformer_config = build_transformer_config(cfg.model, cfg.parallel, dtype)
    use_te = have_transformer_engine()
    stage = build_gpt_stage(cfg.model, transformer_config, cfg.data.seq_length, use_te)
    if torch.cuda.is_available():
        stage.cuda(torch.cuda.current_device())
    init_parameters([stage], cfg.run.seed, cfg.model.init_std, cfg.model.num_layers)
    ddp_config = DistributedDataParallelConfig(
        # fp32 main grads for bf16/fp32 parameters; fp64 parameters (only the fp64 parity
        # tests build them) keep fp64 gradients
        grad_reduce_in_fp32=dtype != torch.float64,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    model = DistributedDataParallel(config=transformer_config, ddp_config=ddp_config, module=stage)
    transformer_config.no_sync_func = model.no_sync
    n_params = sum(p.numel() for p in stage.parameters())
    log0(f"model: {cfg.model.name}, {n_params / 1e6:.2f}M parameters on rank 0's stage, "
         f"{'TE' if use_te else 'local'} spec, {dtype}, layout TP{layout.tp} PP{layout.pp} DP{layout.dp}")
    return model, transformer_config


def build_optimizer(cfg, model, transformer_config, dtype: torch.dtype):
    """megatron's Adam (optionally distributed) and the LR schedule; ``(optimizer, scheduler)``."""
    opt_cfg = McoreOptimizerConfig(
        optimizer="adam",
        lr=cfg.optimizer.lr,
        min_lr=cfg.optimizer.min_lr,
        weight_decay=cfg.optimizer.weight_decay,
        adam_beta1=cfg.optimizer.adam_beta1,
        adam_beta2=cfg.optimizer.adam_beta2,
        adam_eps=cfg.optimizer.adam_eps,
        clip_grad=cfg.train.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_cfg, [model])
    transformer_config.grad_scale_func = optimizer.scale_loss
    return optimizer, build_lr_scheduler(optimizer, cfg)


def build_reference(cfg, method, tokenizer_id: str | None, dtype: torch.dtype, global_batch_size: int):
    """The frozen reference ``method.needs_reference`` asks for (None if it needs none):
    co-located (a model in the same processes) or offline (pre-scored log-probs)."""
    need = method.needs_reference
    if need is None:
        return None
    ref_cfg = cfg.reference
    if ref_cfg.mode == "offline" and need != "target_logprobs":
        raise UserError(
            f"method={cfg.method.name} needs the reference's full distribution, which the offline store does not keep",
            "use reference.mode=colocated",
        )
    if ref_cfg.mode == "offline":
        # Pre-scored log-probs (tools/score_reference.py): the reference is never built.
        from megatron_midtrain.reference.offline import OfflineReference

        reference = OfflineReference(cfg, tokenizer_id, global_batch_size)
        log0(f"reference: offline scores from {reference.path}")
        return reference
    if ref_cfg.mode != "colocated":
        raise UserError(f"reference.mode={ref_cfg.mode!r} is unknown", "use reference.mode=colocated or offline")
    if not ref_cfg.checkpoint:
        raise UserError(f"method={cfg.method.name} needs a frozen reference model", "set reference.checkpoint=PATH (a run dir or checkpoint)")
    from megatron_midtrain.reference.colocated import ColocatedReference

    reference = ColocatedReference(cfg, tokenizer_id, dtype, have_transformer_engine())
    log0(f"reference: {reference.path}, frozen, {reference.num_params / 1e6:.2f}M parameters and "
         f"{reference.bytes / 2**20:.1f} MiB on rank 0's stage (no gradients, no optimizer state)")
    return reference
