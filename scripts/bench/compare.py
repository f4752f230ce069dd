"""star_dist against mergekit 0.1.5, the naive in-memory STAR and the I/O floor, in one run.

    nice -n 10 .venv/bin/python scripts/bench/compare.py                   # 300M llama-shaped × 4, bf16 + fp32
    nice -n 10 .venv/bin/python scripts/bench/compare.py --size 100m --rounds 3
    nice -n 10 .venv/bin/python scripts/bench/compare.py --contenders floor sd_ta mk_ta --dtypes bfloat16
    .venv/bin/python scripts/bench/compare.py --render   # docs/benchmarks.md + .png from results/compare.json

Every contender runs in its own child process, measured from outside: wall time, CPU time
(`os.wait4`), peak RSS (VmHWM) and peak anonymous memory (RssAnon, both sampled every 5 ms:
file-backed pages of mapped inputs are page cache, not what a merge holds), plus the machine's
busy cores while it ran, so others' CPU share is known. Each child also times its own merge
call (`inner_s`, no interpreter start or imports): ratios are taken on that. Contenders are
interleaved, the order rotating each round; medians over rounds. Every contender starts from
the same page cache: with `--cache warm` (the default) its inputs are read once, untimed, just
before it starts (a page cache that empties between contenders, as on small VMs, would
otherwise decide the ratios); with `--cache cold` they are evicted (`POSIX_FADV_DONTNEED`), as
for a model too large to stay cached.

Contenders: `floor` reads every input file once and writes the output's bytes (fsync), the
bound of any streaming merge; `sd_<m>` is star_dist (`star_dist.merge`, in process, 1 thread);
`mk_<m>` is mergekit 0.1.5's `run_merge` (CPU, its defaults), installed by this script into its
own venv (`--mergekit-venv`), which borrows this interpreter's packages (torch among them) so
pip adds only mergekit and what it lacks; `naive_star` loads every model and runs a full
float32 SVD per matrix (STAR as the paper's code does it). Methods: ta (task arithmetic),
avg (average), ties (density 0.2), star (η = 40; slow: opt in with `--contenders`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import PYTHON, ROOT, CpuLoad, child_env, machine_info, median, output_hashes, proc_status  # noqa: E402

MERGEKIT = "mergekit==0.1.5"
DEFAULT_VENV = Path.home() / ".cache" / "star_dist" / "bench" / "mergekit-0.1.5"
RESULTS = Path(__file__).resolve().parent / "results"
DOCS = ROOT / "docs"
N_MODELS = 4
# name -> TinyShape fields: llama-shaped, about 106M and 290M parameters.
SIZES = {
    "100m": {"hidden": 768, "intermediate": 2048, "layers": 8, "heads": 12, "kv_heads": 4, "vocab": 32000},
    "300m": {"hidden": 1024, "intermediate": 2816, "layers": 20, "heads": 16, "kv_heads": 4, "vocab": 32000},
}
METHODS = {"ta": ("task_arithmetic", {}), "avg": ("average", {}), "ties": ("ties", {"density": 0.2}),
           "star": ("star", {"eta": 40})}
MK_METHODS = {"ta": "task_arithmetic", "avg": "linear", "ties": "ties"}
DEFAULT_CONTENDERS = ["floor", "sd_ta", "mk_ta", "sd_avg", "sd_ties", "mk_ties"]
COLD_NAME = "compare_cold"  # the canonical --cache cold run, shown in docs/ after the warm one


# -- setup -------------------------------------------------------------------------------------
def ensure_mergekit(venv: Path) -> Path:
    """The venv's python, with mergekit 0.1.5 installed (once). It sees this interpreter's
    site-packages through a .pth file, so the CPU torch here is reused, never re-downloaded."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import mergekit"], capture_output=True).returncode == 0:
        return python
    subprocess.run([PYTHON, "-m", "venv", str(venv)], check=True)
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "_star_dist_host.pth").write_text("\n".join(ours) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", MERGEKIT], check=True)
    return python


def make_models(folder: Path, size: str, dtype: str) -> Path:
    """base/ and ft0..3/ of the llama shape `size` (made once; a stamp marks a finished set)."""
    stamp = folder / "done.json"
    if stamp.exists():
        return folder
    from star_dist.tiny_models import TinyShape, make_tiny_merge

    shutil.rmtree(folder, ignore_errors=True)
    make_tiny_merge(folder, n_models=N_MODELS, dtype=dtype, shape=TinyShape(**SIZES[size]), shards=4)
    stamp.write_text(json.dumps({"size": size, "dtype": dtype}))
    return folder


def merge_config(models: Path, short: str, dtype: str, mergekit: bool = False) -> dict[str, Any]:
    """The same merge for both tools, in mergekit's YAML schema (which star_dist reads)."""
    method, params = METHODS[short]
    return {
        "merge_method": MK_METHODS[short] if mergekit else method,
        "base_model": str(models / "base"),
        "models": [{"model": str(models / f"ft{i}"), "parameters": {"weight": 1.0}} for i in range(N_MODELS)],
        "parameters": params,
        "dtype": dtype,
    }


# -- measuring ---------------------------------------------------------------------------------
def run_measured(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run `cmd`, sampling its RssAnon; its last JSON stdout line plus wall, CPU, memory, load."""
    with CpuLoad() as load:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak = _sample_rss_anon(proc.pid)
        out_err = [""] * 2
        readers = [threading.Thread(target=lambda i=i, s=s: out_err.__setitem__(i, s.read()), daemon=True)
                   for i, s in enumerate((proc.stdout, proc.stderr))]
        for r in readers:
            r.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        peak["stop"].set()
        for r in readers:
            r.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{out_err[1][-3000:]}")
    report = json.loads([ln for ln in out_err[0].splitlines() if ln.startswith("{")][-1])
    cpu = usage.ru_utime + usage.ru_stime
    # ru_maxrss is not used: it counts the parent's pages in the child between fork and exec.
    above = peak["value"] - report["baseline_anon"] if "baseline_anon" in report else peak["value"]
    return {**report, "wall_s": wall, "cpu_s": cpu, "peak_rss_hwm": peak["hwm"],
            "peak_rss_anon": peak["value"], "peak_anon_above_imports": above, "busy_cores": load.busy_cores,
            "others_cores": max(0.0, load.busy_cores - cpu / wall), "loadavg": os.getloadavg()[0]}


def _sample_rss_anon(pid: int, interval_s: float = 0.005) -> dict[str, Any]:
    """A thread keeping the largest RssAnon and VmHWM seen of `pid` in the returned dict, until "stop"."""
    state: dict[str, Any] = {"value": 0, "hwm": 0, "stop": threading.Event()}

    def loop() -> None:
        while not state["stop"].is_set():
            status = proc_status(pid)
            state["value"] = max(state["value"], status.get("RssAnon", 0))
            state["hwm"] = max(state["hwm"], status.get("VmHWM", 0))  # the exec'd program's own peak
            time.sleep(interval_s)

    threading.Thread(target=loop, daemon=True).start()
    return state


def command(contender: str, models: Path, out: Path, dtype: str, mk_python: Path | None) -> list[str]:
    """The child process that runs one contender on `models` into `out`."""
    me = str(Path(__file__).resolve())
    if contender == "floor":
        return [PYTHON, me, "_floor", str(models), str(out)]
    tool, short = contender.split("_", 1)
    if tool == "naive":
        return [PYTHON, me, "_naive_star", str(models), str(out), dtype]
    config = json.dumps(merge_config(models, short, dtype, mergekit=tool == "mk"))
    if tool == "mk":
        assert mk_python is not None
        return [str(mk_python), me, "_mergekit", config, str(out)]
    return [PYTHON, me, "_star_dist", config, str(out)]


# -- children ----------------------------------------------------------------------------------
def child_floor(models: Path, out: Path) -> None:
    """Read every input byte once; write as many bytes as the merged output has (+ fsync)."""
    start = time.perf_counter()
    buf = memoryview(bytearray(1 << 24))
    for folder in sorted(p for p in models.iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.safetensors")):
            with open(path, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    out.mkdir(parents=True)
    for path in sorted((models / "base").glob("*.safetensors")):
        left = path.stat().st_size
        with open(out / path.name, "wb") as fh:
            while left > 0:
                left -= fh.write(buf[: min(left, len(buf))])
            fh.flush()
            os.fsync(fh.fileno())
    print(json.dumps({"inner_s": time.perf_counter() - start}))


def child_star_dist(config: dict[str, Any], out: Path) -> None:
    """star_dist's merge call, timed after its imports (as mergekit's child is: a per-process
    constant, not a per-byte cost), which are timed on their own (`import_s`)."""
    start = time.perf_counter()
    import star_dist
    import star_dist.run
    import star_dist.runtime.local  # noqa: F401 - what `merge` would import inside the timing

    imported, baseline = time.perf_counter(), _anon_now()
    star_dist.merge(config, out, runtime="local", quiet=True, threads_per_worker=1)
    print(json.dumps({"inner_s": time.perf_counter() - imported, "import_s": imported - start,
                      "baseline_anon": baseline}))


def _anon_now() -> int:
    """This process's anonymous memory now: the imports, before the merge allocates anything."""
    return proc_status("self").get("RssAnon", 0)


def child_mergekit(config: dict[str, Any], out: Path) -> None:
    import torch
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    torch.set_num_threads(1)
    merge_config_ = MergeConfiguration.model_validate(config)
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    start, baseline = time.perf_counter(), _anon_now()
    run_merge(merge_config_, str(out), options)
    print(json.dumps({"inner_s": time.perf_counter() - start, "baseline_anon": baseline}))


def child_naive_star(models: Path, out: Path, dtype: str, eta: float = 40.0) -> None:
    """STAR the simple way: every model in memory, a full float32 SVD of each task vector."""
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    start, baseline = time.perf_counter(), _anon_now()
    load = {name: {} for name in ["base", *(f"ft{i}" for i in range(N_MODELS))]}
    for name, tensors in load.items():
        for path in sorted((models / name).glob("*.safetensors")):
            tensors.update(load_file(str(path)))
    merged = {}
    for key, base in load["base"].items():
        update = sum(_naive_star_one(load[f"ft{i}"][key].float() - base.float(), eta) for i in range(N_MODELS))
        merged[key] = (base.float() + update / N_MODELS).to(base.dtype)
    out.mkdir(parents=True)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    print(json.dumps({"inner_s": time.perf_counter() - start, "baseline_anon": baseline}))


def _naive_star_one(tau: Any, eta: float) -> Any:
    import torch

    if tau.dim() != 2 or not bool(tau.any()):
        return tau
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    cumulative = torch.cumsum(s, 0)
    r = int((cumulative < eta / 100 * cumulative[-1]).sum()) + 1
    return (u[:, :r] * (s[:r] * cumulative[-1] / cumulative[r - 1])) @ vh[:r]


# -- the run -----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every round: each dtype, each contender (rotated), measured; then medians and ratios."""
    mk_python = ensure_mergekit(Path(args.mergekit_venv)) if any(c.startswith("mk_") for c in args.contenders) else None
    work = Path(args.workdir)
    models = {dt: make_models(work / f"{args.size}_{dt}", args.size, dt) for dt in args.dtypes}
    result: dict[str, Any] = {"machine": machine_info(), "size": args.size, "n_models": N_MODELS,
                              "params": _count_params(models[args.dtypes[0]]), "samples": [], "hashes": {}}
    result["cache"] = args.cache
    for rnd in range(args.rounds):
        order = args.contenders[rnd % len(args.contenders):] + args.contenders[: rnd % len(args.contenders)]
        for dtype in args.dtypes:
            for contender in order:
                set_page_cache(models[dtype], args.cache)
                sample = _one(contender, models[dtype], work / "out", dtype, mk_python, result["hashes"])
                result["samples"].append({"round": rnd, "dtype": dtype, "contender": contender, **sample})
                print(f"round {rnd} {dtype:8s} {contender:10s} {sample['inner_s']:8.2f} s  "
                      f"anon {sample['peak_rss_anon'] / 2**20:7.0f} MiB  others {sample['others_cores']:.2f} cores")
    result["machine"]["star_dist_digest_at_end"] = machine_info()["star_dist_digest"]
    result["plan_peak_memory"], result["plan_seconds"] = plan_estimates(models, args.contenders)
    result["summary"] = summarize(result["samples"])
    return result


def set_page_cache(models: Path, state: str) -> None:
    """Put every input file of `models` in the page cache ("warm": read once) or out of it
    ("cold": flushed, then its pages dropped; the kernel drops clean pages only, so a file
    just generated would otherwise stay cached)."""
    buf = memoryview(bytearray(1 << 24))
    for path in sorted(models.glob("*/*.safetensors")):
        with open(path, "rb", buffering=0) as fh:
            if state == "cold":
                os.fsync(fh.fileno())
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                continue
            while fh.readinto(buf):
                pass


def _one(contender: str, models: Path, out: Path, dtype: str, mk_python: Path | None,
         hashes: dict[str, Any]) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    sample = run_measured(command(contender, models, out, dtype, mk_python), child_env())
    if contender.startswith("sd_"):  # star_dist's bytes must not change from round to round
        digest = output_hashes(out)
        sample["same_bytes_as_round_0"] = hashes.setdefault(f"{dtype}/{contender}", digest) == digest
    return sample


def plan_estimates(models: dict[str, Path], contenders: list[str]) -> tuple[dict[str, int], dict[str, float]]:
    """`star-dist plan`'s peak memory per worker and its CPU time estimate (one worker, one
    thread, as the contenders run) for each star_dist contender (headers only)."""
    import star_dist

    memory, seconds = {}, {}
    for dtype, folder in models.items():
        for contender in (c for c in contenders if c.startswith("sd_")):
            config = merge_config(folder, contender.split("_", 1)[1], dtype)
            plan = star_dist.plan(config, "/tmp/unused", device="cpu", workers=1, threads_per_worker=1)
            memory[f"{dtype}/{contender}"] = plan.peak_memory_per_worker
            seconds[f"{dtype}/{contender}"] = plan.estimate.cpu.seconds if plan.estimate else float("nan")
    return memory, seconds


def _count_params(models: Path) -> int:
    from star_dist.safetensors_format import read_header

    return sum(e.numel for p in (models / "base").glob("*.safetensors") for e in read_header(p)[0].values())


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per dtype and contender, and the ratios the targets are stated in."""
    keys = ("inner_s", "import_s", "wall_s", "cpu_s", "peak_rss_hwm", "peak_rss_anon", "peak_anon_above_imports",
            "others_cores")
    summary: dict[str, Any] = {}
    for dtype in sorted({s["dtype"] for s in samples}):
        rows = {}
        for contender in sorted({s["contender"] for s in samples if s["dtype"] == dtype}):
            mine = [s for s in samples if s["dtype"] == dtype and s["contender"] == contender]
            rows[contender] = {k: median([s[k] for s in mine]) for k in keys if k in mine[0]} | {"rounds": len(mine)}
        summary[dtype] = {"median": rows, "ratios": _ratios(rows, [s for s in samples if s["dtype"] == dtype])}
    return summary


PAIRS = {"sd_ta/floor": ("sd_ta", "floor"), "sd_avg/floor": ("sd_avg", "floor"),
         "sd_ta/mk_ta": ("sd_ta", "mk_ta"), "sd_ties/mk_ties": ("sd_ties", "mk_ties"),
         "sd_star/naive_star": ("sd_star", "naive_star")}


def _ratios(rows: dict[str, dict[str, float]], samples: list[dict[str, Any]]) -> dict[str, float]:
    """Each target's ratio of medians, and the median of its per-round ratios: both contenders
    of a round ran minutes apart, so a round's ratio sees the same machine (this VM's cost of
    fresh pages alone moves the floor's time by 3x from one round to the next)."""
    out = {}
    for name, (a, b) in PAIRS.items():
        if a in rows and b in rows:
            out[name] = rows[a]["inner_s"] / rows[b]["inner_s"]
            out[name + " (median of rounds)"] = median(_per_round(samples, a, b))
            out[name + " (process s)"] = rows[a]["wall_s"] / rows[b]["wall_s"]
            out[name + " (peak anon memory)"] = rows[a]["peak_rss_anon"] / max(rows[b]["peak_rss_anon"], 1)
    return out


def _per_round(samples: list[dict[str, Any]], a: str, b: str) -> list[float]:
    by_round: dict[int, dict[str, float]] = {}
    for sample in samples:
        by_round.setdefault(sample["round"], {})[sample["contender"]] = sample["inner_s"]
    return [times[a] / times[b] for times in by_round.values() if a in times and b in times]


# -- the document ------------------------------------------------------------------------------
LABELS = {"floor": "I/O floor (read inputs, write output)", "sd_ta": "star_dist task arithmetic",
          "mk_ta": "mergekit 0.1.5 task arithmetic", "sd_avg": "star_dist average",
          "sd_ties": "star_dist TIES", "mk_ties": "mergekit 0.1.5 TIES", "sd_star": "star_dist STAR",
          "naive_star": "naive STAR (in memory, full SVD)"}


def render(result: dict[str, Any], docs: Path, cold: dict[str, Any] | None = None) -> Path:
    """docs/benchmarks.md (tables) and docs/benchmarks.png (bars) from the canonical result,
    with the cold-page-cache run's tables after it when there is one."""
    docs.mkdir(exist_ok=True)
    _plot(result, docs / "benchmarks.png")
    lines = ["## Measured", "", "Regenerate (measures, then rewrites this section and the plot):", "",
             "    nice -n 10 .venv/bin/python scripts/bench/compare.py " + result.get("command", ""), "",
             *_run_lines(result)]
    if cold is not None:
        lines += ["## Measured from a cold page cache", "",
                  "    nice -n 10 .venv/bin/python scripts/bench/compare.py " + cold.get("command", ""), "",
                  *_run_lines(cold)]
    path = docs / "benchmarks.md"
    path.write_text(_splice(path.read_text() if path.exists() else "", "\n".join(lines)))
    return path


def _run_lines(result: dict[str, Any]) -> list[str]:
    """One run's description, tables per dtype and plan-versus-measured lines."""
    m = result["machine"]
    cache = {"warm": "inputs read into the page cache just before each contender",
             "cold": "inputs evicted from the page cache before each contender"}.get(
                 result.get("cache", ""), "page cache as the previous contender left it")
    lines = [
        f"Measured {m['date']} at commit `{m['git_commit']}` on {m['nproc']} cores ({m['cpu_model']}), "
        f"{m['mem_total_gib']} GiB, torch {m['versions'].get('torch')}, 1 torch thread per merge. "
        f"Model: llama-shaped, {result['params'] / 1e6:.0f}M parameters, base + {result['n_models']} fine-tunes. "
        f"Medians of {_rounds(result)} interleaved rounds; `merge s` is the merge call alone (no "
        "interpreter start or imports), `process s` the whole child process. Memory: peak anonymous "
        "memory (what the merge allocates; mapped inputs are page cache) and peak RSS (VmHWM; n/a in runs made "
        "before it was sampled). Load average at "
        f"start {m['loadavg_at_start'][0]:.2f}; `others` is the cores other people's jobs used meanwhile. "
        f"Page cache: {cache}.",
        "",
    ]
    for dtype, block in result["summary"].items():
        lines += _table(dtype, block)
    lines += _plan_lines(result)
    if result.get("name", "compare") == "compare":
        lines += ["![merge time per contender](benchmarks.png)", ""]
    return [*lines, f"Raw samples: `scripts/bench/results/{result.get('name', 'compare')}.json`.", ""]


BEGIN, END = "<!-- compare.py: generated from here -->", "<!-- compare.py: to here -->"


def _splice(page: str, generated: str) -> str:
    """`page` with the generated block replaced (or appended): the text around it is kept."""
    block = f"{BEGIN}\n{generated}\n{END}"
    if BEGIN in page and END in page:
        return page[: page.index(BEGIN)] + block + page[page.index(END) + len(END):]
    return (page.rstrip() + "\n\n" if page else "") + block + "\n"


def _rounds(result: dict[str, Any]) -> int:
    return 1 + max(s["round"] for s in result["samples"])


def _plan_lines(result: dict[str, Any]) -> list[str]:
    """The plan's peak-memory estimate next to the measured peak, per star_dist method."""
    plan = result.get("plan_peak_memory", {})
    if not plan:
        return []
    lines = ["| plan's peak memory estimate vs measured peak anon above the imports (median) | estimate MiB | "
             "measured MiB | estimate / measured |", "|---|---|---|---|"]
    for key, estimate in sorted(plan.items()):
        dtype, contender = key.split("/")
        row = result["summary"].get(dtype, {}).get("median", {}).get(contender)
        if row:
            measured = row.get("peak_anon_above_imports", row["peak_rss_anon"])  # the plan counts the merge's own
            lines.append(f"| {LABELS.get(contender, contender)}, {dtype} | {estimate / 2**20:.0f} | "
                         f"{measured / 2**20:.0f} | {estimate / measured:.2f} |")
    lines.append("")
    seconds = result.get("plan_seconds", {})
    if seconds:
        lines += ["| plan's time estimate (CPU, 1 worker) vs measured merge time (median) | estimate s | "
                  "measured s | estimate / measured |", "|---|---|---|---|"]
        for key, estimate in sorted(seconds.items()):
            dtype, contender = key.split("/")
            row = result["summary"].get(dtype, {}).get("median", {}).get(contender)
            if row:
                lines.append(f"| {LABELS.get(contender, contender)}, {dtype} | {estimate:.2f} | "
                             f"{row['inner_s']:.2f} | {estimate / row['inner_s']:.2f} |")
        lines.append("")
    return lines


def _table(dtype: str, block: dict[str, Any]) -> list[str]:
    lines = [f"### {dtype} inputs", "",
             "| contender | merge s | imports s | process s | CPU s | peak anon MiB | above imports MiB | "
             "peak RSS MiB | others (cores) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in block["median"].items():
        imports = f"{row['import_s']:.2f}" if "import_s" in row else "n/a"
        lines.append(f"| {LABELS.get(name, name)} | {row['inner_s']:.2f} | {imports} | {row['wall_s']:.2f} | "
                     f"{row['cpu_s']:.2f} | {row['peak_rss_anon'] / 2**20:.0f} | "
                     f"{_mib(row.get('peak_anon_above_imports'))} | {_mib(row.get('peak_rss_hwm'))} | "
                     f"{row['others_cores']:.2f} |")
    lines += ["", "| ratio (merge s) | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in block["ratios"].items()]
    return [*lines, ""]


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(result["summary"])
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        rows = result["summary"][dtype]["median"]
        names = list(rows)
        ax.barh([LABELS.get(n, n) for n in names], [rows[n]["inner_s"] for n in names],
                color=["#888" if n == "floor" else "#2a7" if n.startswith("sd_") else "#c55" for n in names])
        ax.set_xlabel("seconds (median, merge call only)")
        ax.set_title(f"{result['params'] / 1e6:.0f}M × {result['n_models']}, {dtype}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="300m")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", choices=["warm", "cold"], default="warm",
                        help="inputs in the page cache when each contender starts, or evicted")
    parser.add_argument("--contenders", nargs="+", default=DEFAULT_CONTENDERS)
    parser.add_argument("--workdir", default="/tmp/star_dist_compare")
    parser.add_argument("--mergekit-venv", default=str(DEFAULT_VENV))
    parser.add_argument("--name", default="compare",
                        help=f"results/<name>.json; docs/benchmarks.* are rewritten for compare and {COLD_NAME} only")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/benchmarks.* from the JSON")
    args = parser.parse_args()
    path = RESULTS / f"{args.name}.json"
    if not args.render:
        result = run(args)
        result["name"] = args.name
        result["command"] = " ".join(sys.argv[1:])
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
    if args.render or args.name in ("compare", COLD_NAME):  # docs/ shows the canonical runs only
        main_run = RESULTS / "compare.json" if args.name == COLD_NAME else path
        cold = RESULTS / f"{COLD_NAME}.json"
        page = render(json.loads(main_run.read_text()), DOCS, json.loads(cold.read_text()) if cold.exists() else None)
        print(f"wrote {page}")


CHILDREN = {"_floor": lambda a: child_floor(Path(a[0]), Path(a[1])),
            "_star_dist": lambda a: child_star_dist(json.loads(a[0]), Path(a[1])),
            "_mergekit": lambda a: child_mergekit(json.loads(a[0]), Path(a[1])),
            "_naive_star": lambda a: child_naive_star(Path(a[0]), Path(a[1]), a[2])}

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in CHILDREN:
        CHILDREN[sys.argv[1]](sys.argv[2:])
    else:
        main()
