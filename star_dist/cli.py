"""The `star-dist` command: `merge`, `plan`, `verify`, `report` and `make-tiny`.

Any expected failure (bad config, bad input, busy output folder, unreachable cluster)
prints one line `star-dist: error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

from .config import DEFAULT_MAX_SHARD_SIZE, DEVICES, RUNTIMES, MergeConfig, RunOptions, parse_size
from .errors import ConfigError, StarDistError

EPILOG = "Config keys follow mergekit's. See the README for the reference and examples."


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad value prints one line (`star-dist: error: ...`, status 2), not the
    whole usage: the same shape as every other star-dist error; `--help` still shows usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"star-dist: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", nargs="?", help="merge config YAML (optional when --base-model and --model are given)"
    )
    g = parser.add_argument_group("merge settings (override the config file)")
    g.add_argument("--method", dest="merge_method",
                   help="star | task_arithmetic | ties | average | tsv | iso_c | iso_cts")
    g.add_argument("--base-model", help="base model folder or hub id")
    g.add_argument("--model", action="append", dest="models", metavar="PATH[:WEIGHT]",
                   help="a fine-tuned model or LoRA adapter; repeat for each (replaces the config's models)")
    g.add_argument("--eta", type=float, help="STAR: percent of the nuclear norm kept (0, 100]; default 40")
    g.add_argument("--lambda", type=float, dest="lambda_", help="global scale of the merged update; default 1")
    g.add_argument("--density", type=float, help="TIES: fraction of each task vector kept (0, 1]; default 0.2")
    g.add_argument("--dtype", help="as mergekit's dtype: the merge dtype and default output dtype (float32, "
                   "bfloat16, float16, float64); computation is never below float32")
    g.add_argument("--out-dtype", help="output dtype: float32, float16, bfloat16, float64 "
                   "(default: --dtype, else the base's)")
    g.add_argument("--output-format", choices=["model", "adapter"],
                   help="model (default): a full HF model; adapter: one PEFT LoRA adapter (LoRA inputs only)")


def _run_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("execution")
    g.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB (default 5GB)")
    _runtime_args(g)
    g.add_argument("--device", choices=list(DEVICES), default=RunOptions.device, help="where workers compute")
    _memory_arg(g)
    g.add_argument("--threads-per-worker", type=int, default=RunOptions.threads_per_worker,
                   help="torch threads per CPU worker (default 1); the output bytes depend on it")
    g.add_argument("--connect-timeout", type=float, default=RunOptions.connect_timeout_s,
                   help="seconds to wait for a Ray cluster (default 30)")
    g.add_argument("--start-timeout", type=float, default=RunOptions.start_timeout_s,
                   help="seconds to wait for a first worker to start before failing (default 300; raise it "
                        "for an autoscaling cluster that must add nodes)")
    g.add_argument("--verify-resume", action="store_true",
                   help="re-hash the shards an earlier run finished before keeping them (in the workers, in "
                        "parallel); by default a shard whose manifest, size and mtime match is kept")


def _memory_arg(group: Any) -> None:
    group.add_argument("--max-memory-per-worker", metavar="SIZE",
                       help="memory one worker may use on its device, e.g. 22GiB (default: what the device has, "
                            "as accelerate reports it); a tensor over it on a GPU merges on the CPU, and plan "
                            "fails when one fits nowhere")


def _runtime_args(group: argparse._ArgumentGroup) -> None:
    """Where the merge runs: `merge` takes these, and `plan` too, to say what it would choose."""
    group.add_argument("--runtime", choices=list(RUNTIMES), default=RunOptions.runtime,
                       help="auto (default): join --address or RAY_ADDRESS, else start a local Ray cluster when "
                            "the plan says several workers would finish sooner, else run in this process; "
                            "ray: always Ray (a local cluster, or --address); local: in this process")
    group.add_argument("--address", help="join a Ray cluster: auto | host:port | ray://host:port")
    group.add_argument("--workers", type=int,
                       help="number of worker actors (default: one per GPU, or cores / threads)")


def _publish_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("check and publish")
    g.add_argument("--no-verify", action="store_true",
                   help="skip the final check of the output against its config.json's architecture")
    g.add_argument("--push-to-hub", metavar="REPO",
                   help="upload the finished output to this hub model repo (resumable; token from HF_TOKEN or "
                        "`hf auth login`, never printed)")
    g.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")


def _verify_parser(sub: Any) -> None:
    verify = sub.add_parser("verify", help="check a model folder against the architecture its config.json builds",
                            description="Build the architecture from config.json on the meta device and compare "
                                        "every tensor's name and shape, and the tied weights, with the folder's "
                                        "headers. --smoke also loads it and compares next-token loss with the base.")
    verify.add_argument("out", help="a model folder (a star-dist output, or any Hugging Face folder)")
    verify.add_argument("--smoke", action="store_true",
                        help="load the model and the base (accelerate, device_map=auto) and compare next-token loss")
    verify.add_argument("--base", help="the base model folder or hub id for --smoke (default: merge_report.json's)")
    verify.add_argument("--lenient", action="store_true",
                        help="extra tensors and second tied copies (which transformers drops at load) only warn")


def _report_parser(sub: Any) -> None:
    report = sub.add_parser("report", help="draw merge_report.json as an HTML page with PNG plots",
                            description="Write OUT/report/index.html and its plots (kept rank per layer and model, "
                                        "nuclear norms, per-tensor time) and link them from the model card.")
    report.add_argument("out", help="a finished star-dist output folder")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="star-dist", description="Merge fine-tuned models with STAR and baselines.",
                                     epilog=EPILOG)
    from .output import package_version

    parser.add_argument("--version", action="version", version=f"star-dist {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="merge models into an output folder",
                           description="Merge fine-tuned models (or LoRA adapters) into a Hugging Face folder. "
                                       "Rerunning an interrupted merge resumes it.", epilog=EPILOG)
    _config_args(merge)
    merge.add_argument("out", help="output folder (must be empty, a resumable run of the same merge, or --overwrite)")
    merge.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty output folder")
    merge.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    merge.add_argument("--json", action="store_true",
                       help="print a JSON summary on stdout when done (for pipelines; implies no progress bar)")
    _run_args(merge)
    _publish_args(merge)

    plan = sub.add_parser("plan", help="dry run: validate inputs, show shards, bytes, memory, SVD count",
                          description="Read only headers: validate every input and print the plan.", epilog=EPILOG)
    _config_args(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    plan.add_argument("--threads-per-worker", type=int, default=RunOptions.threads_per_worker)
    plan.add_argument("--device", choices=list(DEVICES), default=RunOptions.device)
    _memory_arg(plan)
    _runtime_args(plan.add_argument_group("execution (what plan would choose)"))

    _verify_parser(sub)
    _report_parser(sub)
    tiny = sub.add_parser("make-tiny", help="write tiny llama-shaped checkpoints and a config, for demos and tests")
    tiny.add_argument("folder", help="where to write base/, ft0..ftN-1/ and merge.yaml")
    tiny.add_argument("--models", type=int, default=3, help="number of fine-tunes (default 3)")
    tiny.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--lora", type=int, default=0, metavar="N",
                      help="also write N PEFT LoRA adapters lora0/.. and merge_lora.yaml (default 0)")
    return parser


def config_from_args(args: argparse.Namespace) -> MergeConfig:
    """The config file (if any) with every flag given on the command line applied on top."""
    data: dict[str, Any] = {}
    base_dir = Path(".")
    if args.config:
        # The raw file, not a validated config: flags apply first, then one validation
        # reports every problem of file and flags together.
        base_dir = Path(args.config).parent
        data = MergeConfig.read_yaml(args.config)
        if not isinstance(data.get("parameters") or {}, dict):
            return MergeConfig.from_dict(data, source=args.config)  # raises, naming the key
    if args.merge_method is not None and args.merge_method != data.get("merge_method", args.merge_method):
        data = _drop_foreign_params(data, args.merge_method)
    for key in ("merge_method", "base_model", "dtype", "out_dtype", "output_format"):
        if getattr(args, key, None) is not None:
            data[key] = getattr(args, key)
    if args.models:
        data["models"] = [_parse_model_flag(m) for m in args.models]
    params = dict(data.get("parameters") or {})
    for flag, key in (("eta", "eta"), ("lambda_", "lambda"), ("density", "density")):
        if getattr(args, flag, None) is not None:
            params[key] = getattr(args, flag)
    if params:
        data["parameters"] = params
    if not args.config and not data.get("base_model"):
        raise ConfigError("give a config file, or --base-model and --model flags")
    return MergeConfig.from_dict(data, source=args.config or "command line").resolve_paths(base_dir)


def _drop_foreign_params(data: dict[str, Any], method: str) -> dict[str, Any]:
    """--method replaces the file's method: drop the file's parameters the new one does not
    take (a STAR config's eta under --method ties), keeping λ, weights and its own."""
    from .methods import METHODS, method_param_names
    from .methods.registry import ENGINE_KEYS

    if method not in METHODS:
        return data  # validation reports the unknown method with the valid names
    keep = set(method_param_names(method)) | ENGINE_KEYS
    per_model = set(METHODS[method].per_model_params) | {"weight"}
    out = dict(data)
    out["parameters"] = {k: v for k, v in (data.get("parameters") or {}).items() if k in keep}
    out["models"] = [
        {**m, "parameters": {k: v for k, v in (m.get("parameters") or {}).items() if k in per_model}}
        if isinstance(m, dict) and isinstance(m.get("parameters") or {}, dict) else m
        for m in data.get("models", [])
    ]
    return out


def _parse_model_flag(text: str) -> dict[str, Any]:
    path, sep, weight = text.rpartition(":")
    if sep and path and _is_number(weight):
        return {"model": path, "parameters": {"weight": float(weight)}}
    return {"model": text}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def run_options(args: argparse.Namespace) -> RunOptions:
    """The flags given, as RunOptions: a flag a subcommand lacks takes RunOptions' default,
    and RunOptions checks them all at once."""
    defaults = RunOptions()
    return RunOptions(
        max_shard_size=parse_size(args.max_shard_size) if args.max_shard_size else DEFAULT_MAX_SHARD_SIZE,
        overwrite=getattr(args, "overwrite", defaults.overwrite),
        quiet=getattr(args, "quiet", defaults.quiet),
        runtime=getattr(args, "runtime", defaults.runtime),
        address=getattr(args, "address", defaults.address),
        workers=getattr(args, "workers", defaults.workers),
        device=args.device,
        threads_per_worker=args.threads_per_worker,
        connect_timeout_s=getattr(args, "connect_timeout", defaults.connect_timeout_s),
        start_timeout_s=getattr(args, "start_timeout", defaults.start_timeout_s),
        verify_resume=getattr(args, "verify_resume", defaults.verify_resume),
        verify=not getattr(args, "no_verify", False),
        max_memory_per_worker=_memory_size(getattr(args, "max_memory_per_worker", None)),
    )


def _memory_size(text: str | None) -> int | None:
    if text is None:
        return None
    return parse_size(text, "--max-memory-per-worker")


def cmd_merge(args: argparse.Namespace) -> int:
    from .run import run_merge

    options = run_options(args)
    if args.private and not args.push_to_hub:
        raise ConfigError("--private applies to --push-to-hub REPO; give the repo too")
    config = config_from_args(args)
    for note in config.notes:  # said once, before the work starts
        print(f"star-dist: note: {note}", file=sys.stderr)
    if args.json:
        options = dataclasses.replace(options, quiet=True)  # stdout carries the JSON only
    result = run_merge(config, args.out, options)
    pushed = _push(result.out_dir, args) if args.push_to_hub else None
    if args.json:
        print(json.dumps({**merge_summary(config, result), "pushed": pushed}, indent=2))
    elif not args.quiet:
        resumed = f" ({result.shards_resumed} resumed)" if result.shards_resumed else ""
        print(f"merged into {result.out_dir}: {result.shards_total} shard(s){resumed}, "
              f"{len(result.report['tensors'])} tensors")
        print(f"runtime {result.runtime} ({result.runtime_reason})")
        if result.bytes_read_per_worker:
            print("read " + ", ".join(f"{w}: {human_bytes(n)}" for w, n in result.bytes_read_per_worker.items()))
        print(result.verification)
        if pushed:
            print(f"pushed to {pushed}")
    return 0


def _push(out_dir: Path, args: argparse.Namespace) -> str:
    """Upload the finished output; returns the repo's URL."""
    from .publish import push_to_hub

    if not args.quiet and not args.json:
        print(f"uploading {out_dir} to {args.push_to_hub} ...", file=sys.stderr)
    return push_to_hub(out_dir, args.push_to_hub, private=args.private).url


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify_folder

    out = Path(args.out)
    if not out.is_dir():
        raise ConfigError(f"{out}: no such folder (looked in {Path.cwd()})")
    checked = verify_folder(out, strict=not args.lenient)
    print(checked.summary())
    if args.smoke and checked.skipped:
        raise ConfigError(f"{out}: --smoke loads the model, which needs what the check lacked ({checked.skipped})")
    if args.smoke:
        from .smoke import smoke_test

        print(f"smoke: {smoke_test(out, _smoke_base(out, args.base)).summary()}")
    return 0


def _smoke_base(out: Path, given: str | None) -> Path:
    """The base to compare with: --base, else the one merge_report.json names."""
    from .checkpoint import resolve_model_folder
    from .report_page import REPORT_JSON, read_report

    if given is None:
        if not (out / REPORT_JSON).is_file():
            raise ConfigError(f"{out}: no {REPORT_JSON} saying which base it came from; pass --base BASE")
        given = str(read_report(out / REPORT_JSON).get("base_model") or "")
    try:
        return resolve_model_folder(given)
    except StarDistError as exc:
        raise ConfigError(f"the base for --smoke: {exc}; pass --base BASE") from None


def cmd_report(args: argparse.Namespace) -> int:
    from .report import relink_card
    from .report_page import write_report_page

    out = Path(args.out)
    page = write_report_page(out)
    relink_card(out)
    print(f"wrote {page} and its plots; linked from {out / 'README.md'}")
    return 0


def merge_summary(config: MergeConfig, result: Any) -> dict[str, Any]:
    """What a pipeline needs from a finished merge (`--json`): where, what, and the config as merged.

    Args:
        config: the merge config that was run.
        result: the MergeResult `run_merge` returned.
    Returns:
        A JSON-serializable dict: out_dir, method, inputs, files, shard counts, notes, warnings,
        runtime and why, bytes read per worker, and the verification line.
    """
    return {
        "out_dir": str(result.out_dir),
        "method": config.merge_method,
        "base_model": config.base_model,
        "models": [m.model for m in config.models],
        "files": list(result.files),
        "shards_total": result.shards_total,
        "shards_resumed": result.shards_resumed,
        "tensors": len(result.report["tensors"]),
        "config": config.to_dict(),
        "notes": list(config.notes),
        "warnings": list(result.warnings),
        "runtime": result.runtime,
        "runtime_reason": result.runtime_reason,
        "bytes_read_per_worker": dict(result.bytes_read_per_worker),
        "verification": result.verification,
    }


def cmd_plan(args: argparse.Namespace) -> int:
    from .planner import build_plan

    config = config_from_args(args)
    plan = build_plan(config, "merged", run_options(args))
    summary = plan.summary()
    summary["warnings"] = [*config.notes, *summary["warnings"]]
    resolved = resolved_parameters(config, plan.run.weights)
    summary["resolved"] = resolved
    summary["runtime"] = runtime_summary(plan, run_options(args))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"method      {summary['method']}")
    print(f"parameters  {flow_yaml(resolved['parameters'])}")
    print(f"base        {summary['base_model']}")
    for model, kind, own in zip(summary["models"], summary["input_kinds"], resolved["models"], strict=True):
        print(f"model       {model}  ({'LoRA adapter' if kind == 'LoraAdapter' else 'full checkpoint'})  "
              f"{flow_yaml(own)}")
    print(f"tensors     {summary['tensors']} ({summary['tensors_merged']} merged, "
          f"{summary['tensors'] - summary['tensors_merged']} copied)")
    print(f"shards      {len(summary['shards'])}")
    for shard in summary["shards"]:
        print(f"  {shard['file']}  {shard['tensors']} tensors  {human_bytes(shard['bytes'])}")
    print(f"read        {human_bytes(summary['bytes_to_read'])}")
    print(f"write       {human_bytes(summary['bytes_to_write'])}")
    busiest = summary["per_worker"]
    if busiest["workers"] > 1:
        print(f"per worker  {human_bytes(busiest['bytes_read'])} read, {human_bytes(busiest['bytes_written'])} "
              f"written by the busiest of {busiest['workers']} (shards dealt most expensive first)")
    print(f"SVDs        {summary['svds']}")
    print(f"peak memory {human_bytes(summary['peak_memory_per_worker_bytes'])} per worker (estimate)")
    if summary.get("peak_memory_note"):
        print(f"            {summary['peak_memory_note']}")
    if summary.get("estimate"):
        _print_estimate(summary["estimate"])
    print(f"runtime     {summary['runtime']['runtime']}: {summary['runtime']['reason']}")
    for warning in summary["warnings"]:
        print(f"warning     {warning}")
    return 0


