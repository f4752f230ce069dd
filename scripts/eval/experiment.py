"""The evaluation recipe: fine-tune every task, merge every subset with every method, score.

One `Experiment` per fine-tuning regime (full, LoRA): `run.py` runs the two in parallel
processes. Results are cached in ``work/runs/<preset>/scores_<regime>.json`` (checkpoints
next to it), so an interrupted run resumes where it stopped; ``run.py --fresh`` deletes the
cache first.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

import data
import evaluate as ev
import merge_runs as mr
from finetune import FinetuneConfig, build_trainable, save, train
from tasks import Sizes, Task, build_tasks


@dataclass(frozen=True)
class Preset:
    """Everything that defines one run; its name keys the cache."""

    name: str
    tasks: tuple[str, ...]
    sizes: Sizes
    seeds: tuple[int, ...]
    sweep: tuple[int, ...]  # numbers of merged models; len(tasks) is "all"
    sweep_methods: tuple[str, ...]  # method labels merged at every size; others only at "all"
    full: FinetuneConfig
    lora: FinetuneConfig
    max_len: int
    ta_lambdas: tuple[float, ...] = mr.TA_LAMBDAS
    ties_densities: tuple[float, ...] = mr.TIES_DENSITIES
    ties_lambdas: tuple[float, ...] = mr.TIES_LAMBDAS
    star_etas: tuple[int, ...] = mr.STAR_ETAS
    alphas: tuple[float, ...] = mr.ALPHAS  # TSV-M / Iso-C / Iso-CTS α tuned over these
    spectral: tuple[str, ...] = mr.spectral_labels()  # which TSV-M / Iso rows this preset merges
    spectral_full: tuple[str, ...] | None = None  # the full-FT regime's, if fewer (None: `spectral`)

    def methods(self, regime: str) -> list[mr.Method]:
        """The methods merged in one fine-tuning regime, in report order."""
        every = mr.methods(self.ta_lambdas, self.ties_densities, self.ties_lambdas,
                           self.star_etas, self.alphas)
        spectral = self.spectral_full if regime == "full" and self.spectral_full is not None else self.spectral
        return [m for m in every if m.label not in mr.spectral_labels() or m.label in spectral]


@dataclass
class Prepared:
    """A task ready to score: frozen head [C, d] and pre-tokenized splits."""

    task: Task
    head: torch.Tensor
    ids: dict[str, list[list[int]]] = field(default_factory=dict)
    labels: dict[str, list[int]] = field(default_factory=dict)


class Scores:
    """A JSON dict on disk: key -> value, written atomically after every update."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=0, sort_keys=True))
        tmp.replace(self.path)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


