"""Serve a LocalHub folder over the Hugging Face Hub HTTP API, so ``huggingface_hub.HfApi`` can push and pull.

Implements the part of the Hub API that :class:`sorlora_gossip.hub.hf.HfHub` uses (model repos only): repo creation and
listing, repo info at a revision, preupload (always ``regular`` uploads: no LFS/Xet), ndjson commits with
``parentCommit`` (412 when stale), tags, refs, commits, tree, and ``resolve`` downloads with the ``X-Repo-Commit``
and ``ETag`` headers. Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``).
Built on the standard library's ``ThreadingHTTPServer``; meant for tests, labs and a shared machine, not the internet.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from .base import (
    EntryNotFound,
    HubError,
    InvalidNameError,
    PushConflictError,
    RefExistsError,
    RepoNotFound,
    RevisionNotFound,
    validate_repo_id,
)
from .local import LocalHub

__all__ = ["Fault", "HubServer"]

logger = logging.getLogger(__name__)


@dataclass
class Fault:
    """Answer the next ``count`` matching requests with ``status`` (e.g. 429 or 503) instead of serving them."""

    count: int
    status: int = 503
    method: str | None = None
    path_contains: str | None = None
    retry_after: float | None = None

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.path_contains is None or self.path_contains in path
        )


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _error_for(exc: HubError) -> _HTTPError:
    if isinstance(exc, RepoNotFound):
        return _HTTPError(404, str(exc), "RepoNotFound")
    if isinstance(exc, RevisionNotFound):
        return _HTTPError(404, str(exc), "RevisionNotFound")
    if isinstance(exc, EntryNotFound):
        return _HTTPError(404, str(exc), "EntryNotFound")
    if isinstance(exc, PushConflictError):
        return _HTTPError(412, str(exc))
    if isinstance(exc, RefExistsError):
        return _HTTPError(409, str(exc))
    if isinstance(exc, InvalidNameError):
        return _HTTPError(400, str(exc))
    return _HTTPError(500, str(exc))


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid the 40 ms delayed-ACK stall

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        logger.debug("%s %s", self.address_string(), format % args)  # request line only: never headers/tokens

    # -- plumbing ----------------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, head=False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.server.requests.append((method, url.path))
        body = self._body() if method == "POST" else b""
        fault = self.server.take_fault(method, url.path)
        if fault is not None:
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            return self._error(method, _HTTPError(fault.status, f"injected fault {fault.status}"), headers)
        try:
            self._authorize(method)
            self._route(method, [unquote(p) for p in url.path.split("/")[1:]], parse_qs(url.query), body)
        except _HTTPError as exc:
            self._error(method, exc)
        except HubError as exc:
            self._error(method, _error_for(exc))
        except (ValueError, KeyError, json.JSONDecodeError) as exc:
            self._error(method, _HTTPError(400, f"bad request: {exc}"))

    def _error(self, method: str, exc: _HTTPError, headers: dict[str, str] | None = None) -> None:
        headers = {"X-Error-Message": exc.message.replace("\n", " ")[:300], **(headers or {})}
        if exc.code:
            headers["X-Error-Code"] = exc.code
        if method == "HEAD":
            self._send(exc.status, b"", headers, head=True)
        else:
            self._json(exc.status, {"error": exc.message}, headers)

    def _authorize(self, method: str) -> None:
        token = self.server.token
        if token is None:
            return
        if self.headers.get("Authorization", "") != f"Bearer {token}" and (method == "POST" or self.server.private):
            raise _HTTPError(401, "Invalid credentials in Authorization header")

    do_GET = lambda self: self._dispatch("GET")  # noqa: E731
    do_HEAD = lambda self: self._dispatch("HEAD")  # noqa: E731
    do_POST = lambda self: self._dispatch("POST")  # noqa: E731

    # -- routes ------------------------------------------------------------------------------------------------

    def _route(self, method: str, parts: list[str], query: dict[str, list[str]], body: bytes) -> None:
        hub = self.server.hub
        if parts[:2] == ["api", "repos"] and parts[2:] == ["create"] and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if parts == ["api", "validate-yaml"] and method == "POST":  # model cards (README.md): accepted as is
            return self._json(200, {"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) == 2 and method == "GET":
            author = query.get("author", [hub.namespace])[0]
            return self._json(200, [{"id": r, "modelId": r} for r in hub.list_repos(author)])
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = validate_repo_id(f"{parts[2]}/{parts[3]}")
            return self._api_repo(method, repo_id, parts[4:], body)
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = validate_repo_id(f"{parts[0]}/{parts[1]}")
            return self._resolve_file(method, repo_id, parts[3], "/".join(parts[4:]))
        raise _HTTPError(404, f"no route for {method} /{'/'.join(parts)}")

    def _create_repo(self, payload: dict) -> None:
        if payload.get("type") not in (None, "model"):
            raise _HTTPError(400, "only model repos are served")
        repo_id = validate_repo_id(f"{payload.get('organization') or self.server.hub.namespace}/{payload['name']}")
        url = f"{self.server.endpoint}/{repo_id}"
        if self.server.hub.repo_exists(repo_id):
            return self._json(409, {"error": "You already created this model repo", "url": url})
        self.server.hub.create_repo(repo_id, exist_ok=True)
        self._json(200, {"url": url, "name": repo_id})

    def _api_repo(self, method: str, repo_id: str, rest: list[str], body: bytes) -> None:
        hub = self.server.hub
        action, args = (rest[0], rest[1:]) if rest else ("", [])
        if method == "GET" and action in ("", "revision"):
            revision = "/".join(args) or "main"
            sha = hub.resolve(repo_id, revision)
            tree = hub.tree(repo_id, revision=sha)
            return self._json(
                200,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "author": repo_id.split("/")[0],
                    "sha": sha,
                    "private": False,
                    "lastModified": hub.created_at(repo_id, sha),
                    "siblings": [{"rfilename": p, "size": e["size"]} for p, e in sorted(tree.items())],
                },
            )
        if method == "POST" and action == "preupload":
            tree = hub.tree(repo_id, revision="/".join(args) or "main")
            files = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": tree[f["path"]]["oid"] if f["path"] in tree else None,
                }
                for f in json.loads(body)["files"]
            ]
            return self._json(200, {"files": files, "commitOid": hub.resolve(repo_id, "/".join(args) or "main")})
        if method == "POST" and action == "commit":
            return self._commit(repo_id, "/".join(args) or "main", body)
        if method == "POST" and action == "tag":
            payload = json.loads(body)
            hub.create_tag(repo_id, payload["tag"], revision="/".join(args) or "main")
            return self._json(200, {"success": True})
        if method == "GET" and action == "refs":
            refs = hub.list_refs(repo_id)
            as_list = lambda kind, d: [  # noqa: E731
                {"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": s} for n, s in sorted(d.items())
            ]
            return self._json(
                200,
                {"branches": as_list("heads", refs.branches), "tags": as_list("tags", refs.tags), "converts": []},
            )
        if method == "GET" and action == "commits":
            history = hub.list_commits(repo_id, revision="/".join(args) or "main")
            return self._json(
                200,
                [
                    {"id": c.sha, "title": c.message, "message": "", "authors": [], "date": c.created_at}
                    for c in history
                ],
            )
        if method == "GET" and action == "tree":
            revision, prefix = (args[0] if args else "main"), "/".join(args[1:])
            tree = hub.tree(repo_id, revision=revision)
            items = [
                {"type": "file", "oid": e["oid"], "size": e["size"], "path": p}
                for p, e in sorted(tree.items())
                if not prefix or p.startswith(prefix.rstrip("/") + "/") or p == prefix
            ]
            return self._json(200, items)
        raise _HTTPError(404, f"no route for {method} /api/models/{repo_id}/{'/'.join(rest)}")

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        header: dict = {}
        files: dict[str, bytes] = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item["key"] == "header":
                header = item["value"]
            elif item["key"] == "file" and item["value"].get("encoding", "base64") == "base64":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"], validate=True)
            else:
                raise _HTTPError(400, f"unsupported commit operation {item['key']!r} (only regular files)")
        sha = self.server.hub.create_commit(
            repo_id,
            files,
            commit_message=header.get("summary") or "commit",
            parent_commit=header.get("parentCommit"),
            revision=revision,
        )
        self._json(
            200,
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self.server.endpoint}/{repo_id}/commit/{sha}",
                "pullRequestUrl": None,
            },
        )

    def _resolve_file(self, method: str, repo_id: str, revision: str, filename: str) -> None:
        hub = self.server.hub
        sha = hub.resolve(repo_id, revision)
        entry = hub.tree(repo_id, revision=sha).get(filename)
        if entry is None:
            raise _HTTPError(404, f"{filename!r} not found in {repo_id!r} at {revision!r}", "EntryNotFound")
        data = hub.download(repo_id, filename, revision=sha).read_bytes() if method == "GET" else b""
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{entry["oid"]}"',
            "Content-Type": "application/octet-stream",
        }
        if method == "HEAD":
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(entry["size"]))
            self.end_headers()
            return
        self._send(200, data, headers)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, hub: LocalHub, token: str | None, private: bool) -> None:
        super().__init__(address, _Handler)
        self.hub, self.token, self.private = hub, token, private
        self.endpoint = ""
        self.requests: list[tuple[str, str]] = []
        self.faults: list[Fault] = []
        self._fault_lock = threading.Lock()

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self._fault_lock:
            for fault in self.faults:
                if fault.count > 0 and fault.matches(method, path):
                    fault.count -= 1
                    return fault
        return None


class HubServer:
    """A Hub-compatible HTTP server over a LocalHub folder; use as a context manager, point clients at ``.endpoint``.

    ``token``: when set, writes (and with ``private=True`` also reads) need ``Authorization: Bearer <token>``.
    :meth:`inject_fault` makes the next matching requests fail (429/5xx), to test clients' retries.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        namespace: str = "gossip",
        token: str | None = None,
        private: bool = False,
    ) -> None:
        self.hub = LocalHub(Path(root), namespace=namespace)
        self._server = _Server((host, port), self.hub, token, private)
        host_name, port_number = self._server.server_address[:2]
        self.endpoint = f"http://{host_name}:{port_number}"
        self._server.endpoint = self.endpoint
        self._thread: threading.Thread | None = None

    @property
    def requests(self) -> list[tuple[str, str]]:
        """``(method, path)`` of every request served so far (for tests and diagnostics)."""
        return self._server.requests

    def inject_fault(
        self,
        count: int,
        status: int = 503,
        *,
        method: str | None = None,
        path_contains: str | None = None,
        retry_after: float | None = None,
    ) -> Fault:
        """Fail the next ``count`` requests matching ``method``/``path_contains`` with HTTP ``status``."""
        fault = Fault(count, status, method, path_contains, retry_after)
        with self._server._fault_lock:
            self._server.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Drop every pending injected fault."""
        with self._server._fault_lock:
            self._server.faults.clear()

    def start(self) -> HubServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted."""
        self._server.serve_forever()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