def _print_estimate(est: dict[str, Any]) -> None:
    """The cost model's numbers (estimate.py), per worker, with the rates they assume."""
    cpu, gpu = est["cpu"], est["gpu"]
    budget = (f"budget {human_bytes(est['budget_bytes'])} ({est['budget_source']})" if est["budget_bytes"]
              else f"budget {est['budget_source']}")
    print(f"  on CPU    {human_bytes(cpu['peak_device_bytes'])} RAM per worker")
    print(f"  on GPU    {human_bytes(gpu['peak_device_bytes'])} GPU + {human_bytes(gpu['peak_host_bytes'])} host "
          f"RAM per worker; {budget}")
    print(f"SVD FLOPs   {est['svd_flops']:.3g} (Gram matrices + eigenvalues; keeping the top r adds more)")
    for where in (cpu, gpu):
        print(f"time        {_duration(where['seconds'])} on {est['workers']} worker(s) at "
              f"{where['rates']['label']}")


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def runtime_summary(plan: Any, options: RunOptions) -> dict[str, Any]:
    """Where `merge` with these options would run, and why (the `--runtime auto` decision), for `plan`.

    Args:
        plan: the merge plan (its cost estimate and shard count).
        options: the run options (runtime, address, workers, device, threads).
    Returns:
        {"runtime", "address", "reason", "estimated_seconds_one_worker"} (seconds rounded to 0.1).
    """
    from .runtime.choose import choose_runtime, estimate_seconds

    choice = choose_runtime(plan, options)
    return {"runtime": choice.runtime, "address": choice.address, "reason": choice.reason,
            "estimated_seconds_one_worker": round(estimate_seconds(plan), 1)}


