"""STAR on one GPU: the Gram kernels vs torch.linalg.svd on the same GPU, a whole merge, the uploader.

    python3 scripts/bench/gpu.py --out $OUT/gpu.json     # on a machine with a CUDA GPU (its own CUDA torch), < 8 min
    .venv/bin/python scripts/bench/gpu.py --cpu-dry-run    # tiny sizes on the CPU: checks it runs end to end

Sections, each under a share of the time budget (`--budget-s`, default 420 s; a row whose
predicted time would overrun is recorded as skipped, never silently dropped):
  accuracy  σ of a 2048×8192 τ from the float64 Gram route, a float32 Gram matrix (TF32 off) and
            the float32 SVD, against a float64 SVD on the GPU: why the GPU route keeps float64 G.
  kernel    8192×8192, 8192×28672, 4096×14336, fp32 and bf16 inputs (upcast to float32, as the
            engine does), spectra σ_i ∝ 1/i and rank 64 + noise: `naive` (torch.linalg.svd, the
            authors' rule, U_r diag(σ') V_rᵀ formed) vs `star` (Star(): Gram values on the GPU, the
            certified iteration); CUDA-synchronized wall times, medians, same kept ranks?
  upload    8 host tensors (4096×14336 bf16) merged one after another: plain `.to(device)` vs
            `star_dist.device.Uploader` (pinned buffers, side stream: the next copy overlaps).
  merge     a generated llama-shaped bf16 model (hidden 4096, intermediate 14336, 1 layer,
            vocab 8192) × 4 fine-tunes: star_dist.merge(device="cuda", in-process) vs the naive
            in-memory STAR with torch.linalg.svd on the same GPU.
Sections after the kernel predict their time from the kernel rows' seconds per element and are
skipped, with the reason, when it would not fit. The JSON is rewritten after every section, so
a run stopped from outside keeps what it measured. Writes scripts/bench/results/gpu.json
(gpu_cpu_dry_run.json for the dry run), or --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench  # noqa: E402

from star_dist.device import TF32_OVERRIDE, Uploader, resolve_device  # noqa: E402
from star_dist.methods import Star, StarParams  # noqa: E402
from star_dist.methods.spectral import gram_side, kept_rank, singular_values  # noqa: E402
from star_dist.methods.spectrum import gram_values, star_spectrum  # noqa: E402

ETA = 40.0
SHAPES = [(8192, 8192), (8192, 28672), (4096, 14336)]
DRY_SHAPES = [(64, 64), (64, 224), (32, 112)]


class Budget:
    """Wall-clock budget: a row runs only if its predicted time fits in what is left."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, predicted_s: float) -> bool:
        return predicted_s < self.left()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall seconds of fn() with the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def make(kind: str, m: int, n: int, device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A float32 (m, n) task vector, made on the device: σ_i ∝ 1/i or rank 64 + 1e-3 noise; with a
    bf16 `dtype` the base and fine-tune are bf16, so τ carries their rounding as real ones do."""
    gen = torch.Generator(device=device).manual_seed(seed)
    k = min(m, n)
    if kind == "power_law":
        decay = torch.arange(1, k + 1, device=device, dtype=torch.float32) ** -1.0  # (k,)
        left = torch.randn(m, k, generator=gen, device=device) / m**0.5  # (m, k)
        tau = (left * decay) @ (torch.randn(k, n, generator=gen, device=device) / n**0.5)  # (m, n)
    else:
        left = torch.randn(m, 64, generator=gen, device=device)  # (m, 64)
        tau = left @ torch.randn(64, n, generator=gen, device=device) / (8 * n**0.5)
        tau += 1e-3 * torch.randn(m, n, generator=gen, device=device)
    base = torch.randn(m, n, generator=gen, device=device) / n**0.5  # (m, n)
    tau *= 0.01 * base.std() / tau.std()  # an update ~1% of the weights: a few bf16 steps
    return (base + tau).to(dtype).float() - base.to(dtype).float()  # τ = W_ft − W_base, upcast


def naive_star(tau: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The authors' STAR on the same device: full thin SVD, their rule, the dense result."""
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)  # (m, k), (k,), (k, n)
    r = min(int(torch.searchsorted(torch.cumsum(s, 0), (s.sum() * ETA / 100).reshape(1))) + 1, s.numel())
    return (u[:, :r] * (s[:r] * (s.sum() / s[:r].sum()))) @ vh[:r], r  # (m, n)


