"""``import_hf`` and ``export_hf``: validate everything first, then stream tensor by tensor
into a temporary directory that is renamed into place only when complete.

Layout of an imported checkpoint ``OUT/`` (a checkpoint directory: every tool that takes a
checkpoint accepts it, e.g. ``train.init_from=OUT`` or ``reference.checkpoint=OUT``)::

    OUT/meta.json        architecture, tokenizer fingerprint, the source config.json
    OUT/model.yaml       the matching ``model`` config group (keys of conf/model/*.yaml)
    OUT/tokenizer/       the HF tokenizer files, when the HF folder has them
    OUT/<dist_checkpointing files>
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field

import torch

from megatron_midtrain.convert import families
from megatron_midtrain.convert.hf_io import HFReader, ShardedSafetensorsWriter, copy_tokenizer_files
from megatron_midtrain.convert.mappings import IGNORED_HF_SUFFIXES, build_mappings, expected_hf_names
from megatron_midtrain.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def parse_dtype(name: str | None, where: str) -> torch.dtype | None:
    if name in (None, "", "auto"):
        return None
    if name not in DTYPES:
        raise UserError(f"{where}: dtype {name!r} is not supported", f"use one of: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class ConversionReport:
    out: str
    family: str
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def check_output(out: str, overwrite: bool) -> None:
    """Refuse an existing ``out`` (unless overwrite) or a missing parent, before any work."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise UserError(f"output {out} already exists", "choose a new --out, or pass --overwrite to replace it")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise UserError(f"the parent directory of --out ({parent}) does not exist", "create it first")


def _fresh_output(out: str, overwrite: bool) -> str:
    """Temporary sibling directory of ``out`` to write into (renamed by :func:`_publish`)."""
    check_output(out, overwrite)
    out = os.path.abspath(out)
    tmp = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _publish(tmp: str, out: str) -> None:
    out = os.path.abspath(out)
    if os.path.exists(out):
        old = f"{out}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def check_layout(model_cfg, tp: int, pp: int) -> None:
    """The TP/PP splits training will need (heads, KV groups, FFN, vocabulary, layers)."""
    from megatron_midtrain.convert.mappings import padded_vocab_size

    if tp < 1 or pp < 1:
        raise UserError(f"--tp {tp} / --pp {pp} must be >= 1", "pass positive sizes")
    m = model_cfg
    groups = m.num_query_groups or m.num_attention_heads
    problems = [
        (m.num_attention_heads % tp or groups % tp, f"TP={tp} does not divide the attention heads ({m.num_attention_heads}) and KV groups ({groups})"),
        (m.ffn_hidden_size % tp, f"TP={tp} does not divide the FFN width {m.ffn_hidden_size}"),
        (padded_vocab_size(m) % tp, f"TP={tp} does not divide the vocabulary {padded_vocab_size(m)}"),
        (m.num_layers % pp, f"PP={pp} does not divide the {m.num_layers} layers"),
    ]
    for bad, what in problems:
        if bad:
            raise UserError(f"this model cannot be split that way: {what}", "choose --tp/--pp that divide the model")


# --------------------------------------------------------------------------------- import
def _validate_hf_tensors(reader: HFReader, table, model_cfg, where: str) -> dict:
    """Every tensor the table needs exists with the right shape; nothing is left over."""
    expected = expected_hf_names(table, model_cfg.num_layers)
    missing = [n for n in expected if n not in reader]
    if missing:
        raise UserError(f"{where}: {len(missing)} tensors are missing, e.g. {missing[0]}",
                        "download the complete model folder (all shards) or check that config.json belongs to these weights")
    ignored = [n for n in reader.names() if n not in expected]
    if model_cfg.tie_embeddings:  # tied models may still store lm_head (a copy of the embedding)
        ignored = [n for n in ignored if n != "lm_head.weight"]
    unexpected = [n for n in ignored if not n.endswith(IGNORED_HF_SUFFIXES)]
    if unexpected:
        raise UserError(f"{where}: {len(unexpected)} tensors have no place in a {model_cfg.name} model, e.g. {unexpected[0]}",
                        "config.json and the weights disagree (or the model has layers this family cannot express)")
    # Shapes, from the file headers: what each HF tensor must be, given the config.
    for m in table:
        for layer in (range(model_cfg.num_layers) if m.per_layer else [None]):
            names = m.hf_names(layer)
            shapes = [reader.shape(n) for n in names]
            want = _hf_shapes(m, model_cfg)
            for name, shape, w in zip(names, shapes, want):
                if tuple(shape) != tuple(w):
                    raise UserError(f"{where}: tensor {name} has shape {list(shape)}, config.json implies {list(w)}",
                                    "use the config.json that came with these weights")
    return expected