def resolved_parameters(config: MergeConfig, weights: tuple[float, ...]) -> dict[str, Any]:
    """Every value the merge uses, defaults included: the method's parameters, λ, and each
    model's weight and own parameters. A per-tensor setting is shown as written (a gradient,
    conditionals): its value differs by tensor.

    Args:
        config: the merge config.
        weights: each model's weight as the method resolved it (`plan.run.weights`), in model order.
    Returns:
        {"parameters": the method's values and "lambda", "models": one {"weight", per-model params} per model}.
    Raises:
        ConfigError: an unknown method or an invalid parameter (normally caught by the plan first).
    """
    from .methods import get_method

    method = get_method(config.merge_method, config.method_params(), config.model_method_params())
    glob = method.params_dict()
    params = {**glob, "lambda": config.parameters.get("lambda", config.lambda_)}
    for key, setting in config.parameters.items():
        if isinstance(setting, list):
            params[key] = setting
    models = []
    for i, m in enumerate(config.models):
        entry: dict[str, Any] = {"weight": m.weight if isinstance(m.weight, list) else
                                 (weights[i] if i < len(weights) else m.weight)}
        for key in method.per_model_params:
            entry[key] = m.parameters.get(key, config.parameters.get(key, glob.get(key)))
        models.append(entry)
    return {"parameters": params, "models": models}