class Experiment:
    """One preset's run: setup, fine-tune, score the fine-tuned, merge and score, collect."""

    def __init__(self, preset: Preset, work: Path, regime: str) -> None:
        self.preset, self.regime = preset, regime
        self.work = work
        self.run_dir = work / "runs" / preset.name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.scores = Scores(self.run_dir / f"scores_{regime}.json")
        self.base_dir = data.base_model_dir()
        self.tokenizer = ev.load_tokenizer(self.base_dir)
        self.base = ev.load_encoder(self.base_dir)
        self.tasks: dict[str, Prepared] = {}
        for task in build_tasks(list(preset.tasks), work, preset.sizes):
            prep = Prepared(task, ev.make_head(self.base, self.tokenizer, task, preset.max_len))
            for split in ("train", "val", "test"):
                rows = getattr(task, split)
                prep.ids[split] = ev.tokenize(self.tokenizer, [t for t, _ in rows], preset.max_len)
                prep.labels[split] = [y for _, y in rows]
            self.tasks[task.name] = prep

    # ---- scoring -------------------------------------------------------------------------

    def score(self, key: str, model: torch.nn.Module, names: list[str], split: str) -> dict[str, float]:
        """Accuracy of ``model`` on ``split`` of each named task (cached under ``key``)."""
        cached = self.scores.get(key)
        if cached is not None:
            return cached
        out = {n: ev.accuracy(model, self.tasks[n].ids[split], self.tasks[n].labels[split],
                              self.tasks[n].head) for n in names}
        self.scores.put(key, out)
        return out

    def score_folder(self, key: str, folder: Path, names: list[str], split: str) -> dict[str, float]:
        if self.scores.get(key) is not None:
            return self.scores.get(key)
        return self.score(key, ev.load_encoder(folder), names, split)

    # ---- fine-tuning ---------------------------------------------------------------------

    def ft_config(self, regime: str) -> FinetuneConfig:
        return self.preset.full if regime == "full" else self.preset.lora

    def ft_dir(self, regime: str, task: str, seed: int) -> Path:
        return self.run_dir / "ft" / self.ft_config(regime).tag() / f"{task}_s{seed}"

    def finetune(self, regime: str, task: str, seed: int) -> Path:
        """Fine-tune one task (cached); records seconds per step and the own-task accuracy."""
        out, cfg, prep = self.ft_dir(regime, task, seed), self.ft_config(regime), self.tasks[task]
        key = f"ft|{cfg.tag()}|{task}|{seed}"
        if out.exists() and self.scores.get(key + "|test") is not None:
            return out
        model = build_trainable(self.base_dir, cfg, seed)
        start = time.perf_counter()
        sec_per_step = train(model, prep.ids["train"], prep.labels["train"], prep.head, cfg, seed)
        save(model, cfg, self.base_dir, out)
        self.scores.put(key + "|time", {"sec_per_step": sec_per_step,
                                        "seconds": time.perf_counter() - start})
        scored = model.merge_and_unload() if isinstance(model, PeftModel) else model
        for split in ("val", "test"):
            self.scores.data.pop(f"{key}|{split}", None)  # a retrained model is rescored
            self.score(f"{key}|{split}", scored, [task], split)
        log(f"fine-tuned {regime} {task} seed {seed}: {sec_per_step:.2f} s/step, "
            f"test acc {self.scores.get(key + '|test')[task]:.3f}")
        return out

    def ft_acc(self, regime: str, task: str, seed: int, split: str) -> float:
        return self.scores.get(f"ft|{self.ft_config(regime).tag()}|{task}|{seed}|{split}")[task]

    # ---- merging -------------------------------------------------------------------------

    def subset(self, seed: int, k: int) -> list[str]:
        """The first k tasks of a seeded permutation: nested subsets, different per seed."""
        order = random.Random(1000 + seed).sample(list(self.preset.tasks), len(self.preset.tasks))
        return order[:k]

    def normalized(self, accs: dict[str, float], regime: str, seed: int, split: str) -> float:
        """Mean over tasks of merged accuracy / the task's own fine-tuned accuracy."""
        return sum(a / self.ft_acc(regime, t, seed, split) for t, a in accs.items()) / len(accs)

    def merge_and_score(self, method: mr.Method, regime: str, seed: int, k: int) -> dict[str, Any]:
        """Tune on validation (if the method has a grid), then score the choice on test."""
        names = self.subset(seed, k)
        inputs = [self.ft_dir(regime, t, seed) for t in names]
        tag = f"{self.ft_config(regime).tag()}|s{seed}|k{k}|{method.label}"
        cand_dir = self.run_dir / f"merged_{regime}_candidate"
        best_dir = self.run_dir / f"merged_{regime}_best"
        unit_dir = self.run_dir / f"merged_{regime}_unit"  # λ = 1, for rescale_lambda methods
        mr.discard(best_dir)
        mr.discard(unit_dir)
        best: tuple[float, dict[str, float]] | None = None
        candidates = method.candidates()
        for params in candidates:
            if len(candidates) == 1:
                best = (float("nan"), params)
                break
            key = f"merge|{tag}|{json.dumps(params, sort_keys=True)}|val"
            merged = None
            if self.scores.get(key) is None:
                merged = self.candidate(key, method, params, inputs, cand_dir, unit_dir)
                self.score_folder(key, merged, names, "val")
            val = self.normalized(self.scores.get(key), regime, seed, "val")
            if best is None or val > best[0]:
                best = (val, params)
                mr.discard(best_dir)
                if merged is not None and not method.rescale_lambda:  # test needs it: no second merge
                    merged.rename(best_dir)
            mr.discard(cand_dir)
        assert best is not None
        if method.rescale_lambda and best[1].get("lambda") == 1.0 and unit_dir.exists():
            unit_dir.rename(best_dir)  # the star_dist merge at the chosen λ = 1 itself
        mr.discard(unit_dir)
        key = f"merge|{tag}|{json.dumps(best[1], sort_keys=True)}|test"
        if self.scores.get(key) is None:
            if not best_dir.exists():
                self.timed_merge(key, method, best[1], inputs, best_dir)
            self.score_folder(key, best_dir, names, "test")
        mr.discard(best_dir)
        accs = self.scores.get(key)
        return {
            "regime": regime, "seed": seed, "k": k, "method": method.label, "tasks": names,
            "params": best[1], "val_normalized": best[0], "test_acc": accs,
            "normalized": self.normalized(accs, regime, seed, "test"),
        }

    def candidate(self, key: str, method: mr.Method, params: dict[str, float], inputs: list[Path],
                  cand_dir: Path, unit_dir: Path) -> Path:
        """A validation candidate: a star_dist merge, or for a `rescale_lambda` method its one
        star_dist merge at λ = 1 (made once per subset) rescaled to this λ."""
        if not method.rescale_lambda:
            return self.timed_merge(key, method, params, inputs, cand_dir)
        if not unit_dir.exists():
            self.timed_merge(key, method, {**params, "lambda": 1.0}, inputs, unit_dir)
        return mr.rescale(self.base_dir, unit_dir, params["lambda"], cand_dir)

    def timed_merge(self, key: str, method: mr.Method, params: dict[str, float],
                    inputs: list[Path], out: Path) -> Path:
        """One star_dist merge; its wall time is kept for the report."""
        start = time.perf_counter()
        mr.run_merge(method, params, self.base_dir, inputs, out)
        self.scores.put(key + "|merge_seconds", time.perf_counter() - start)
        return out

    # ---- the whole recipe ----------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Fine-tune, merge and score this experiment's regime; return its part of the results."""
        p, regime = self.preset, self.regime
        names = list(p.tasks)
        pretrained = self.score("pretrained|test", self.base, names, "test")
        rows: list[dict[str, Any]] = []
        for seed in p.seeds:
            for task in names:
                self.finetune(regime, task, seed)
            for k in p.sweep:
                for method in p.methods(regime):
                    if k != len(names) and method.label not in p.sweep_methods:
                        continue
                    row = self.merge_and_score(method, regime, seed, k)
                    rows.append(row)
                    log(f"{regime} seed {seed} k={k} {method.label} {row['params']}: "
                        f"normalized {row['normalized']:.3f}")
                # the pretrained model, normalized the same way, is the floor for this subset
                sub = self.subset(seed, k)
                accs = {t: pretrained[t] for t in sub}
                rows.append({"regime": regime, "seed": seed, "k": k, "method": "pretrained",
                             "tasks": sub, "params": {}, "val_normalized": float("nan"),
                             "test_acc": accs,
                             "normalized": self.normalized(accs, regime, seed, "test")})
        tag = self.ft_config(regime).tag()
        return {
            "preset": {**asdict(p), "sizes": asdict(p.sizes)},
            "tasks": {n: {"classes": self.tasks[n].task.classes,
                          "descriptions": self.tasks[n].task.descriptions,
                          "train": len(self.tasks[n].task.train),
                          "val": len(self.tasks[n].task.val),
                          "test": len(self.tasks[n].task.test),
                          "majority": self.tasks[n].task.majority_rate()} for n in names},
            "pretrained": pretrained,
            "finetuned": {regime: {t: [self.ft_acc(regime, t, s, "test") for s in p.seeds]
                                   for t in names}},
            "timing": {regime: [self.scores.get(f"ft|{tag}|{t}|{s}|time")
                                for t in names for s in p.seeds]},
            "merge_seconds": [v for k, v in self.scores.data.items()
                              if k.endswith("|merge_seconds")],
            "rows": rows,
        }


def combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from the per-regime parts (rows, fine-tuned scores, timings joined)."""
    out = {**parts[0], "finetuned": {}, "timing": {}, "merge_seconds": [], "rows": []}
    for part in parts:
        out["finetuned"].update(part["finetuned"])
        out["timing"].update(part["timing"])
        out["merge_seconds"] += part["merge_seconds"]
        out["rows"] += part["rows"]
    return out
