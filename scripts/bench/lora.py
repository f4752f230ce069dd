"""LoRA benchmarks: factorized against dense STAR, and 12 adapters merged over a 1B-shaped base.

    nice -n 10 .venv/bin/python scripts/bench/lora.py            # ~8 min on 2 busy cores
    nice -n 10 .venv/bin/python scripts/bench/lora.py --quick    # < 1 min smoke run

(a) One 4096×4096 update of rank 16, τ = s·B·A (s = lora_alpha / r = 2), at η = 40, torch
    with 1 thread. Timed, interleaved in rounds: `Star().transform(LowRank(s·B, A))` (the
    factorized path: two QRs and a 16×16 SVD), the same `Star().transform` on the dense
    matrix s·B@A (formed before the clock starts; values-only SVD plus a float64 Gram
    eigendecomposition), and the naive STAR of the authors (a full `torch.linalg.svd`, the
    rank rule, U_r diag(σ') V_rᵀ formed densely). Speedup = median(dense) / median(factorized);
    the results are compared densely after timing.
(b) End to end: a generated base shaped like Llama-3.2-1B (hidden 2048, 16 layers,
    intermediate 8192, 32 heads / 4 KV heads; vocab 32000, untied; bfloat16 like the real
    checkpoints: 1.09B parameters, 2.2 GB) written with `star_dist.tiny_models.save_model`,
    12 PEFT adapters (r = 16, lora_alpha = 32, q/k/v/o/gate/up/down of every layer, float32,
    written directly as adapter_config.json + adapter_model.safetensors), merged with STAR by
    `star_dist.merge(runtime="local")` into a full bfloat16 model in a child process. Wall
    time, and peak memory measured from outside (see _bench.py: sampled RssAnon, plus VmHWM
    and ru_maxrss that also count the memory-mapped input pages). Two merged tensors are
    checked against an independent dense computation (a full SVD of each s·B@A): beyond the
    rounding to bfloat16, they must agree to float32 precision of the update.

Writes scripts/bench/results/lora.json; generated files are removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from _bench import MIB, machine_info, median, run_merge_child, star_dist_digest, write_result  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import star_dist  # noqa: E402
from star_dist.methods import LowRank, Star, StarParams  # noqa: E402
from star_dist.tiny_models import TinyShape, llama_config, llama_shapes, save_model  # noqa: E402

ETA = 40.0
RANK = 16
ALPHA = 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPE_1B = TinyShape(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=4, vocab=32000)


def naive_star(tau: torch.Tensor, eta: float) -> torch.Tensor:
    """The authors' STAR: full thin SVD, searchsorted rank, rescale, dense U_r diag(σ') V_rᵀ."""
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)  # (m, k), (k,), (k, n)
    total = s.sum()
    r = min(int(torch.searchsorted(torch.cumsum(s, 0), (total * eta / 100).reshape(1))) + 1, s.numel())
    kept = s[:r] * (total / s[:r].sum())  # (r,)
    return (u[:, :r] * kept) @ vh[:r]  # (m, n)


def lora_factors(out_dim: int, in_dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A like PEFT's init scale, B as after training (small, dense): A (r, in), B (out, r)."""
    a = torch.randn(RANK, in_dim, generator=gen) / in_dim**0.5  # (r, in)
    b = torch.randn(out_dim, RANK, generator=gen) * 0.02  # (out, r)
    return a, b


def rel_max_diff(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).abs().max() / ref.abs().max())


