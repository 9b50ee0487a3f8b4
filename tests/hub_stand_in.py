"""A local stand-in for the Hugging Face Hub's HTTP API, so that tests drive the real client.

Tests of publishing run huggingface_hub's own `HfApi` (built with `endpoint=stand_in.url`, or
with `huggingface_hub.constants.ENDPOINT` patched to it) against this server instead of mocking
the client: what is tested is then the requests the client really makes. It answers what
`create_repo`, `create_branch` and `upload_folder` ask in huggingface_hub 2.4:

- `POST /api/repos/create`: a new repository (409 if it exists, which `exist_ok` accepts);
- `POST /api/validate-yaml`: a README.md's metadata, always valid;
- `POST /api/{type}s/{repo}/branch/{branch}`: a branch from `main` or the `startingPoint`;
- `POST /api/{type}s/{repo}/preupload/{revision}`: every file "regular", so that its content
  comes inline (base64) in the commit and no LFS or Xet transfer is negotiated;
- `POST /api/{type}s/{repo}/commit/{revision}`: the ndjson commit, whose files are kept.

Everything else answers 404. Every request is recorded; `fail_with` makes every request fail
with that status, with the error body and headers the Hub sends, so the client raises the errors
it raises in use. The client reads `HF_HUB_OFFLINE` and `HF_ENDPOINT` once, when it is imported:
under this suite's conftest (HF_HUB_OFFLINE=1) a test patches `huggingface_hub.constants`'s
`HF_HUB_OFFLINE` to False and, for an `HfApi()` built without an endpoint, its `ENDPOINT`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

REPO_TYPES = ("models", "datasets", "spaces", "kernels")
COMMIT_KEYS = {"header", "file", "deletedFile", "deletedFolder"}
"""The commit lines understood ("lfsFile" would reference a transfer never asked for here)."""
DEFAULT_ERRORS = {
    401: "Invalid credentials in Authorization header",
    403: "You don't have the rights to write to this repository",
    500: "Internal Error - We're working hard to fix this as soon as possible!",
}
"""The Hub's own messages for the statuses tests inject most (401 with this text is what a bad
token gets: the client raises a plain HfHubHTTPError for it, not RepositoryNotFoundError)."""


@dataclass
class Request:
    """One request as the server received it."""

    method: str
    path: str
    """The path with its query string, still percent-encoded."""
    headers: dict[str, str]
    """Names in lower case (the client sends some capitalized, some not)."""
    body: bytes
    status: int
    """The status it was answered with."""


class HubError(Exception):
    """An error answer: its status, message, the Hub's X-Error-Code if any, more body fields."""

    def __init__(self, status: int, message: str, code: str | None = None, **fields: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.fields = fields


class HubStandIn:
    """The server, its record of requests and the repositories committed to it.

    Use it as a context manager: it listens on 127.0.0.1 at a free port from `__enter__` to
    `__exit__`, serving each connection in a daemon thread.
    """

    def __init__(
        self,
        fail_with: int | None = None,
        *,
        error_message: str | None = None,
        error_code: str | None = None,
    ) -> None:
        self.fail_with = fail_with
        """When set, every request is answered with this status (may be changed at any time)."""
        self.error_message = error_message
        """The failure's message, else the Hub's for that status (`DEFAULT_ERRORS`)."""
        self.error_code = error_code
        """The failure's X-Error-Code header, e.g. "RepoNotFound" (none by default)."""
        self.requests: list[Request] = []
        self.repos: dict[str, dict[str, Any]] = {}
        """repo_id -> {"private": bool, "repo_type": "model" | "dataset" | ...}."""
        self.commits: list[dict[str, Any]] = []
        """One {"repo_id", "revision", "message", "paths"} per commit, in order."""
        self._trees: dict[tuple[str, str], dict[str, bytes]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The endpoint to give the client: "http://127.0.0.1:PORT"."""
        if self._server is None:
            raise RuntimeError("HubStandIn is not running; use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def branches(self) -> dict[str, list[str]]:
        """repo_id -> its branches ("main" included), sorted."""
        with self._lock:
            found: dict[str, list[str]] = {}
            for repo_id, revision in sorted(self._trees):
                found.setdefault(repo_id, []).append(revision)
            return found

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """What a branch holds after its commits: path in the repository -> content."""
        with self._lock:
            return dict(self._trees.get((repo_id, revision), {}))

    def __enter__(self) -> HubStandIn:
        stand_in = self

        class Handler(_Handler):
            hub = stand_in

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="hub-stand-in", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def respond(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """Record one request and return its status, extra headers and JSON body."""
        extra: dict[str, str] = {}
        try:
            status, answer = 200, self._answer(method, path, body)
        except HubError as error:
            # The Hub says why both in a header and in the body; the client reads both.
            status, answer = error.status, {"error": error.message, **error.fields}
            extra["X-Error-Message"] = error.message
            if error.code is not None:
                extra["X-Error-Code"] = error.code
        with self._lock:
            self.requests.append(Request(method, path, headers, body, status))
        return status, extra, json.dumps(answer).encode()

    def _answer(self, method: str, path: str, body: bytes) -> Any:
        """The JSON answer to one request, or a raised HubError."""
        if self.fail_with is not None:
            message = self.error_message or DEFAULT_ERRORS.get(
                self.fail_with, HTTPStatus(self.fail_with).phrase
            )
            raise HubError(self.fail_with, message, self.error_code)
        route = urlsplit(path).path
        if method == "POST" and route == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "POST" and route == "/api/validate-yaml":
            return {"errors": [], "warnings": []}
        parts = route.split("/")
        # /api/{type}s/{repo id, one or two parts}/{action}/{revision, percent-encoded}
        if method == "POST" and len(parts) >= 6 and parts[1] == "api" and parts[2] in REPO_TYPES:
            repo_id, action, revision = "/".join(parts[3:-2]), parts[-2], unquote(parts[-1])
            if action == "branch":
                return self._create_branch(repo_id, revision, json.loads(body or b"{}"))
            if action == "preupload":
                self._tree(repo_id, revision)
                files = json.loads(body)["files"]
                return {
                    "files": [
                        {"path": file["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for file in files
                    ]
                }
            if action == "commit":
                return self._commit(repo_id, revision, body)
        raise HubError(404, f"HubStandIn does not implement {method} {route}")

    def _create_repo(self, payload: dict[str, Any]) -> dict[str, Any]:
        name, organization = payload["name"], payload.get("organization")
        repo_id = f"{organization}/{name}" if organization else name
        repo_type = payload.get("type") or "model"
        with self._lock:
            if repo_id in self.repos:
                # `create_repo(exist_ok=True)` returns the "url" of this answer.
                raise HubError(
                    409, f"You already created this {repo_type} repo", url=self._web_url(repo_id)
                )
            private = payload.get("visibility") == "private" or payload.get("private") is True
            self.repos[repo_id] = {"private": private, "repo_type": repo_type}
            self._trees[repo_id, "main"] = {}
        return {"url": self._web_url(repo_id), "name": repo_id}

    def _web_url(self, repo_id: str) -> str:
        """The repository's page: {url}/{repo_id}, with "datasets/" and such before others."""
        repo_type = self.repos[repo_id]["repo_type"]
        return f"{self.url}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"

    def _create_branch(self, repo_id: str, branch: str, payload: dict[str, Any]) -> dict[str, Any]:
        start = self._tree(repo_id, payload.get("startingPoint") or "main")
        with self._lock:
            if (repo_id, branch) in self._trees:
                raise HubError(409, "Reference already exists")
            self._trees[repo_id, branch] = dict(start)
        return {}

    def _tree(self, repo_id: str, revision: str) -> dict[str, bytes]:
        """A branch's files, or the 404 the Hub answers for a missing repository or branch."""
        with self._lock:
            if repo_id not in self.repos:
                raise HubError(404, "Repository not found", "RepoNotFound")
            if (repo_id, revision) not in self._trees:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return self._trees[repo_id, revision]

    def _commit(self, repo_id: str, revision: str, body: bytes) -> dict[str, Any]:
        tree = self._tree(repo_id, revision)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        unknown = {line["key"] for line in lines} - COMMIT_KEYS
        if unknown:
            raise HubError(400, f"HubStandIn does not accept {sorted(unknown)} commit lines")
        paths = []
        with self._lock:
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    content = value["content"]
                    tree[value["path"]] = (
                        base64.b64decode(content)
                        if value.get("encoding") == "base64"
                        else content.encode()
                    )
                    paths.append(value["path"])
                elif key == "deletedFile":
                    tree.pop(value["path"], None)
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    for path in [path for path in tree if path.startswith(folder)]:
                        del tree[path]
            self.commits.append(
                {
                    "repo_id": repo_id,
                    "revision": revision,
                    "message": header["summary"],
                    "paths": paths,
                }
            )
            oid = hashlib.sha1(f"{len(self.commits)}:{repo_id}".encode()).hexdigest()
        return {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{self._web_url(repo_id)}/commit/{oid}",
            "pullRequestUrl": None,
        }


class _Handler(BaseHTTPRequestHandler):
    """Reads a request, asks the HubStandIn for the answer and writes it as the Hub would."""

    hub: HubStandIn

    def _handle(self) -> None:
        status, headers, data = self.hub.respond(
            self.command,
            self.path,
            {name.lower(): value for name, value in self.headers.items()},
            self._read_body(),
        )
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers, up to the empty line
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle  # noqa: N815

    def log_message(self, *_args: object) -> None:
        """Silent: a test's output is no place for an access log."""
