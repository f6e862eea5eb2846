"""The flywheel pipeline: train every stage of the recipe, evaluate every model, collect the runs.

Returns one record per (method, seed) run with its metrics; :mod:`.report` aggregates them.
See recipe.py for the pipeline and pipeline.py for caching and resuming.
"""

from __future__ import annotations

import json
import os

import numpy as np

from megatron_midtrain.flywheel import probe as pr
from megatron_midtrain.flywheel.mechanism import weight_summary
from megatron_midtrain.flywheel.pipeline import Progress, Stages, log
from megatron_midtrain.flywheel.recipe import ABLATION_OF, ABLATIONS, METHODS, REFERENCE, Recipe


def _records(run_dir: str) -> list[dict]:
    from megatron_midtrain.training.metrics import read_metrics

    return read_metrics(run_dir)


def _checkpoint(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"iter_{step:07d}")


class Flywheel:
    def __init__(self, workdir: str, recipe: Recipe, methods: list[str] | None = None):
        self.workdir = os.path.abspath(workdir)
        self.recipe = recipe
        self.methods = methods or list(METHODS)
        self.ablations = [a for a in ABLATIONS if recipe.ablations and ABLATION_OF[a] in self.methods]
        n_seeds, n_mid = len(recipe.seeds), len(recipe.seeds) * (len(self.methods) + len(self.ablations))
        n_remit = sum(m.startswith("remit") for m in self.methods + self.ablations)
        expected = {"base": 1, "sft": 1, "grpo": 1, "mid": n_mid, "post_sft": n_seeds * len(self.methods),
                    "post_grpo": n_seeds * len(self.methods), "eval": 3 + 3 + 2 * n_mid,
                    "mechanism": n_remit * (1 + recipe.mid_steps // recipe.mechanism_interval)}
        self.progress = Progress(total=sum(expected.values()))
        for kind, count in expected.items():
            self.progress.expect(kind, count)
        self.stages = Stages(self.workdir, self.progress, recipe.common)
        self._probes: dict = {}

    # ------------------------------------------------------------------ evaluation helpers
    def probe(self, checkpoint: str) -> dict:
        """Both domains' probes of ``checkpoint`` (kept in memory: base and references are reused)."""
        if checkpoint not in self._probes:
            self._probes[checkpoint] = {d: pr.probe_tokens(checkpoint, d, self.recipe.eval_batches, self.workdir, self.recipe.common)
                                        for d in pr.DOMAINS}
        return self._probes[checkpoint]

    def token_eval(self, name: str, checkpoint: str) -> dict:
        """Validation loss and next-token accuracies per domain (cached)."""
        def compute():
            probes = self.probe(checkpoint)
            return {d: pr.token_metrics(probes[d], self.base_probe[d]["entropy"]) for d in pr.DOMAINS}

        out = self.stages.evaluate(f"tokens-{name}", [checkpoint, self.recipe.eval_batches, self.base], "eval", compute)
        self._forget(checkpoint)
        return out

    def _forget(self, checkpoint: str) -> None:
        """Drop a probe that no later evaluation reads (only the base's and references' are reused)."""
        if checkpoint not in (self.base, *self.references.values()):
            self._probes.pop(checkpoint, None)

    def accuracy(self, name: str, checkpoint: str) -> float:
        key = [checkpoint, self.recipe.eval_problems]
        return self.stages.evaluate(f"accuracy-{name}", key, "eval",
                                    lambda: {"accuracy": pr.heldout_accuracy(checkpoint, self.recipe.eval_problems, self.workdir,
                                                                             self.recipe.common + self.recipe.grpo_sizes)})["accuracy"]

    def mechanism(self, name: str, run_dir: str, ref: str) -> list[dict]:
        """ReMiT weights on held-out text at step 0 (the base) and at every saved checkpoint of
        ``run_dir``, with that run's ε and centring against its reference ``ref``."""
        from omegaconf import OmegaConf

        from megatron_midtrain.training import checkpoint as ckpt

        method = OmegaConf.load(os.path.join(run_dir, "config.yaml")).method
        clip_eps, center = float(method["clip_eps"]), method["center"]
        steps = ckpt.complete_checkpoints(ckpt.checkpoint_root(run_dir))
        tokenizer = self._tokenizer()
        rows = []
        for step in [0] + steps:
            point = self.base if step == 0 else _checkpoint(run_dir, step)

            def compute(point=point):
                probes, ref_probes = self.probe(point), self.probe(ref)
                return {d: weight_summary(probes[d], ref_probes[d], clip_eps, center, tokenizer.eod, tokenizer)
                        for d in pr.DOMAINS}

            summary = self.stages.evaluate(f"mechanism-{name}-{step}", [point, ref, clip_eps, center, self.recipe.eval_batches],
                                           "mechanism", compute)
            self._forget(point)
            rows.append({"step": step, **summary})
        return rows

    def _tokenizer(self):
        from megatron_midtrain.data.demo import default_cache_dir, ensure_demo_assets
        from megatron_midtrain.data.tokenizer import load_tokenizer

        return load_tokenizer(ensure_demo_assets(default_cache_dir()).tokenizer_path)

    def entropy_dirs(self) -> list[str]:
        """The base model's entropy index of each demo dataset (RMT's curriculum), cached with the base."""
        from megatron_midtrain.config.loader import load_config
        from megatron_midtrain.training.demo_models import ensure_demo_entropy

        if self.recipe.entropy_dirs:
            return list(self.recipe.entropy_dirs)
        cfg = load_config(self.recipe.common + ["method=ntp"])
        return ensure_demo_entropy(cfg, self.base, out_root=os.path.join(self.base, "entropy"))

    # ------------------------------------------------------------------ the pipeline
    def run(self) -> dict:
        r, st = self.recipe, self.stages
        self.base = st.train("base", r.base(), "base")
        sft = st.train("sft", r.sft(self.base, r.sft_steps), "sft")
        rl = st.train("rl_ref", r.grpo(sft, r.rl_steps), "grpo")
        self.references = {"rl": rl, "sft": sft}
        entropy = self.entropy_dirs()
        self.base_probe = self.probe(self.base)
        models = {"base": self.token_eval("base", self.base), "sft_ref": self.token_eval("sft_ref", sft),
                  "rl_ref": self.token_eval("rl_ref", rl)}
        references = {"sft": {"accuracy": self.accuracy("sft_ref", sft)}, "rl": {"accuracy": self.accuracy("rl_ref", rl)},
                      "rl_records": [x for x in _records(rl) if "rl/heldout_accuracy" in x or "rl/heldout_accuracy_before" in x]}
        runs = []
        for seed in r.seeds:
            for method in self.methods + self.ablations:
                runs.append(self._one(method, seed, entropy))
        return {"base": models["base"], "references": {**references, "tokens": {k: models[k] for k in ("sft_ref", "rl_ref")}},
                "base_accuracy": self.accuracy("base", self.base), "runs": runs,
                "stage_seconds": {k: sum(v) for k, v in self.progress.spent.items()}}

    def _one(self, method: str, seed: int, entropy: list[str]) -> dict:
        r, st = self.recipe, self.stages
        ablation = method in ABLATIONS
        overrides = ABLATIONS[method] if ablation else METHODS[method]
        ref_kind = REFERENCE.get(method)
        reference = self.references[ref_kind] if ref_kind else None
        over = r.mid(method, overrides, self.base, seed, reference)
        if method.startswith("rmt"):
            over.append(f"method.entropy_dirs=[{','.join(entropy)}]")
        name = f"{method}-s{seed}"
        mid = st.train(f"mid-{name}", over, "mid")
        records = _records(mid)
        out = {"method": method, "seed": seed, "ablation": ablation, "run_dir": mid,
               "tokens": self.token_eval(name, mid), "accuracy_mid": self.accuracy(name, mid),
               "curve": [{k: x[k] for k in ("step", "loss", "val/loss") if k in x} for x in records],
               "step_time_s": float(np.median([x["step_time_s"] for x in records]))}
        if method.startswith("remit") and seed == r.seeds[0]:
            out["mechanism"] = self.mechanism(name, mid, reference)
        if method.startswith("remit"):
            out["remit_train"] = [{k: x[k] for k in x if k == "step" or k.startswith("remit/")} for x in records]
        if not ablation:
            sft = st.train(f"post-sft-{name}", r.sft(mid, r.post_sft_steps), "post_sft")
            grpo = st.train(f"post-grpo-{name}", r.grpo(sft, r.post_grpo_steps), "post_grpo")
            post = _records(grpo)
            out["accuracy_post_sft"] = next(x["rl/heldout_accuracy_before"] for x in post if "rl/heldout_accuracy_before" in x)
            out["accuracy_post"] = [x["rl/heldout_accuracy"] for x in post if "rl/heldout_accuracy" in x][-1]
        log(f"{name}: " + json.dumps({k: v for k, v in out.items() if k.startswith("accuracy")}))
        return out
