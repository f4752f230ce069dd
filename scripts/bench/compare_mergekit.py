"""Check task_arithmetic, average and ties against mergekit's own functions on random fp32 tensors.

    .venv/bin/python scripts/bench/compare_mergekit.py [--mergekit-python /tmp/mkvenv/bin/python]

mergekit is not a dependency of star_dist (it pulls datasets, pandas, pyarrow, and parts of it
are BUSL-licensed), so it lives in a separate venv:

    python3 -m venv /tmp/mkvenv
    /tmp/mkvenv/bin/pip install torch==2.13.0   # the CPU wheel first, so no CUDA build is pulled
    /tmp/mkvenv/bin/pip install mergekit

This script (run with the project's venv) makes the inputs, computes star_dist's results the way
the engine does (streaming `base + Σ w_i f(τ_i)`; TIES as `prepare` on whole task vectors, then
`merge_block` on row blocks), runs `mergekit.merge_methods.api.merge_tensors` in the other venv
on the same tensors (exchanged as safetensors), and writes the max abs differences to
scripts/bench/results/compare_mergekit.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from star_dist.methods import get_method  # noqa: E402
from star_dist.methods.base import JointMethod, StreamingMethod  # noqa: E402

# (case name, star_dist method, mergekit method, params, weights, shape, rows per block)
CASES = [
    ("ta_equal", "task_arithmetic", "task_arithmetic", {}, [1.0, 1.0, 1.0], (96, 64), None),
    ("ta_weighted", "task_arithmetic", "task_arithmetic", {}, [0.5, 1.3, -0.2], (64, 96), None),
    ("ta_1d", "task_arithmetic", "task_arithmetic", {}, [0.3, 0.3, 0.4], (257,), None),
    ("average_equal", "average", "linear", {}, [1.0, 1.0, 1.0], (96, 64), None),
    ("average_weighted", "average", "linear", {}, [0.2, 0.5, 1.3], (64, 96), None),
    ("ties_d0.2", "ties", "ties", {"density": 0.2}, [1.0, 1.0, 1.0], (96, 64), 7),
    ("ties_d0.5_weighted", "ties", "ties", {"density": 0.5}, [0.7, 1.0, 0.4], (128, 80), 16),
    ("ties_d1.0", "ties", "ties", {"density": 1.0}, [1.0, 1.0, 1.0], (64, 64), 10),
    ("ties_d0.1_negative_w", "ties", "ties", {"density": 0.1}, [1.0, -0.5, 0.8], (80, 48), 9),
    ("ties_1d", "ties", "ties", {"density": 0.3}, [1.0, 1.0, 1.0], (301,), 50),
    ("ties_tiny", "ties", "ties", {"density": 0.2}, [1.0, 1.0, 1.0], (3,), 2),
    ("ties_per_model_density", "ties", "ties", {"density": [0.2, 0.5, 0.9]}, [1.0, 0.6, 1.0], (72, 40), 11),
    ("ties_no_normalize", "ties", "ties", {"density": 0.3, "normalize": False}, [1.0, 0.5, 0.8], (64, 48), 8),
    ("ta_normalize", "task_arithmetic", "task_arithmetic", {"normalize": True}, [0.5, 1.3, 0.2], (48, 64), None),
    # bf16-valued inputs: many |τ| tie at the trim threshold, and mergekit keeps an arbitrary
    # subset of the tied entries; the entries that differ are counted, not expected to be 0.
    ("ties_bf16_values", "ties", "ties", {"density": 0.5}, [1.0, 1.0, 1.0], (96, 64), 13),
]
QUANTIZED = {"ties_bf16_values"}

MERGEKIT_SNIPPET = r"""
import json, sys
import torch
from safetensors.torch import load_file, save_file
from mergekit.merge_methods.api import merge_tensors
import mergekit, importlib.metadata as md
cases = json.loads(open(sys.argv[1]).read())
inputs = load_file(sys.argv[2])
out = {}
for c in cases:
    n = c["name"]
    fts = [inputs[f"{n}.ft{i}"] for i in range(len(c["weights"]))]
    if c["mergekit"] == "linear":  # the fine-tuned models only, as `average` is
        out[n] = merge_tensors(fts, "linear", parameters={"weight": c["weights"]})
    else:
        params = dict(c["params"], weight=c["weights"])
        out[n] = merge_tensors([inputs[f"{n}.base"]] + fts, c["mergekit"],
                               parameters=params, base_index=0)
    out[n] = out[n].contiguous()