def _hf_shapes(mapping, m) -> list[tuple[int, ...]]:
    """The HF tensor shapes a mapping expects (derived from the ModelConfig)."""
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    hd = m.head_dim or m.hidden_size // heads
    h, f, v = m.hidden_size, m.ffn_hidden_size, m.vocab_size
    key = mapping.megatron.split("decoder.layers.")[-1]
    table = {
        "embedding.word_embeddings.weight": [(v, h)],
        "output_layer.weight": [(v, h)],
        "decoder.final_layernorm.weight": [(h,)],
        "self_attention.linear_qkv.weight": [(heads * hd, h), (groups * hd, h), (groups * hd, h)],
        "self_attention.linear_qkv.bias": [(heads * hd,), (groups * hd,), (groups * hd,)],
        "self_attention.linear_proj.weight": [(h, heads * hd)],
        "self_attention.q_layernorm.weight": [(heads * hd,) if m.qk_norm_scope == "full" else (hd,)],
        "self_attention.k_layernorm.weight": [(groups * hd,) if m.qk_norm_scope == "full" else (hd,)],
        "self_attention.linear_qkv.layer_norm_weight": [(h,)],
        "self_attention.post_norm.weight": [(h,)],
        "mlp.linear_fc1.weight": [(f, h), (f, h)],
        "mlp.linear_fc1.layer_norm_weight": [(h,)],
        "mlp.linear_fc2.weight": [(h, f)],
        "mlp.post_norm.weight": [(h,)],
    }
    return table[key]


def _tokenizer_info(tok_dir: str | None) -> tuple[str | None, str | None, str | None]:
    """(fingerprint, tokenizer.json path, note) for a copied HF tokenizer folder."""
    if tok_dir is None or not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        return None, None, "no tokenizer.json in the HF folder: pass data.tokenizer when training"
    from megatron_midtrain.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    try:
        tok = load_tokenizer(tok_dir)
    except UserError as err:
        return None, None, f"tokenizer not recorded ({err})"
    return tokenizer_fingerprint(tok), os.path.join(tok_dir, "tokenizer.json"), None


def model_yaml(model_cfg) -> str:
    import yaml

    body = yaml.safe_dump(dataclasses.asdict(model_cfg), sort_keys=False)
    return ("# The model config group of this checkpoint: copy to conf/model/<name>.yaml and pass\n"
            "# model=<name>, or pass these keys as model.<key>=... overrides.\n" + body)


def matching_preset(model_cfg) -> str | None:
    """Name of a conf/model preset with the same architecture, if any."""
    import yaml

    from megatron_midtrain.config.loader import conf_dir
    from megatron_midtrain.config.schema import ModelConfig
    from megatron_midtrain.training.checkpoint import arch_signature

    def signature(m):
        sig = arch_signature(m)
        sig["head_dim"] = m.head_dim or m.hidden_size // m.num_attention_heads  # None = the default
        return sig

    want = signature(model_cfg)
    folder = os.path.join(conf_dir(), "model")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".yaml"):
            continue
        with open(os.path.join(folder, name)) as fh:
            data = yaml.safe_load(fh) or {}
        try:
            preset = ModelConfig(**{k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(ModelConfig)}})
        except (TypeError, UserError):
            continue
        same_rope = (preset.rope_theta, preset.rope_scaling_factor, preset.norm_epsilon) == (
            model_cfg.rope_theta, model_cfg.rope_scaling_factor, model_cfg.norm_epsilon)
        if signature(preset) == want and same_rope:
            return name[: -len(".yaml")]
    return None