def bench_factorized(size: int, rounds: int, fact_repeats: int) -> dict[str, Any]:
    """(a): factorized vs dense vs naive STAR on one size×size rank-16 update."""
    gen = torch.Generator().manual_seed(0)
    a, b = lora_factors(size, size, gen)
    left = b * (ALPHA / RANK)  # (m, r) s·B
    start = time.perf_counter()
    tau = left @ a  # (m, n) the dense update
    form_s = time.perf_counter() - start
    star = Star(StarParams(ETA))
    times: dict[str, list[float]] = {"factorized": [], "dense": [], "naive": []}
    results: dict[str, Any] = {}

    def run(name: str, fn: Any) -> None:
        start = time.perf_counter()
        results[name] = fn()
        times[name].append(time.perf_counter() - start)

    for rnd in range(rounds):
        for _ in range(fact_repeats):
            run("factorized", lambda: star.transform(LowRank(left, a)))
        run("dense", lambda: star.transform(tau))
        for _ in range(fact_repeats):
            run("factorized", lambda: star.transform(LowRank(left, a)))
        run("naive", lambda: naive_star(tau, ETA))
        print(f"  round {rnd}: factorized {median(times['factorized']) * 1e3:.1f} ms, dense "
              f"{times['dense'][-1]:.1f}s, naive {times['naive'][-1]:.1f}s", flush=True)
    fact, fact_stats = results["factorized"]
    dense, dense_stats = results["dense"]
    fact_m, dense_m = fact.dense(), dense.dense()  # (m, n) each, formed only to compare
    naive_m = results["naive"]
    med = {k: median(v) for k, v in times.items()}
    return {
        "shape": [size, size],
        "lora_rank": RANK,
        "scale": ALPHA / RANK,
        "eta": ETA,
        "torch_threads": torch.get_num_threads(),
        "form_dense_s": form_s,
        "samples_s": times,
        "median_s": med,
        "speedup_factorized_over_dense": med["dense"] / med["factorized"],
        "speedup_factorized_over_naive": med["naive"] / med["factorized"],
        "target_speedup": 100,
        "kept_rank": {"factorized": fact_stats["kept_rank"], "dense": dense_stats["kept_rank"]},
        "max_rel_diff_factorized_vs_dense": rel_max_diff(fact_m, dense_m),
        "max_rel_diff_factorized_vs_naive": rel_max_diff(fact_m, naive_m),
        "max_rel_diff_dense_vs_naive": rel_max_diff(dense_m, naive_m),
        "note": "max_rel_diff = max|x − ref| / max|ref| over the (m, n) results",
    }


def write_base(folder: Path, shape: TinyShape, dtype: str, seed: int = 0) -> int:
    """A random base, one tensor at a time in the target dtype (never a float32 copy of all)."""
    gen = torch.Generator().manual_seed(seed)
    target = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    tensors = {}
    for name, dims in llama_shapes(shape).items():
        if len(dims) == 1:
            value = torch.ones(dims) + 0.01 * torch.randn(dims, generator=gen)
        else:
            value = torch.randn(dims, generator=gen) / dims[-1] ** 0.5
        tensors[name] = value.to(target)
    save_model(folder, tensors, llama_config(shape, dtype), dtype, shards=4)
    return sum(t.numel() for t in tensors.values())


