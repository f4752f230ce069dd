"""A Hugging Face hub on 127.0.0.1 for the tests: the real hub cannot be reached from here.

It serves local folders as model repos over the endpoints `huggingface_hub` calls
(`repo_info`, `list_repo_tree`, and `resolve/` with HEAD and HTTP range GETs), so the real
download code runs against it with `HF_ENDPOINT` pointing here. Every request is logged with
the bytes it returned, which is how a test proves that planning read headers only.

    with FakeHub({"org/base": folder}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", ...}
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass(frozen=True)
class Served:
    """One request: method, repo, repo-relative file (or API path), range asked, bytes returned."""

    method: str
    repo: str
    path: str
    range: str | None
    nbytes: int


@dataclass(frozen=True)
class Repo:
    folder: Path
    commit: str  # 40 hex digits, derived from the files' bytes


def _commit_of(folder: Path) -> str:
    digest = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FakeHub:
    """Model repos from local folders, on a free loopback port, for one test."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = {repo_id: Repo(folder, _commit_of(folder)) for repo_id, folder in repos.items()}
        self.log: list[Served] = []
        self.ignore_ranges = False  # True: answer range requests with the whole file, as some proxies do
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def served_bytes(self, suffix: str = ".safetensors") -> int:
        """Bytes of file content sent for files ending with `suffix` (GETs only)."""
        return sum(s.nbytes for s in self.log if s.method == "GET" and s.path.endswith(suffix))

    def _record(self, served: Served) -> None:
        with self._lock:
            self.log.append(served)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                self._route(head=True)

            def do_GET(self) -> None:  # noqa: N802
                self._route(head=False)

            def _route(self, head: bool) -> None:
                path = unquote(urlparse(self.path).path)
                api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/.*)?", path)
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if api:
                    self._api(*api.groups())
                elif resolve:
                    self._file(*resolve.groups(), head=head)
                else:
                    self._json(404, {"error": f"no route {path}"})

            def _repo(self, repo_id: str, revision: str) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None or revision not in ("main", repo.commit):
                    self._json(404, {"error": "Repository or revision not found"}, {"X-Error-Code": "RepoNotFound"})
                    return None
                return repo

            def _api(self, repo_id: str, kind: str, revision: str) -> None:
                repo = self._repo(repo_id, revision)
                if repo is None:
                    return
                files = sorted(p for p in repo.folder.rglob("*") if p.is_file())
                names = [p.relative_to(repo.folder).as_posix() for p in files]
                if kind == "revision":
                    body = {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                            "siblings": [{"rfilename": n} for n in names]}
                else:
                    body = [self._tree_entry(p, n) for p, n in zip(files, names, strict=True)]
                hub._record(Served("GET", repo_id, f"api:{kind}", None, 0))
                self._json(200, body)

            @staticmethod
            def _tree_entry(path: Path, name: str) -> dict[str, object]:
                size = path.stat().st_size
                entry: dict[str, object] = {"type": "file", "path": name, "size": size,
                                            "oid": hashlib.sha1(path.read_bytes()).hexdigest()}
                if name.endswith(".safetensors"):
                    entry["lfs"] = {"oid": _sha256(path), "size": size, "pointerSize": 134}
                return entry

            def _file(self, repo_id: str, revision: str, filename: str, head: bool) -> None:
                repo = self._repo(repo_id, revision)
                if repo is None:
                    return
                file = repo.folder / filename
                if not file.is_file():
                    self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                    return
                data = file.read_bytes()
                etag = _sha256(file) if filename.endswith(".safetensors") else hashlib.sha1(data).hexdigest()
                headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                           "Content-Type": "application/octet-stream"}
                asked = self.headers.get("Range")
                status, body = 200, data
                match = None if hub.ignore_ranges else re.fullmatch(r"bytes=(\d+)-(\d*)", asked or "")
                if match:
                    start = int(match.group(1))
                    end = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
                    status, body = 206, data[start : end + 1]
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                hub._record(Served("HEAD" if head else "GET", repo_id, filename, asked, 0 if head else len(body)))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, status: int, body: object, extra: dict[str, str] | None = None) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(raw)

        return Handler