def import_hf(hf_dir: str, out: str, tp: int = 1, pp: int = 1, dtype: str | None = None,
              overwrite: bool = False, log=print) -> ConversionReport:
    start = time.perf_counter()
    hf_dir = os.path.abspath(hf_dir)
    if not os.path.isdir(hf_dir):
        raise UserError(f"--hf-dir {hf_dir} does not exist or is not a directory", "point it at a local Hugging Face model folder")
    check_output(out, overwrite)
    hf_cfg = families.read_hf_config(hf_dir)
    family, model_cfg = families.model_config_from_hf(hf_cfg, hf_dir)
    check_layout(model_cfg, tp, pp)
    reader = HFReader(hf_dir)
    table = build_mappings(model_cfg)
    _validate_hf_tensors(reader, table, model_cfg, hf_dir)
    file_dtype = reader.dtype(table[0].hf_names(None)[0])
    target = parse_dtype(dtype, "--dtype") or file_dtype or torch.float32
    by_key = {m.megatron: m for m in table}

    def source(key: str, layer: int | None) -> torch.Tensor:
        m = by_key[key]
        return m.transform.to_megatron([reader.get(n) for n in m.hf_names(layer)]).to(target)

    from megatron_midtrain.convert import mcore_io

    mcore_io.ensure_process_group()
    tmp = _fresh_output(out, overwrite)
    try:
        keys = mcore_io.save_lazily(model_cfg, target, _checked_source(source, by_key), tmp)
        if set(keys) != set(by_key):  # the table and megatron's model must describe the same tensors
            raise RuntimeError(f"conversion table out of sync with megatron: {sorted(set(keys) ^ set(by_key))}")
        tok_dir = os.path.join(tmp, "tokenizer")
        copy_tokenizer_files(hf_dir, tok_dir)
        fingerprint, tok_file, note = _tokenizer_info(tok_dir if os.path.isdir(tok_dir) else None)
        final_tok = tok_file.replace(tmp, os.path.abspath(out), 1) if tok_file else None
        _write_import_meta(tmp, model_cfg, family, hf_cfg, hf_dir, tp, pp, target, fingerprint, final_tok)
        with open(os.path.join(tmp, "model.yaml"), "w") as fh:
            fh.write(model_yaml(model_cfg))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = ConversionReport(out=os.path.abspath(out), family=family.name, tensors=len(expected_hf_names(table, model_cfg.num_layers)),
                              bytes=sum(_numel(s) for s in keys.values()) * torch.finfo(target).bits // 8,
                              seconds=time.perf_counter() - start)
    if note:
        report.notes.append(note)
    preset = matching_preset(model_cfg)
    report.notes.append(f"model config: {report.out}/model.yaml" + (f" (same architecture as model={preset})" if preset else ""))
    return report


def _numel(entry) -> int:
    _, shape = entry
    n = 1
    for s in shape:
        n *= s
    return n


def _checked_source(source, by_key):
    def wrapped(key, layer):
        if key not in by_key:
            raise RuntimeError(f"megatron expects tensor {key}, which the conversion table does not produce")
        return source(key, layer)

    return wrapped


def _write_import_meta(tmp, model_cfg, family, hf_cfg, hf_dir, tp, pp, dtype, fingerprint, tok_file) -> None:
    from megatron_midtrain.training.checkpoint import arch_signature

    meta = {
        "arch": arch_signature(model_cfg),
        "model_config": dataclasses.asdict(model_cfg),
        "layout": [tp, pp, 1],
        "world_size": 1,
        "step": 0,
        "consumed_tokens": 0,
        "method": None,
        "seq_length": min(model_cfg.max_position_embeddings, 4096),
        "tokenizer": fingerprint,
        "tokenizer_path": tok_file,
        "dtype": _DTYPE_NAMES[dtype],
        "converted_from": {"format": "huggingface", "path": hf_dir, "family": family.name, "config": hf_cfg},
    }
    path = os.path.join(tmp, "meta.json")
    with open(path, "w") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)