save_file(out, sys.argv[3])
print(md.version("mergekit"))
"""


def star_dist_merge(name: str, params: dict, weights: list[float], base, fts, rows) -> torch.Tensor:
    """The engine's formula with λ = 1, on fp32 task vectors; a list-valued parameter is per model."""
    shared = {k: v for k, v in params.items() if not isinstance(v, list)}
    per_model = [{k: v[i] for k, v in params.items() if isinstance(v, list)} for i in range(len(weights))]
    method = get_method(name, shared, per_model)
    w = method.resolve_weights(list(weights))
    taus = [ft - base for ft in fts]
    if isinstance(method, StreamingMethod):
        acc = torch.zeros_like(base)
        for wi, tau in zip(w, taus, strict=True):
            update, _ = method.transform(tau)
            acc += wi * update
        return base + acc
    assert isinstance(method, JointMethod)
    prepared = [method.prepare(tau, i) for i, tau in enumerate(taus)]
    out = base.clone()
    row_numel = base[0].numel() if base.dim() > 1 else 1
    for a in range(0, base.shape[0], rows):
        offset = a * row_numel  # the block's first flat index: trimming keeps exact top-k across blocks
        out[a : a + rows] += method.merge_block([t[a : a + rows] for t in taus], w, prepared, offset)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-python", default="/tmp/mkvenv/bin/python")
    parser.add_argument("--out", default=str(ROOT / "scripts/bench/results/compare_mergekit.json"))
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(1234)
    tensors: dict[str, torch.Tensor] = {}
    for name, *_rest in CASES:
        shape, n_models = _rest[4], len(_rest[3])
        tensors[f"{name}.base"] = torch.randn(shape, generator=gen)
        for i in range(n_models):
            noise = 0.01 * torch.randn(shape, generator=gen)
            tensors[f"{name}.ft{i}"] = tensors[f"{name}.base"] + noise
        if name in QUANTIZED:  # float32 tensors holding bf16 values
            for key in [k for k in tensors if k.startswith(f"{name}.")]:
                tensors[key] = tensors[key].bfloat16().float()

    spec = [{"name": n, "mergekit": mk, "params": p, "weights": w} for n, _sd, mk, p, w, _shape, _rows in CASES]
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, in_path, out_path = (Path(tmp) / f for f in ("c.json", "in.st", "out.st"))
        spec_path.write_text(json.dumps(spec))
        save_file(tensors, str(in_path))
        command = [args.mergekit_python, "-c", MERGEKIT_SNIPPET]
        command += [str(spec_path), str(in_path), str(out_path)]
        run = subprocess.run(command, capture_output=True, text=True, check=True)
        mergekit_version = run.stdout.strip().splitlines()[-1]
        theirs = load_file(str(out_path))

    results = []
    for name, sd_method, mk_method, params, weights, shape, rows in CASES:
        base = tensors[f"{name}.base"]
        fts = [tensors[f"{name}.ft{i}"] for i in range(len(weights))]
        ours = star_dist_merge(sd_method, params, weights, base, fts, rows or shape[0])
        diff = (ours - theirs[name]).abs().max().item()
        update = (theirs[name] - base).abs().max().item()
        entries_differing = int((ours != theirs[name]).sum())
        results.append(
            {
                "case": name,
                "star_dist": sd_method,
                "mergekit": mk_method,
                "params": params,
                "weights": weights,
                "shape": list(shape),
                "row_block": rows,
                "max_abs_diff": diff,
                "max_abs_update": update,
                "entries_differing": entries_differing,
                "entries": base.numel(),
            }
        )
        print(f"{name:24s} max|ours − mergekit| = {diff:.3e}   (max |update| {update:.3e}; "
              f"{entries_differing} of {base.numel()} entries differ)")
    report = {
        "mergekit_version": mergekit_version,
        "torch": torch.__version__,
        "dtype": "float32",
        "inputs": "base ~ N(0,1), fine-tunes = base + 0.01·N(0,1), seed 1234",
        "cases": results,
        "max_abs_diff_overall": max(r["max_abs_diff"] for r in results if r["case"] not in QUANTIZED),
        "note": "ties_bf16_values: entries tied at the trim threshold are kept in row-major order by "
                "star_dist and in an arbitrary order by mergekit; only those entries can differ",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