def flow_yaml(value: Any) -> str:
    """One line of YAML (`{density: 0.2, normalize: true}`), as a config file would say it."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .tiny_models import make_tiny_merge

    if args.models < 1 or args.lora < 0:
        raise ConfigError("make-tiny: --models must be at least 1 and --lora at least 0")
    config_path = make_tiny_merge(Path(args.folder), n_models=args.models, dtype=args.dtype, seed=args.seed,
                                  lora=args.lora)
    extra = f" and {args.lora} LoRA adapter(s) with {config_path.parent / 'merge_lora.yaml'}" if args.lora else ""
    print(f"wrote tiny checkpoints and {config_path}{extra}")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `ray job stop`, a batch scheduler's time limit), unwound like Ctrl-C:
    the shard being written is removed and the lock released, so the rerun resumes."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"merge": cmd_merge, "plan": cmd_plan, "make-tiny": cmd_make_tiny, "verify": cmd_verify,
                "report": cmd_report}
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return handlers[args.command](args)
    except BrokenPipeError:
        # `star-dist plan | head`: the reader left; end quietly, as cat does.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except StarDistError as exc:
        message = " ".join(str(exc).split())
        print(f"star-dist: error: {message}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a safety net: each writer words its own faults, this catches the rest
        from .files import os_fault

        message, fix = os_fault(exc, "use this path")
        print(f"star-dist: error: {message}; {fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("star-dist: interrupted; rerun the same command to resume", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