def write_adapter(folder: Path, shape: TinyShape, base_folder: Path, seed: int) -> None:
    """A PEFT LoRA adapter folder over every attention and MLP projection of every layer."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, dims in llama_shapes(shape).items():
        module = name.removesuffix(".weight")
        if len(dims) != 2 or module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        a, b = lora_factors(dims[0], dims[1], gen)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a  # (r, in)
        tensors[f"base_model.model.{module}.lora_B.weight"] = b  # (out, r)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_folder),
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def read_tensor(folder: Path, name: str) -> torch.Tensor:
    index = folder / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(str(folder / file), framework="pt") as fh:
        return fh.get_tensor(name)


def check_tensor(name: str, base: Path, adapters: list[Path], merged: Path) -> dict[str, Any]:
    """Independent reference: mean of naive STAR of each dense s·B@A, plus the base, in float32."""
    acc = None
    for folder in adapters:
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as fh:
            module = "base_model.model." + name.removesuffix(".weight")
            a = fh.get_tensor(module + ".lora_A.weight")  # (r, in)
            b = fh.get_tensor(module + ".lora_B.weight")  # (out, r)
        update = naive_star((ALPHA / RANK) * b @ a, ETA)  # (out, in)
        acc = update if acc is None else acc + update
    update = acc / len(adapters)  # (out, in)
    reference = read_tensor(base, name).float() + update  # (out, in) float32
    got = read_tensor(merged, name)
    # Rounding to the output dtype moves a value by at most half a unit in the last place;
    # whatever exceeds that is the merge's own error, compared with the size of the update.
    half_ulp = 0.5 * torch.finfo(got.dtype).eps * 2.0 ** torch.floor(torch.log2(reference.abs().clamp_min(1e-30)))
    excess = ((got.float() - reference).abs() - half_ulp).clamp_min(0)  # (out, in)
    return {
        "tensor": name,
        "shape": list(got.shape),
        "out_dtype": str(got.dtype),
        "fraction_equal_to_reference_rounded": float((got == reference.to(got.dtype)).float().mean()),
        "max_abs_diff": float((got.float() - reference).abs().max()),
        "max_error_beyond_rounding_rel_to_update": float(excess.max() / update.abs().max()),
    }


def bench_end_to_end(args: argparse.Namespace, shape: TinyShape, work: Path) -> dict[str, Any]:
    """(b): generate base + 12 adapters, merge in a child process, measure time and memory."""
    start = time.perf_counter()
    n_params = write_base(work / "base", shape, args.dtype)
    adapters = [work / f"adapter{i}" for i in range(args.adapters)]
    for i, folder in enumerate(adapters):
        write_adapter(folder, shape, work / "base", seed=100 + i)
    gen_s = time.perf_counter() - start
    base_bytes = sum(p.stat().st_size for p in (work / "base").glob("*.safetensors"))
    adapter_bytes = sum((f / "adapter_model.safetensors").stat().st_size for f in adapters)
    print(f"  generated a {n_params / 1e6:.0f}M-parameter {args.dtype} base ({base_bytes / 1e6:.0f} MB) and "
          f"{len(adapters)} adapters ({adapter_bytes / 1e6:.0f} MB) in {gen_s:.0f}s", flush=True)
    config = {
        "merge_method": "star",
        "base_model": str(work / "base"),
        "models": [{"model": str(f)} for f in adapters],
        "parameters": {"eta": ETA},
    }
    plan = star_dist.plan(config, work / "merged")
    run = run_merge_child({"config": config, "out": str(work / "merged")})
    print(f"  merge: {run['merge_wall_s']:.1f}s, peak RssAnon {run['peak_rss_anon'] / MIB:.0f} MiB "
          f"({run['peak_rss_anon_above_baseline'] / MIB:.0f} MiB above the imports), VmHWM "
          f"{run['vm_hwm'] / MIB:.0f} MiB", flush=True)
    layer = shape.layers - 1
    names = ["model.layers.0.self_attn.k_proj.weight", f"model.layers.{layer}.self_attn.v_proj.weight"]
    checks = [check_tensor(n, work / "base", adapters, work / "merged") for n in names]
    return {
        "shape": vars(shape),
        "base_params": n_params,
        "base_dtype": args.dtype,
        "base_bytes": base_bytes,
        "adapters": len(adapters),
        "adapter_rank": RANK,
        "lora_alpha": ALPHA,
        "target_modules": list(TARGETS),
        "adapter_dtype": "float32",
        "adapter_bytes_total": adapter_bytes,
        "runtime": "local",
        "threads": 1,
        "generate_s": gen_s,
        "merge_wall_s": run["merge_wall_s"],
        "process_wall_s": run["process_wall_s"],
        "cpu_s": run["user_cpu_s"] + run["sys_cpu_s"],
        "peak_rss_anon_bytes": run["peak_rss_anon"],
        "baseline_rss_anon_bytes": run["baseline_rss_anon"],
        "peak_rss_anon_above_baseline_bytes": run["peak_rss_anon_above_baseline"],
        "vm_hwm_bytes": run["vm_hwm"],
        "ru_maxrss_bytes": run["ru_maxrss"],
        "peak_rss_file_bytes": run["peak_rss_file"],
        "memory_samples": run["samples"],
        "plan_peak_memory_estimate_bytes": plan.peak_memory_per_worker,
        "memory_method": "RssAnon of the merging child process sampled every 2 ms from /proc/<pid>/status "
                         "(anonymous memory: what the merge allocates); VmHWM and ru_maxrss (os.wait4) "
                         "also count the file-backed pages of the memory-mapped inputs",
        "spot_checks": checks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a < 1 min smoke run")
    parser.add_argument("--size", type=int, default=4096, help="(a): the update is size×size")
    parser.add_argument("--rounds", type=int, default=2, help="(a): interleaved rounds of dense and naive")
    parser.add_argument("--fact-repeats", type=int, default=10, help="(a): factorized runs per half-round")
    parser.add_argument("--adapters", type=int, default=12)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="(b): base dtype")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--workdir", help="where to generate (b)'s files (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    shape = SHAPE_1B
    if args.quick:
        args.size, args.rounds, args.fact_repeats = 1024, 1, 5
        shape = TinyShape(hidden=256, intermediate=704, layers=2, heads=8, kv_heads=2, vocab=2048)
    torch.set_num_threads(1)  # as one merge worker (threads_per_worker = 1)
    machine = machine_info()
    start = time.perf_counter()

    print(f"(a) factorized vs dense STAR, {args.size}x{args.size}, rank {RANK}", flush=True)
    factorized = bench_factorized(args.size, args.rounds, args.fact_repeats)
    end_to_end = None
    if not args.skip_e2e:
        root = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        need = 3 * 2 * 1_000_000_000 if not args.quick else 100 * MIB  # base + merged + adapters, with margin
        if free < need:
            sys.exit(f"{root}: {free / 1e9:.1f} GB free, (b) needs about {need / 1e9:.0f} GB; use --workdir")
        work = Path(tempfile.mkdtemp(prefix="star_bench_lora_", dir=root))
        print(f"(b) 12 adapters over a 1B-shaped base in {work} ({free / 1e9:.0f} GB free)", flush=True)
        try:
            end_to_end = bench_end_to_end(args, shape, work)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "lora",
        "quick": args.quick,
        "machine": machine,
        "loadavg_at_end": list(os.getloadavg()),
        "star_dist_changed_during_run": star_dist_digest() != machine["star_dist_digest"],
        "total_s": time.perf_counter() - start,
        "factorized_vs_dense": factorized,
        "end_to_end": end_to_end,
    }
    path = write_result("lora_quick" if args.quick else "lora", result)
    f = factorized
    print(f"\n(a) {args.size}x{args.size} rank {RANK}: factorized {f['median_s']['factorized'] * 1e3:.1f} ms, "
          f"dense {f['median_s']['dense']:.1f}s (x{f['speedup_factorized_over_dense']:.0f}), naive "
          f"{f['median_s']['naive']:.1f}s (x{f['speedup_factorized_over_naive']:.0f}); kept rank "
          f"{f['kept_rank']}; max rel diff vs dense {f['max_rel_diff_factorized_vs_dense']:.1e}, "
          f"vs naive {f['max_rel_diff_factorized_vs_naive']:.1e}")
    if end_to_end:
        e = end_to_end
        print(f"(b) {e['adapters']} adapters, {e['base_params'] / 1e9:.2f}B {e['base_dtype']} base: merge "
              f"{e['merge_wall_s']:.1f}s, peak RssAnon {e['peak_rss_anon_bytes'] / MIB:.0f} MiB "
              f"(+{e['peak_rss_anon_above_baseline_bytes'] / MIB:.0f} MiB over imports), "
              f"VmHWM {e['vm_hwm_bytes'] / MIB:.0f} MiB; spot checks "
              f"{[round(c['fraction_equal_to_reference_rounded'], 5) for c in e['spot_checks']]} equal")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