def star_dense(tau: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Star() on τ's device, then what the engine does: acc += left @ right."""
    update, stats = Star(StarParams(ETA)).transform(tau)
    acc = torch.zeros_like(tau)
    acc.addmm_(update.left, update.right)  # (m, r) @ (r, n)
    return acc, stats["kept_rank"]


# -- sections ----------------------------------------------------------------------------------


def bench_accuracy(device: torch.device, dry: bool) -> dict:
    """σ errors against a float64 SVD: float64 Gram, float32 Gram (TF32 off), float32 SVD."""
    m, n = (32, 128) if dry else (2048, 8192)
    tau = make("power_law", m, n, device, torch.float32, seed=7)
    truth = torch.linalg.svdvals(tau.double())  # (k,)
    tall = tau.T if m < n else tau
    torch.backends.cuda.matmul.allow_tf32 = False
    g32 = torch.linalg.eigvalsh(tall.T @ tall).flip(0).clamp(min=0).sqrt().double()  # float32 G
    out: dict[str, Any] = {"shape": [m, n]}
    routes = (("gram64", gram_values(gram_side(tau))), ("gram32", g32), ("svd32", singular_values(tau).double()))
    for name, s in routes:
        err = (s - truth).abs()
        out[f"{name}_max_abs_err_over_s1"] = float(err.max() / truth[0])
        out[f"{name}_nuclear_norm_rel_err"] = float((s.sum() - truth.sum()).abs() / truth.sum())
    out["choice"] = "float64 Gram: a float32 G loses ~√eps32·σ_1 on the small σ, far below the float32 SVD"
    print(f"accuracy {m}x{n}: max |σ err|/σ_1 gram64 {out['gram64_max_abs_err_over_s1']:.1e}, "
          f"gram32 {out['gram32_max_abs_err_over_s1']:.1e}, svd32 {out['svd32_max_abs_err_over_s1']:.1e}", flush=True)
    return out


def kernel_row(shape: tuple[int, int], kind: str, dtype: torch.dtype, device: torch.device, repeats: int) -> dict:
    tau = make(kind, *shape, device, dtype, seed=shape[0] + shape[1])
    timed(lambda: star_dense(tau), device)  # warm-up: cuSOLVER/cuBLAS handles and workspaces
    times: dict[str, list[float]] = {"naive": [], "star": []}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in (("naive", naive_star), ("star", star_dense)):
            seconds, results[name] = timed(lambda fn=fn: fn(tau), device)
            times[name].append(seconds)
    (ref, r_naive), (ours, r_star) = results["naive"], results["star"]
    row = {"shape": list(shape), "kind": kind, "input_dtype": str(dtype).removeprefix("torch."),
           "naive_s": statistics.median(times["naive"]), "star_s": statistics.median(times["star"]),
           "runs_s": times, "kept_rank_naive": r_naive, "kept_rank_star": r_star,
           "kept_rank_reference": kept_rank(singular_values(tau), ETA),
           "spectrum_route": star_spectrum(tau, ETA).route,
           "max_rel_diff_vs_naive": float((ours - ref).abs().max() / ref.abs().max())}
    row["speedup"] = statistics.median(a / b for a, b in zip(times["naive"], times["star"], strict=True))
    print(f"kernel {shape[0]}x{shape[1]} {kind} {row['input_dtype']}: naive {row['naive_s']:.2f}s star "
          f"{row['star_s']:.2f}s (x{row['speedup']:.1f}), ranks {r_naive}/{r_star}", flush=True)
    return row


def bench_kernel(device: torch.device, dry: bool, budget: Budget, repeats: int) -> list[dict]:
    rows: list[dict] = []
    per_element = 0.0  # seconds per τ entry for one whole row, learned from the rows done
    for shape in DRY_SHAPES if dry else SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for kind in ("power_law", "lowrank_plus_noise"):
                predicted = per_element * shape[0] * shape[1]
                if not budget.allows(predicted):
                    rows.append({"shape": list(shape), "kind": kind, "input_dtype": str(dtype), "skipped":
                                 f"predicted {predicted:.0f}s, {budget.left():.0f}s left in the budget"})
                    continue
                start = time.perf_counter()
                rows.append(kernel_row(shape, kind, dtype, device, repeats))
                per_element = max(per_element, (time.perf_counter() - start) / (shape[0] * shape[1]))
    return rows


def seconds_per_element(rows: list[dict]) -> dict[str, float] | None:
    """The slowest measured kernel row's seconds per τ entry, for naive and star; None if none ran."""
    done = [row for row in rows if "skipped" not in row]
    if not done:
        return None
    return {name: max(row[f"{name}_s"] / (row["shape"][0] * row["shape"][1]) for row in done)
            for name in ("naive", "star")}


def matrix_elements(shape: Any) -> int:
    """Entries of the 2-D weights of a TinyShape llama, one model: what STAR decomposes."""
    from star_dist.tiny_models import llama_shapes

    return sum(s[0] * s[1] for s in llama_shapes(shape).values() if len(s) == 2)


def fits(budget: Budget, predicted: float, dry: bool) -> str | None:
    """None when a section may run; else why it is skipped."""
    if dry or budget.allows(predicted):
        return None
    return f"predicted {predicted:.0f}s, {budget.left():.0f}s left in the budget"


def bench_upload(device: torch.device, dry: bool, budget: Budget, rates: dict[str, float] | None) -> dict:
    """Merging 8 host tensors one by one: plain copies vs the overlapped uploader."""
    m, n = (32, 112) if dry else (4096, 14336)
    skip = fits(budget, 16 * rates["star"] * m * n if rates else float("inf"), dry)  # 2 passes × 8 STARs
    if skip:
        return {"skipped": skip}
    gen = torch.Generator().manual_seed(5)
    hosts = [(torch.randn(m, 64, generator=gen) @ torch.randn(64, n, generator=gen)).bfloat16() for _ in range(8)]
    star = Star(StarParams(ETA))

    def consume(tensors) -> None:
        for tensor in tensors:
            star.transform(tensor.float())

    plain, _ = timed(lambda: consume(h.to(device) for h in hosts), device)
    overlapped, _ = timed(lambda: consume(Uploader(device).stream_of((lambda h=h: h) for h in hosts)), device)
    print(f"upload 8 x {m}x{n} bf16: plain {plain:.2f}s, uploader {overlapped:.2f}s", flush=True)
    return {"tensors": 8, "shape": [m, n], "dtype": "bfloat16", "plain_s": plain, "uploader_s": overlapped}


def naive_merge(folder: Path, device: torch.device, n_models: int) -> dict[str, torch.Tensor]:
    """The naive in-memory STAR on the device: every model loaded, torch.linalg.svd per matrix."""
    sys.path.insert(0, str(ROOT / "tests"))
    from reference import load_folder

    base = load_folder(folder / "base")
    fts = [load_folder(folder / f"ft{i}") for i in range(n_models)]
    merged = {}
    for name, w in base.items():
        w32 = w.to(device).float()
        taus = [ft[name].to(device).float() - w32 for ft in fts]
        taus = [naive_star(t)[0] for t in taus] if w.dim() == 2 else taus
        merged[name] = (w32 + torch.stack(taus).mean(0)).to(w.dtype).cpu()
    return merged


def bench_merge(device: torch.device, dry: bool, budget: Budget, rates: dict[str, float] | None) -> dict:
    import star_dist
    from star_dist.tiny_models import TinyShape, make_tiny_merge

    shape = TinyShape(hidden=64, intermediate=224, layers=1, heads=4, kv_heads=2, vocab=256) if dry else \
        TinyShape(hidden=4096, intermediate=14336, layers=1, heads=32, kv_heads=8, vocab=8192)
    # 4 fine-tunes through both contenders, plus a minute to write and read the models.
    predicted = 4 * (rates["naive"] + rates["star"]) * matrix_elements(shape) + 60 if rates else float("inf")
    skip = fits(budget, predicted, dry)
    if skip:
        return {"skipped": skip}
    with tempfile.TemporaryDirectory(prefix="gpu_merge_") as tmp:
        start = time.perf_counter()
        config = make_tiny_merge(Path(tmp), n_models=4, dtype="bfloat16", shape=shape, shards=2)
        made = time.perf_counter() - start
        ours, _ = timed(lambda: star_dist.merge(config, Path(tmp) / "out", runtime="local", device=device.type,
                                                quiet=True, threads_per_worker=1), device)
        naive, merged = timed(lambda: naive_merge(Path(tmp), device, 4), device)
        sys.path.insert(0, str(ROOT / "tests"))
        from reference import load_folder

        got = load_folder(Path(tmp) / "out")
        diff = max(float((got[k].float() - merged[k].float()).abs().max()) for k in merged)
    print(f"merge bf16 ×4 on {device}: star_dist {ours:.1f}s, naive {naive:.1f}s (x{naive / ours:.1f})", flush=True)
    return {"shape": shape.__dict__, "n_models": 4, "dtype": "bfloat16", "make_models_s": made, "star_dist_s": ours,
            "naive_s": naive, "speedup": naive / ours, "max_abs_diff_vs_naive": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU, to check the script runs")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget for all sections")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the JSON here instead of scripts/bench/results/")
    args = parser.parse_args()
    if not args.cpu_dry_run and not torch.cuda.is_available():
        sys.exit("gpu.py: no CUDA device here; run it on a GPU machine, or pass --cpu-dry-run to check it runs")
    device = torch.device("cpu") if args.cpu_dry_run else resolve_device("cuda")
    budget = Budget(args.budget_s)
    report: dict[str, Any] = {"machine_start": _bench.machine_info(), "device": str(device), "eta": ETA,
                              "tf32": {"override_env": os.environ.get(TF32_OVERRIDE),
                                       "float32_matmul_precision": torch.get_float32_matmul_precision()}}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)

    def save() -> Path:
        report["total_s"] = args.budget_s - budget.left()
        if args.out is not None:
            args.out.write_text(json.dumps(report, indent=1) + "\n")
            return args.out
        return _bench.write_result("gpu_cpu_dry_run" if args.cpu_dry_run else "gpu", report)

    report["accuracy"] = bench_accuracy(device, args.cpu_dry_run)
    save()
    kernel_budget = Budget(min(budget.left(), 0.55 * args.budget_s))
    report["kernel"] = bench_kernel(device, args.cpu_dry_run, kernel_budget, args.repeats)
    save()
    rates = seconds_per_element(report["kernel"])
    report["upload"] = bench_upload(device, args.cpu_dry_run, budget, rates)
    save()
    report["merge"] = bench_merge(device, args.cpu_dry_run, budget, rates)
    print(f"wrote {save()}")


if __name__ == "__main__":
    main()
