"""Faults injected into Ray workers by the tests, never by star_dist itself.

`crashing_worker` builds a `ShardWorker` subclass that kills its own process mid-shard;
a test puts it in place of the real worker class (in-process with monkeypatch, or in a
CLI subprocess through `python -m tests.faults`). The class is made inside a function, so
Ray's cloudpickle ships it to the workers by value: nothing on their path is needed.

    python -m tests.faults --crash-on-shard NAME -- merge CONFIG OUT ...
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from star_dist.runtime import ray as ray_runtime


def crashing_worker(once_marker: Path | None = None, on_shard: str | None = None) -> type:
    """A worker class that dies as a killed process would.

    Args:
        once_marker: the first worker to find this file absent creates it (holding its pid)
            and dies before merging; every later worker merges normally.
        on_shard: a worker given the shard of this file name always dies on it.

    Returns:
        A subclass of `star_dist.runtime.ray.ShardWorker`.
    """
    marker = str(once_marker) if once_marker else None

    class CrashingWorker(ray_runtime.ShardWorker):
        def merge(self, run, job):  # type: ignore[no-untyped-def]
            if marker and not os.path.exists(marker):
                Path(marker).write_text(str(os.getpid()))
                os._exit(1)
            if on_shard == job.file_name:
                os._exit(1)
            return super().merge(run, job)

    return CrashingWorker


def main(argv: list[str]) -> int:
    """The real CLI with every Ray worker replaced by a crashing one."""
    from star_dist import cli

    parser = argparse.ArgumentParser()
    parser.add_argument("--crash-once-marker", type=Path)
    parser.add_argument("--crash-on-shard")
    parser.add_argument("cli_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    ray_runtime.ShardWorker = crashing_worker(args.crash_once_marker, args.crash_on_shard)  # type: ignore[misc]
    cli_args = args.cli_args[1:] if args.cli_args[:1] == ["--"] else args.cli_args
    return cli.main(cli_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
