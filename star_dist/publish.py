"""`--push-to-hub REPO [--private]`: upload a finished output folder to the Hugging Face hub.

Uses huggingface_hub's resumable large-folder upload: `HfApi.upload_large_folder` where the
installed version has it (0.25 to 1.x), else `upload_folder`, which in 2.x is that same
resumable, multi-commit upload. Rerunning after an interruption skips what is already there.

The token is huggingface_hub's business: `HF_TOKEN` or the one `hf auth login` saved. There
is no `--token` flag (it would land in shell history and `ps`), star_dist never prints
or writes it (it asks huggingface_hub for it only to mask it out of an error message, should
the server ever echo it). star_dist's own bookkeeping (`.star_dist/`, the lock) is not uploaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PublishError

# Never uploaded: resume state, the run lock, an unfinished --overwrite's leftovers, partial files.
IGNORED = [".star_dist/*", ".star_dist.lock", ".star_dist_replaced/*", "*.tmp", ".cache/*"]


@dataclass(frozen=True)
class Pushed:
    """Where the folder went."""

    repo_id: str
    url: str
    private: bool


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> Pushed:
    """Create the model repo if needed and upload `folder` into it, resumably.

    Args:
        folder: a finished output folder.
        repo_id: `org/name` (or `name` under the logged-in user).
        private: create the repo private (an existing repo keeps its visibility).

    Returns:
        The repo and its URL.

    Raises:
        PublishError: huggingface_hub is missing, or the hub refused (no token, no rights, network).
    """
    api = _hub_api()
    try:
        url = str(api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True))
        _upload(api, folder, repo_id, private)
    except Exception as exc:  # auth, network, a bad repo name: one line, token masked
        raise PublishError(f"push to hub {repo_id}: {_masked(exc)}; log in (`hf auth login` or HF_TOKEN) "
                           "and check the repo name, then rerun: the upload resumes") from None
    return Pushed(repo_id, url, private)


def _hub_api() -> Any:
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise PublishError("--push-to-hub needs huggingface_hub: pip install 'star-dist[hub]'") from None
    return HfApi()


def _upload(api: Any, folder: Path, repo_id: str, private: bool) -> None:
    if hasattr(api, "upload_large_folder"):
        api.upload_large_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", private=private,
                                ignore_patterns=IGNORED)
    else:
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", ignore_patterns=IGNORED,
                          commit_message="Upload a star_dist merge")


def _masked(exc: Exception) -> str:
    """The error's first line, with the token (if one is configured) replaced by ***."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:  # no token helper in this version: nothing to mask with
        token = None
    return text.replace(token, "***") if token else text
