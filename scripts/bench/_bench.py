"""Shared pieces of the benchmarks: the machine record, JSON results, Ray's loopback
environment, CPU-load sampling, and merges run in a child process with their memory measured.

Memory of a merge is measured from outside, in a child process, because star_dist reads its
inputs through private memory maps: the pages it touches count in the process's RSS as
*file-backed* pages (page cache, dropped under pressure, shared with every other reader),
so RSS and its high-water mark VmHWM grow with the bytes read, not with what the merge
holds. What the merge allocates is anonymous memory (`RssAnon` in /proc/<pid>/status), and
the kernel keeps no high-water mark for it, so a thread samples it every few milliseconds
(`peak_rss_anon`, a lower bound of the true peak; an allocation large enough to matter takes
far longer to fill than the sampling interval). VmHWM and `ru_maxrss` (from `os.wait4` on
that child alone) are recorded too, as the totals a naive RSS measurement would report.

    python scripts/bench/_bench.py child '<json>'   # the child side (used by the scripts)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
PYTHON = sys.executable
# Ray on loopback only, no token auth, never an inherited cluster address (DESIGN §5).
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
MIB = 1024**2


def ray_loopback_env() -> None:
    """Set Ray's loopback variables in this process, before `import ray` starts anything."""
    os.environ.update(RAY_ENV)
    os.environ.pop("RAY_ADDRESS", None)


