"""A local stand-in for the Hugging Face Hub: serves model directories in the Hub's layout and API.

Just enough of the Hub for ``huggingface_hub.snapshot_download`` to work against it through ``HF_ENDPOINT``
(read from huggingface_hub's own client: ``HfApi.model_info``, ``list_repo_tree``, ``get_hf_file_metadata``):

- ``GET /api/models/{repo}/revision/{rev}``: ``{"id", "sha", "siblings"}``
- ``GET /api/models/{repo}/tree/{rev}?recursive=...``: ``[{"type": "file", "path", "size", "oid", "lfs"?}]``
- ``HEAD|GET /{repo}/resolve/{rev}/{file}``: the bytes, with ``ETag`` (the git blob id, or the sha256 for
  "LFS" files), ``X-Repo-Commit``, ``Content-Length``, and ``Range`` requests answered with 206 (resume).

Errors are the Hub's: 401 ``Invalid credentials in Authorization header`` for a wrong token, 404 with
``X-Error-Code: RepoNotFound`` for an unknown repository. ``cut_after`` makes the server drop the connection
after that many bytes of one file (an interrupted download), on every response or on the first
``cuts_left[file]``; ``tree_override`` lists a file with other sizes or checksums than it serves (a mirror that
alters files). Every request is recorded in ``requests``.

Runnable on its own for the Docker tests: ``python -m tests.fake_hub --repo org/name --dir MODEL --port 8000``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# Files at least this big are served as "LFS" files (sha256 ETag and an "lfs" entry in the tree), like the
# Hub's weights; smaller ones as plain git blobs (sha1 ETag).
LFS_THRESHOLD = 4096


@dataclass
class RepoFile:
    path: str
    data: bytes

    @property
    def is_lfs(self) -> bool:
        return len(self.data) >= LFS_THRESHOLD

    @property
    def git_oid(self) -> str:
        # The git blob id: sha1 of "blob <size>\0" + content, as the Hub's tree reports it.
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.is_lfs else self.git_oid

    def tree_entry(self) -> dict[str, object]:
        entry: dict[str, object] = {"type": "file", "path": self.path, "size": len(self.data), "oid": self.git_oid}
        if self.is_lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": 134}
        return entry


@dataclass
class FakeHub:
    """The served repositories (``repo id -> files``) and the server's behaviour switches."""

    repos: dict[str, dict[str, RepoFile]] = field(default_factory=dict)
    token: str | None = None  # when set, requests must carry "Authorization: Bearer <token>"
    cut_after: dict[str, int] = field(default_factory=dict)  # file path -> bytes sent before dropping the line
    cuts_left: dict[str, int] = field(default_factory=dict)  # file path -> responses still to cut (absent: all)
    tree_override: dict[str, dict[str, object]] = field(default_factory=dict)  # file path -> tree entry to list
    modelscope_override: dict[str, dict[str, object]] = field(default_factory=dict)  # file path -> fields to list
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_repo(self, repo_id: str, directory: Path) -> None:
        self.repos[repo_id] = {
            path.relative_to(directory).as_posix(): RepoFile(path.relative_to(directory).as_posix(), path.read_bytes())
            for path in sorted(directory.rglob("*"))
            if path.is_file()
        }

    def downloads(self, path_suffix: str = "") -> list[tuple[str, dict[str, str]]]:
        """The GET requests for file contents (``/resolve/``), optionally only those ending in ``path_suffix``."""
        with self.lock:
            return [
                (path, headers)
                for method, path, headers in self.requests
                if method == "GET" and "/resolve/" in path and path.endswith(path_suffix)
            ]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet test output
            pass

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _not_found(self, repo_id: str) -> None:
            self._json(
                404,
                {"error": "Repository not found"},
                {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
            )

        def _serve(self, *, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            with hub.lock:
                # Header names lower-cased: clients differ in case.
                hub.requests.append((self.command, path, {k.lower(): v for k, v in self.headers.items()}))
            if hub.token is not None and self.headers.get("Authorization") != f"Bearer {hub.token}":
                message = "Invalid credentials in Authorization header"
                self._json(401, {"error": message}, {"X-Error-Message": message})
                return
            if path.startswith("/api/v1/models/"):
                self._modelscope(path.removeprefix("/api/v1/models/"), head=head)
            elif path.startswith("/api/models/"):
                self._api(path.removeprefix("/api/models/"))
            elif "/resolve/" in path:
                repo_id, _, rest = path.lstrip("/").partition("/resolve/")
                _revision, _, file_path = rest.partition("/")
                self._file(repo_id, file_path, head=head)
            else:
                self._json(404, {"error": "not found"})

        def _api(self, rest: str) -> None:
            for marker in ("/revision/", "/tree/"):
                if marker in rest:
                    repo_id = rest.partition(marker)[0]
                    break
            else:
                repo_id, marker = rest, "/revision/"
            files = hub.repos.get(repo_id)
            if files is None:
                self._not_found(repo_id)
            elif marker == "/revision/":
                siblings = [{"rfilename": name} for name in files]
                self._json(200, {"id": repo_id, "modelId": repo_id, "sha": COMMIT, "siblings": siblings})
            else:
                self._json(200, [hub.tree_override.get(path, file.tree_entry()) for path, file in files.items()])

        def _modelscope(self, rest: str, *, head: bool) -> None:
            """ModelScope's API (read from its client): ``repo/files`` lists, ``repo?FilePath=`` downloads."""
            query = parse_qs(urlsplit(self.path).query)
            repo_id, _, action = rest.partition("/repo")
            files = hub.repos.get(repo_id)
            if files is None:
                self._json(404, {"Code": 10010205001, "Message": "model not found", "Success": False})
            elif action == "/files":
                listing = [
                    {
                        "Name": f.path.rsplit("/", 1)[-1],
                        "Path": f.path,
                        "Type": "blob",
                        "Size": len(f.data),
                        "Sha256": f.sha256,
                        "Revision": COMMIT,
                        **hub.modelscope_override.get(f.path, {}),
                    }
                    for f in files.values()
                ]
                self._json(200, {"Code": 200, "Success": True, "Data": {"Files": listing}})
            elif action == "" and "FilePath" in query:
                self._file(repo_id, query["FilePath"][0], head=head)
            else:
                self._json(404, {"Code": 404, "Message": "not found", "Success": False})

        def _file(self, repo_id: str, file_path: str, *, head: bool) -> None:
            files = hub.repos.get(repo_id)
            if files is None:
                self._not_found(repo_id)
                return
            file = files.get(file_path)
            if file is None:
                self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                return
            start = 0
            range_header = self.headers.get("Range")
            if range_header and range_header.startswith("bytes="):
                start = int(range_header.removeprefix("bytes=").split("-")[0] or 0)
            body = file.data[start:]
            self.send_response(206 if start else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", f'"{file.etag}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Accept-Ranges", "bytes")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(file.data) - 1}/{len(file.data)}")
            self.end_headers()
            if head:
                return
            cut = hub.cut_after.get(file_path)
            with hub.lock:
                if cut is not None and file_path in hub.cuts_left:
                    if hub.cuts_left[file_path] <= 0:
                        cut = None
                    hub.cuts_left[file_path] -= 1
            if cut is not None and cut < len(body):
                # An interrupted transfer: part of the promised bytes, then the connection goes away.
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(body)

    return Handler


class FakeHubServer:
    """The fake Hub on a background thread: ``with FakeHubServer(hub) as server: server.url``."""

    def __init__(self, hub: FakeHub, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.hub = hub
        self.httpd = ThreadingHTTPServer((host, port), _handler(hub))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, help="repository id to serve, e.g. BAAI/bge-reranker-base")
    parser.add_argument("--dir", type=Path, required=True, help="model directory to serve as that repository")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", default=None)
    args = parser.parse_args()
    hub = FakeHub(token=args.token)
    hub.add_repo(args.repo, args.dir)
    server = FakeHubServer(hub, host=args.host, port=args.port)
    print(f"fake hub serving {args.repo} on {server.url}", flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
