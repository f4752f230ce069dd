"""Run the star-dist CLI with huggingface_hub's HfApi replaced by a recorder: the hub cannot be
reached from here. The installed HfApi is subclassed, so which upload method star_dist picks
(upload_large_folder, or 2.x's resumable upload_folder) is the installed version's; the files
an upload would send are worked out with huggingface_hub's own pattern filter.

    python tests/hub_mock.py RECORD.json merge ... --push-to-hub org/name

HUB_MOCK_FAIL=1 makes the upload fail with an error that echoes the token, as a careless
server might, to check that star_dist masks it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub.utils import filter_repo_objects

from star_dist.cli import main

RECORD = Path(sys.argv[1])
CALLS: list[dict[str, Any]] = []


def _record(call: str, **kwargs: Any) -> None:
    CALLS.append({"call": call, **{k: v for k, v in kwargs.items()}})
    RECORD.write_text(json.dumps(CALLS, indent=1, default=str))


def _sent(folder: str, ignore_patterns: list[str]) -> list[str]:
    files = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
    return list(filter_repo_objects(files, ignore_patterns=ignore_patterns))


def _upload(call: str, kwargs: dict[str, Any]) -> None:
    if os.environ.get("HUB_MOCK_FAIL"):
        raise RuntimeError(f"401 Client Error: Unauthorized; invalid token {huggingface_hub.get_token()}")
    _record(call, sent=_sent(kwargs["folder_path"], kwargs.get("ignore_patterns") or []), **kwargs)


class RecordingApi(huggingface_hub.HfApi):
    def create_repo(self, repo_id: str, **kwargs: Any) -> str:  # type: ignore[override]
        _record("create_repo", repo_id=repo_id, **kwargs)
        return f"https://huggingface.co/{repo_id}"

    if hasattr(huggingface_hub.HfApi, "upload_large_folder"):
        def upload_large_folder(self, **kwargs: Any) -> None:  # type: ignore[override]
            _upload("upload_large_folder", kwargs)

    def upload_folder(self, **kwargs: Any) -> None:  # type: ignore[override]
        _upload("upload_folder", kwargs)


huggingface_hub.HfApi = RecordingApi  # type: ignore[misc]
sys.exit(main(sys.argv[2:]))