def child_env() -> dict[str, str]:
    """The environment for child processes: Ray on loopback, star_dist importable."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: cores, load, library versions, thread settings."""
    import torch

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for pkg in ("torch", "ray", "safetensors", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg] = importlib.metadata.version(pkg)
    git = {"cwd": ROOT, "capture_output": True, "text": True}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **git)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "star_dist"], **git)
    except OSError:  # no git on this machine (a lent GPU box): the digest below still names the code
        commit = dirty = subprocess.CompletedProcess([], 1, "", "")
    return {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "mem_total_gib": round(_meminfo("MemTotal") / 1024**3, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "loadavg_at_start": list(os.getloadavg()),
        "git_commit": commit.stdout.strip(),
        "star_dist_uncommitted_changes": bool(dirty.stdout.strip()),
        "star_dist_digest": star_dist_digest(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def star_dist_digest() -> str:
    """sha256 of star_dist's sources. Others edit the package while benchmarks run, and Ray
    workers import it afresh: a digest that changed during a run explains a byte mismatch."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "star_dist").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def write_result(name: str, data: dict[str, Any]) -> Path:
    """results/<name>.json, written to a temporary name and renamed."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return path


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def output_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every weight file and the index: what must be byte-identical across runs.
    (merge_report.json and the manifests hold timings and pids, so they are left out.)"""
    out = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors" or path.name == "model.safetensors.index.json":
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 22), b""):
                    digest.update(chunk)
            out[path.name] = digest.hexdigest()
    return out


class CpuLoad:
    """Average busy cores of the whole machine over a block, from /proc/stat: tells how much
    of the CPU other people's jobs took while a timing ran."""

    def __enter__(self) -> CpuLoad:
        self._start = _cpu_jiffies()
        self.busy_cores = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        busy0, total0 = self._start
        busy1, total1 = _cpu_jiffies()
        ncpu = os.cpu_count() or 1
        self.busy_cores = ncpu * (busy1 - busy0) / max(total1 - total0, 1)


class OwnCpu:
    """CPU seconds used by this process and all its descendants over a block (a Ray cluster
    started here with `ray.init`, its raylet and its workers are descendants). Workers that
    exit inside the block are counted up to their last sample (every `interval_s`), so this is
    a slight undercount. Together with `CpuLoad` it splits the machine's busy cores into
    ours and other people's."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.cpu_s = 0.0

    def __enter__(self) -> OwnCpu:
        self._tick = os.sysconf("SC_CLK_TCK")
        self._first = _tree_cpu(os.getpid())
        self._last = dict(self._first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._last.update(_tree_cpu(os.getpid()))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._last.update(_tree_cpu(os.getpid()))
        ticks = sum(v - self._first.get(pid, 0) for pid, v in self._last.items())
        self.cpu_s = ticks / self._tick


def _tree_cpu(root: int) -> dict[int, int]:
    """utime + stime (clock ticks) of `root` and every descendant, by pid."""
    parent: dict[int, int] = {}
    cpu: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        cpu[pid] = int(fields[11]) + int(fields[12])
    mine = {root}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parent.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                changed = True
    return {pid: cpu[pid] for pid in mine if pid in cpu}


def _cpu_jiffies() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return total - idle, total


def proc_status(pid: int | str) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem of a process, in bytes ({} once it is gone)."""
    wanted = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in wanted:
            out[key] = int(rest.split()[0]) * 1024
    return out


# glibc's malloc keeps freed blocks below its (self-adjusting, up to 32 MiB) mmap threshold
# in its heap, so RssAnon also holds up to a tensor or two of freed memory. Pinning the
# threshold to 1 MiB returns every tensor-sized block to the kernel when it is freed: RssAnon
# then tracks what the merge holds. (Setting it also turns off glibc's self-adjustment.)
PINNED_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1024 * 1024)}


def run_merge_child(
    job: dict[str, Any], interval_s: float = 0.002, nice: int = 10, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run one `star_dist.merge` in a child process and measure it from outside.

    `job`: {"config": dict, "out": str, "options": dict}; `env`: extra environment (e.g.
    PINNED_MALLOC_ENV). Returns the child's own report (merge wall time, RssAnon before the
    merge, VmHWM at the end) plus `peak_rss_anon` (sampled), `peak_rss_file`, `ru_maxrss`
    (bytes) and the process's wall time.
    """
    cmd = ["nice", "-n", str(nice), PYTHON, str(Path(__file__).resolve()), "child", json.dumps(job)]
    start = time.perf_counter()
    full_env = {**child_env(), **(env or {})}
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"RssAnon": 0, "RssFile": 0, "samples": 0}
    done = threading.Event()

    def sample() -> None:
        # `nice` execs python in place, so the pid stays the merging process's.
        while not done.is_set():
            status = proc_status(proc.pid)
            if status:
                peaks["RssAnon"] = max(peaks["RssAnon"], status.get("RssAnon", 0))
                peaks["RssFile"] = max(peaks["RssFile"], status.get("RssFile", 0))
                peaks["samples"] += 1
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    # Read the pipes while it runs (a full pipe would block the child), then reap it with
    # wait4 for its own rusage; Popen must not reap it first.
    out_chunks: list[str] = []
    err_chunks: list[str] = []
    readers = [
        threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True),
        threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True),
    ]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    thread.join()
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"merge child failed ({proc.returncode}):\n{''.join(err_chunks)[-3000:]}")
    lines = [ln for ln in "".join(out_chunks).splitlines() if ln.startswith("{")]
    report = json.loads(lines[-1])
    report.update(
        peak_rss_anon=peaks["RssAnon"],
        peak_rss_file=peaks["RssFile"],
        samples=peaks["samples"],
        ru_maxrss=usage.ru_maxrss * 1024,  # Linux reports KiB
        process_wall_s=wall,
        user_cpu_s=usage.ru_utime,
        sys_cpu_s=usage.ru_stime,
    )
    report["peak_rss_anon_above_baseline"] = report["peak_rss_anon"] - report["baseline_rss_anon"]
    return report


def _child(job: dict[str, Any]) -> None:
    """The child side: import everything, note the baseline, merge, print one JSON line."""
    sys.path.insert(0, str(ROOT))
    import torch  # noqa: F401  (imported before the baseline, as the merge needs it)

    import star_dist

    baseline = proc_status("self")
    start = time.perf_counter()
    star_dist.merge(job["config"], job["out"], runtime="local", quiet=True, **job.get("options", {}))
    wall = time.perf_counter() - start
    end = proc_status("self")
    print(json.dumps({
        "merge_wall_s": wall,
        "baseline_rss_anon": baseline.get("RssAnon", 0),
        "baseline_vm_rss": baseline.get("VmRSS", 0),
        "vm_hwm": end.get("VmHWM", 0),
        "rss_anon_end": end.get("RssAnon", 0),
    }), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "child":
        _child(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: _bench.py child '<json job>' (used by the benchmark scripts)")