# --------------------------------------------------------------------------------- export
def export_hf(checkpoint: str, out: str, family: str | None = None, dtype: str | None = None,
              max_shard_bytes: int = 2 * 2**30, overwrite: bool = False, log=print) -> ConversionReport:
    from megatron_midtrain.eval.checkpoint_logprobs import _model_config_from_meta, peek_checkpoint

    start = time.perf_counter()
    info = peek_checkpoint(checkpoint)
    check_output(out, overwrite)
    model_cfg = _model_config_from_meta(info.meta, info.path)
    source = info.meta.get("converted_from") or {}
    fam = families.get_family(family, "--family") if family else (
        families.FAMILIES.get(source.get("family")) or families.infer_family(model_cfg))
    problem = families.fits(fam, model_cfg)
    if problem:
        raise UserError(f"checkpoint {info.path} cannot be written as {fam.name}: {problem}",
                        f"pick the family that matches the architecture (supported: {families.supported()})")
    target = parse_dtype(dtype, "--dtype")

    from megatron_midtrain.convert import mcore_io

    mcore_io.ensure_process_group()
    ckpt_dtype = mcore_io.checkpoint_dtype(info.path)
    target = target or ckpt_dtype
    base = source.get("config") if source.get("family") == fam.name else None
    hf_cfg = families.hf_config_from_model(fam, model_cfg, _DTYPE_NAMES[target], base=base)
    _add_token_ids(hf_cfg, info.meta)
    table = build_mappings(model_cfg)
    tmp = _fresh_output(out, overwrite)
    count = 0
    try:
        reader = mcore_io.CheckpointReader(info.path, model_cfg, ckpt_dtype)
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
        if set(reader.keys) != {m.megatron for m in table}:
            raise RuntimeError(f"conversion table out of sync with megatron: {sorted(set(reader.keys) ^ {m.megatron for m in table})}")
        # One megatron tensor (of one layer) at a time: the peak is the largest tensor, e.g. the
        # embedding, plus its HF pieces on their way to disk.
        for layer in [None] + reader.layers:
            for m in table:
                if m.per_layer != (layer is not None):
                    continue
                tensor = reader.load(layer, [m.megatron])[m.megatron]
                for name, t in zip(m.hf_names(layer), m.transform.to_hf(tensor)):
                    writer.add(name, t.to(target))
                    count += 1
                del tensor
        writer.close()
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(hf_cfg, fh, indent=2, sort_keys=True)
        tok_note = _export_tokenizer(info.meta, tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = ConversionReport(out=os.path.abspath(out), family=fam.name, tensors=count, bytes=writer.total_bytes,
                              seconds=time.perf_counter() - start)
    if tok_note:
        report.notes.append(tok_note)
    return report


def _add_token_ids(hf_cfg: dict, meta: dict) -> None:
    """bos/eos ids from the checkpoint's tokenizer when the config does not carry them."""
    path = meta.get("tokenizer_path")
    if "eos_token_id" in hf_cfg or not path or not os.path.exists(path):
        return
    try:
        from megatron_midtrain.data.tokenizer import load_tokenizer

        tok = load_tokenizer(path)
    except UserError:
        return
    hf_cfg["eos_token_id"] = tok.eod
    if tok.bos is not None:
        hf_cfg["bos_token_id"] = tok.bos


def _export_tokenizer(meta: dict, out_dir: str) -> str | None:
    """Copy the checkpoint's HF tokenizer files next to the weights (lm-eval and
    ``AutoTokenizer`` need them); a SentencePiece model is converted when transformers can."""
    path = meta.get("tokenizer_path")
    if not path or not os.path.exists(path):
        return "no tokenizer recorded in the checkpoint: the export has weights and config only"
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if path.endswith(".model"):
        return _convert_sentencepiece(path, out_dir)
    copy_tokenizer_files(folder, out_dir)
    return None


def _convert_sentencepiece(path: str, out_dir: str) -> str | None:
    """Try transformers' SentencePiece -> tokenizer.json conversion; keep the result only if it
    tokenizes probe texts exactly like the SentencePiece model (else say so and ship none)."""
    from megatron_midtrain.data.tokenizer import load_tokenizer

    probes = ["The cat sat on the mat.", "  12 + 35 = 47\nnext line", "Ünïcödé and emoji \u2603"]
    written = []
    try:
        from tokenizers import Tokenizer
        from transformers import LlamaTokenizerFast

        before = set(os.listdir(out_dir))
        LlamaTokenizerFast(vocab_file=path, legacy=False, add_bos_token=False).save_pretrained(out_dir)
        written = sorted(set(os.listdir(out_dir)) - before)
        converted = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
        reference = load_tokenizer(path)
        if all(converted.encode(t, add_special_tokens=False).ids == reference.tokenize(t) for t in probes):
            return None
        problem = "the converted tokenizer.json tokenizes differently"
    except Exception as err:  # optional convenience; the weights are exported anyway
        problem = f"{type(err).__name__}: {err}"
    for name in written:
        os.remove(os.path.join(out_dir, name))
    return (f"SentencePiece tokenizer {path} was not converted to tokenizer.json ({problem}); "
            "the export has weights and config only: tokenize with the SentencePiece model")
