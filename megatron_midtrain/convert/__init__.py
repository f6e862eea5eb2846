"""Hugging Face <-> megatron_midtrain checkpoint conversion.

* :mod:`.transforms` -- typed tensor transforms (QKV interleaving per KV group, gate/up fusion,
  vocabulary padding), each with its exact inverse;
* :mod:`.families` -- the supported model families: HF ``config.json`` <-> :class:`ModelConfig`;
* :mod:`.mappings` -- the declarative table "megatron tensor <- HF tensors + transform";
* :mod:`.hf_io` / :mod:`.mcore_io` -- streaming readers and writers for both formats;
* :mod:`.api` -- ``import_hf`` / ``export_hf`` (what ``tools/convert_checkpoint.py`` runs).
"""
