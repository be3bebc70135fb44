"""Serve a LocalHub folder over the Hugging Face Hub HTTP API, so ``huggingface_hub.HfApi`` can push and pull.

Implements the part of the Hub API that :class:`sorlora_gossip.hub.hf.HfHub` uses (model repos only): repo creation
and listing, repo info at a revision, ``whoami-v2``, preupload (always ``regular`` uploads: no LFS/Xet), ndjson
commits with ``parentCommit`` (412 when stale), tags (create, delete), refs, commits, tree, and ``resolve`` downloads
with the ``X-Repo-Commit`` and ``ETag`` headers. Errors carry ``X-Error-Code`` from the one table shared with the
client (:data:`sorlora_gossip.hub.base.ERROR_STATUS`).

Authorization is the Hub's: tokens map to users (``tokens={user: token}``, the CLI reads them from a file). A user
writes only repos in its own namespace; in a collaboration repo (one whose head holds ``collab.json``) a user the
collaboration admits may commit only what :func:`sorlora_gossip.layout.collab_write_allowed` allows; tags, branches
and deletions belong to the owner. Anonymous writes get 401, another user's writes 403; private repos are read by
their owner only. The token is checked before any byte of the body is read; bodies are streamed to disk (base64
decoded as they arrive) under a size limit; downloads are streamed from the blob files; sockets time out per read,
headers and whole requests have deadlines; connections are served from three bounded pools (still sending headers,
anonymous, authenticated: see :class:`_Slots`), so anonymous or slow clients cannot take the slots of authenticated
ones; the request log is bounded; error messages never show the server's folder.

Without tokens the server is open (the simulation, a lab), and only on a loopback address. Built on the standard
library's ``ThreadingHTTPServer``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from peft_sorlora.exchange import PayloadError, parse_json

from ..layout import ADMITTED_KEY, COLLAB_FILE, PLAN_FILE, collab_write_allowed
from .base import (
    EndpointNotSupported,
    HubError,
    HubForbidden,
    RepoNotFound,
    RequestTooLarge,
    status_for_error,
    validate_path,
    validate_repo_id,
)
from .local import LocalHub

__all__ = ["Fault", "HubServer", "load_tokens"]

logger = logging.getLogger(__name__)

MAX_JSON_BODY = 1 << 20  # bytes of any JSON request body (repo creation, preupload, tags)
MAX_COLLAB_JSON = 1 << 20
_LINE = 1 << 16  # a commit's ndjson line longer than this must be a file, whose base64 is streamed
_CONTENT = re.compile(rb'"content"\s*:\s*"')


def load_tokens(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a tokens file: a JSON object ``{user: token}`` (users are namespaces, tokens distinct, >= 16 chars)."""
    try:
        tokens = parse_json(Path(path).read_bytes(), max_bytes=MAX_JSON_BODY, what=f"tokens file {path}")
    except OSError as exc:
        raise ValueError(f"cannot read tokens file {path}: {exc.strerror}") from None
    if not isinstance(tokens, dict) or not tokens:
        raise ValueError(f"tokens file {path} must hold a non-empty JSON object {{user: token}}")
    return check_tokens(tokens)


def check_tokens(tokens: Mapping[str, str]) -> dict[str, str]:
    """``tokens`` as a checked ``{user: token}`` dict (never echoing a token in an error)."""
    checked: dict[str, str] = {}
    for user, token in tokens.items():
        validate_repo_id(f"{user}/x")
        if not isinstance(token, str) or len(token) < 16 or any(c.isspace() for c in token):
            raise ValueError(f"token of user {user!r} must be a string of at least 16 non-space characters")
        checked[user] = token
    if len(set(checked.values())) != len(checked):
        raise ValueError("two users share one token")
    return checked


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


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
    status, code = status_for_error(exc)
    return _HTTPError(status, str(exc), code)


class _Body:
    """The request body as a bounded stream: never more than ``Content-Length`` bytes are read from the socket;
    bytes read ahead can be given back (:meth:`unread`)."""

    def __init__(self, rfile, length: int) -> None:
        self._rfile, self._socket_left, self._ahead = rfile, length, b""

    @property
    def left(self) -> int:
        return self._socket_left + len(self._ahead)

    def unread(self, data: bytes) -> None:
        self._ahead = data + self._ahead

    def read(self, n: int) -> bytes:
        if self._ahead:
            data, self._ahead = self._ahead[:n], self._ahead[n:]
            return data
        data = self._rfile.read(min(n, self._socket_left)) if self._socket_left > 0 else b""
        self._socket_left -= len(data)
        if n > 0 and self._socket_left > 0 and not data:
            raise _HTTPError(400, "request body ended early")
        return data

    def readline(self, limit: int) -> bytes:
        if self._ahead:
            cut = self._ahead.find(b"\n", 0, limit)
            if cut >= 0 or len(self._ahead) >= limit:
                end = cut + 1 if cut >= 0 else limit
                data, self._ahead = self._ahead[:end], self._ahead[end:]
                return data
            data, self._ahead = self._ahead, b""
            return data + self.readline(limit - len(data))
        data = self._rfile.readline(min(limit, self._socket_left)) if self._socket_left > 0 else b""
        self._socket_left -= len(data)
        return data


PENDING, ANONYMOUS, AUTHENTICATED, CLOSING = "pending", "anonymous", "authenticated", "closing"


class _Conn:
    """One live connection: its socket, its phase (which pool it holds a slot of) and its deadline."""

    __slots__ = ("sock", "phase", "deadline", "since")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.phase, self.deadline, self.since = sock, PENDING, deadline, time.monotonic()


class _Slots:
    """Connection slots in three pools, so that clients who never authenticate cannot take the slots of those who do.

    Every connection starts *pending* (reading a request's line and headers, under a short whole-header deadline);
    when the pending pool is full, the oldest pending connection is cut to make room (a real client sends its
    headers in milliseconds, a slow one is the oldest). Once the headers are in, a request with a valid token (or
    any request on an open server) moves to the *authenticated* pool (``max_connections``), any other to the smaller
    *anonymous* pool; when that pool is full the request gets a 503. Each request has a whole-request deadline; a
    reaper thread cuts (shuts down) every connection past its deadline, whatever it is doing. Between keep-alive
    requests a connection is pending again.
    """

    def __init__(self, sizes: Mapping[str, int]) -> None:
        self.sizes = dict(sizes)
        self.counts = {phase: 0 for phase in self.sizes}
        self.conns: dict[int, _Conn] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.evicted = 0

    def _cut(self, conn: _Conn) -> None:  # under the lock
        if conn.phase != CLOSING:
            self.counts[conn.phase] -= 1
            conn.phase = CLOSING
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)  # wakes the handler's blocked read; its thread ends
        except OSError:
            pass

    def _make_pending_room(self, me: _Conn | None) -> None:  # under the lock
        while self.counts[PENDING] >= self.sizes[PENDING]:
            oldest = min((c for c in self.conns.values() if c.phase == PENDING and c is not me),
                         key=lambda c: c.since)  # fmt: skip
            self.evicted += 1
            self._cut(oldest)

    def admit(self, sock: socket.socket, deadline: float) -> _Conn:
        conn = _Conn(sock, deadline)
        with self.lock:
            self._make_pending_room(None)
            self.conns[id(sock)] = conn
            self.counts[PENDING] += 1
        return conn

    def get(self, sock: socket.socket) -> _Conn | None:
        return self.conns.get(id(sock))

    def move(self, conn: _Conn, phase: str, deadline: float) -> bool:
        """Move ``conn`` to ``phase``'s pool (False when it is full or the connection is being cut)."""
        with self.lock:
            if conn.phase == CLOSING:
                return False
            if conn.phase == phase:
                conn.deadline = deadline
                return True
            if phase == PENDING:
                self._make_pending_room(conn)
            elif self.counts[phase] >= self.sizes[phase]:
                return False
            self.counts[conn.phase] -= 1
            self.counts[phase] += 1
            conn.phase, conn.deadline, conn.since = phase, deadline, time.monotonic()
            return True

    def extend(self, conn: _Conn | None, seconds: float) -> None:
        if conn is not None:
            with self.lock:
                conn.deadline += seconds

    def release(self, sock: socket.socket) -> None:
        with self.lock:
            conn = self.conns.pop(id(sock), None)
            if conn is not None and conn.phase != CLOSING:
                self.counts[conn.phase] -= 1

    @property
    def live(self) -> int:
        with self.lock:
            return sum(self.counts.values())

    def reap_forever(self, interval: float = 0.1) -> None:
        while not self.stopped.wait(interval):
            now = time.monotonic()
            with self.lock:
                for conn in list(self.conns.values()):
                    if conn.phase != CLOSING and conn.deadline < now:
                        self._cut(conn)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid the 40 ms delayed-ACK stall

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # StreamRequestHandler applies it to the socket (per read)
        self._conn = self.server.slots.get(self.request)
        self._requests = 0
        super().setup()

    def handle_one_request(self) -> None:
        """Each request starts pending (headers under the header deadline), then holds a slot of its pool."""
        if self._requests and self._conn is not None:  # a keep-alive connection waits for its next request
            if not self.server.slots.move(self._conn, PENDING, time.monotonic() + self.server.header_timeout):
                self.close_connection = True
                return
        self._requests += 1
        super().handle_one_request()

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self._conn is None:
            return True
        try:
            authenticated = not self.server.tokens or self._authenticate() is not None
        except _HTTPError:
            authenticated = False  # an unknown token: answered 401 from the anonymous pool
        try:
            length = max(0, int(self.headers.get("Content-Length") or 0))
        except ValueError:
            length = 0
        deadline = time.monotonic() + self.server.request_deadline + length / self.server.min_transfer_rate
        if self.server.slots.move(self._conn, AUTHENTICATED if authenticated else ANONYMOUS, deadline):
            return True
        self.close_connection = True
        try:
            self.wfile.write(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")  # fmt: skip
        except OSError:
            pass
        return False

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        logger.debug("%s %s", self.address_string(), format % args)  # request line only: never headers/tokens

    # -- plumbing ----------------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, head=False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _length(self, limit: int) -> int:
        """The body's declared length, refused (before reading it) when missing or over ``limit``."""
        if self.headers.get("Transfer-Encoding"):
            raise _HTTPError(411, "chunked request bodies are not accepted: send Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise _HTTPError(400, "bad Content-Length") from None
        if length < 0:
            raise _HTTPError(400, "bad Content-Length")
        if length > limit:
            raise _HTTPError(413, f"request body of {length} bytes is over the {limit}-byte limit")
        return length

    def _json_body(self) -> object:
        body = _Body(self.rfile, self._length(MAX_JSON_BODY))
        data = body.read(body.left)
        self._body_read = True
        return parse_json(data, max_bytes=MAX_JSON_BODY, what="request body")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.server.log_request_line(method, url.path)
        self._body_read = method in ("GET", "HEAD")
        fault = self.server.take_fault(method, url.path)
        if fault is not None:
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            return self._error(method, _HTTPError(fault.status, f"injected fault {fault.status}"), headers)
        try:
            user = self._authenticate()
            self._route(method, [unquote(p) for p in url.path.split("/")[1:]], parse_qs(url.query), user)
        except _HTTPError as exc:
            self._error(method, exc)
        except HubError as exc:
            self._error(method, _error_for(exc))
        except PayloadError as exc:
            self._error(method, _HTTPError(400, f"bad request: {exc}"))
        except (ValueError, KeyError, TypeError) as exc:
            self._error(method, _HTTPError(400, f"bad request: {type(exc).__name__}: {exc}"))
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:  # never show the server's folder or a traceback to a client
            logger.exception("hub-serve: internal error on %s %s", method, url.path)
            self._error(method, _HTTPError(500, "internal server error"))

    def _error(self, method: str, exc: _HTTPError, headers: dict[str, str] | None = None) -> None:
        if not self._body_read:
            self.close_connection = True  # the unread body would be taken for the next request
        headers = {"X-Error-Message": exc.message.replace("\n", " ")[:300], **(headers or {})}
        if exc.code:
            headers["X-Error-Code"] = exc.code
        try:
            if method == "HEAD":
                self._send(exc.status, b"", headers, head=True)
            else:
                self._json(exc.status, {"error": exc.message}, headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    do_GET = lambda self: self._dispatch("GET")  # noqa: E731
    do_HEAD = lambda self: self._dispatch("HEAD")  # noqa: E731
    do_POST = lambda self: self._dispatch("POST")  # noqa: E731
    do_DELETE = lambda self: self._dispatch("DELETE")  # noqa: E731
    do_PUT = lambda self: self._dispatch("PUT")  # noqa: E731

    # -- who is asking, and may they ---------------------------------------------------------------------------

    def _authenticate(self) -> str | None:
        """The user the ``Authorization: Bearer`` token belongs to (None: anonymous); 401 for an unknown token."""
        header = self.headers.get("Authorization")
        if header is None or not self.server.tokens:
            return None
        scheme, _, token = header.partition(" ")
        user = None
        for name, known in self.server.tokens.items():  # compare with every token, in constant time each
            if hmac.compare_digest(token.strip().encode(), known.encode()) and scheme.lower() == "bearer":
                user = name
        if user is None:
            raise _HTTPError(401, "Invalid credentials in Authorization header")
        return user

    def _need_user(self, user: str | None, what: str) -> None:
        if self.server.tokens and user is None:
            raise _HTTPError(401, f"{what} needs a token (Authorization: Bearer ...)")

    def _check_read(self, repo_id: str, user: str | None) -> None:
        hub = self.server.hub
        if self.server.private and self.server.tokens and user is None:
            raise _HTTPError(401, "this hub is private: reads need a token")
        if self.server.tokens and hub.repo_exists(repo_id) and hub.is_private(repo_id):
            if user is None:
                raise _HTTPError(401, f"repository {repo_id!r} is private: reads need a token")
            if user != repo_id.split("/")[0] and not self._admitted(repo_id, user):  # a private collaboration:
                raise RepoNotFound(f"repository {repo_id!r} not found", repo_id=repo_id)  # its members read it

    def _check_owner(self, repo_id: str, user: str | None, what: str) -> None:
        """Tags, branches, deletions: the repo's owner only."""
        self._need_user(user, what)
        if self.server.tokens and user != repo_id.split("/")[0]:
            raise HubForbidden(f"user {user!r} may not {what} in {repo_id!r} (not its owner)", repo_id=repo_id)

    def _admitted(self, repo_id: str, user: str) -> bool:
        """Whether ``repo_id`` is a collaboration repo (its head holds ``collab.json``) that admits ``user``."""
        hub = self.server.hub
        try:
            entry = hub.tree(repo_id).get(COLLAB_FILE)
            if entry is None:
                return False
            terms = parse_json(hub.read_bytes(repo_id, COLLAB_FILE, revision="main", max_bytes=MAX_COLLAB_JSON),
                               max_bytes=MAX_COLLAB_JSON, what=f"{repo_id}/{COLLAB_FILE}")  # fmt: skip
        except (HubError, PayloadError):
            return False
        admitted = terms.get(ADMITTED_KEY) if isinstance(terms, dict) else []
        return admitted is None or (isinstance(admitted, list) and user in admitted)

    def _check_write(self, repo_id: str, user: str | None) -> bool:
        """May ``user`` commit to ``repo_id``? True: as its owner; False: as an admitted collaborator (whose
        paths are checked once known); raises 401/403 otherwise. Decided before the body is read."""
        self._need_user(user, f"writing to {repo_id!r}")
        if not self.server.tokens or user == repo_id.split("/")[0]:
            return True
        self.server.hub.resolve(repo_id)  # RepoNotFound first
        if not self._admitted(repo_id, user):
            raise HubForbidden(f"user {user!r} may not write to {repo_id!r}", repo_id=repo_id)
        return False

    # -- routes ------------------------------------------------------------------------------------------------

    def _route(self, method: str, parts: list[str], query: dict[str, list[str]], user: str | None) -> None:
        hub = self.server.hub
        if parts == ["api", "whoami-v2"] and method == "GET":
            if user is None:
                raise _HTTPError(401, "whoami needs a token")
            return self._json(200, {"type": "user", "name": user, "fullname": user, "orgs": [],
                                    "auth": {"type": "access_token", "accessToken": {"role": "write"}}})  # fmt: skip
        if parts == ["api", "repos", "create"] and method == "POST":
            self._need_user(user, "creating a repo")
            return self._create_repo(self._json_body(), user)
        if parts == ["api", "repos", "delete"] and method == "DELETE":
            payload = self._json_body()
            repo_id = validate_repo_id(f"{payload.get('organization') or user}/{payload.get('name')}")
            self._check_owner(repo_id, user, "delete the repo")
            raise EndpointNotSupported("deleting repos is not served")
        if parts == ["api", "validate-yaml"] and method == "POST" and not self.server.minimal:
            self._json_body()  # model cards (README.md): accepted as is
            return self._json(200, {"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) == 2 and method == "GET" and not self.server.minimal:
            author = query.get("author", [hub.namespace])[0]
            repos = [r for r in hub.list_repos(author) if not (self.server.tokens and hub.is_private(r)
                                                                and user != author)]  # fmt: skip
            return self._json(200, [{"id": r, "modelId": r} for r in repos])
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = validate_repo_id(f"{parts[2]}/{parts[3]}")
            return self._api_repo(method, repo_id, parts[4:], user)
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = validate_repo_id(f"{parts[0]}/{parts[1]}")
            self._check_read(repo_id, user)
            return self._resolve_file(method, repo_id, parts[3], "/".join(parts[4:]))
        raise _HTTPError(404, f"no route for {method} /{'/'.join(parts)}")

    def _create_repo(self, payload: object, user: str | None) -> None:
        if not isinstance(payload, dict) or payload.get("type") not in (None, "model"):
            raise _HTTPError(400, "only model repos are served")
        namespace = payload.get("organization") or user or self.server.hub.namespace
        repo_id = validate_repo_id(f"{namespace}/{payload.get('name')}")
        if self.server.tokens and namespace != user:
            raise HubForbidden(f"user {user!r} may create repos in its own namespace only, not {namespace!r}")
        url = f"{self.server.endpoint}/{repo_id}"
        if self.server.hub.repo_exists(repo_id):
            return self._json(409, {"error": "You already created this model repo", "url": url})
        private = payload.get("visibility") == "private" or payload.get("private") is True
        self.server.hub.create_repo(repo_id, exist_ok=True, private=private)
        self._json(200, {"url": url, "name": repo_id})

    def _api_repo(self, method: str, repo_id: str, rest: list[str], user: str | None) -> None:
        hub = self.server.hub
        action, args = (rest[0], rest[1:]) if rest else ("", [])
        if method in ("GET", "HEAD"):
            self._check_read(repo_id, user)
        if method == "GET" and action in ("", "revision"):
            revision = "/".join(args) or "main"
            sha = hub.resolve(repo_id, revision)
            tree = hub.tree(repo_id, revision=sha)
            return self._json(200, {
                "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": sha,
                "private": hub.is_private(repo_id), "lastModified": hub.created_at(repo_id, sha),
                "siblings": [{"rfilename": p, "size": e["size"]} for p, e in sorted(tree.items())],
            })  # fmt: skip
        if method == "POST" and action == "preupload":
            self._check_write(repo_id, user)
            payload = self._json_body()
            revision = "/".join(args) or "main"
            tree = hub.tree(repo_id, revision=revision)
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": tree[f["path"]]["oid"] if f["path"] in tree else None}
                for f in payload["files"]
            ]  # fmt: skip
            return self._json(200, {"files": files, "commitOid": hub.resolve(repo_id, revision)})
        if method == "POST" and action == "commit":
            owner = self._check_write(repo_id, user)
            return self._commit(repo_id, "/".join(args) or "main", user, owner)
        if method == "POST" and action == "tag":
            self._check_owner(repo_id, user, "create tags")
            payload = self._json_body()
            hub.create_tag(repo_id, payload["tag"], revision="/".join(args) or "main")
            return self._json(200, {"success": True})
        if method == "DELETE" and action == "tag" and args:
            self._check_owner(repo_id, user, "delete tags")
            hub.delete_tag(repo_id, "/".join(args))
            return self._json(200, {"success": True})
        if method in ("POST", "DELETE", "PUT") and action in ("branch", "settings", "tag", "commit"):
            self._check_owner(repo_id, user, f"change {action}s")
            raise EndpointNotSupported(f"{method} {action} is not served")
        if method == "GET" and action == "refs":
            refs = hub.list_refs(repo_id)
            as_list = lambda kind, d: [  # noqa: E731
                {"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": s} for n, s in sorted(d.items())
            ]
            return self._json(
                200, {"branches": as_list("heads", refs.branches), "tags": as_list("tags", refs.tags), "converts": []}
            )
        if method == "GET" and action == "commits":
            history = hub.list_commits(repo_id, revision="/".join(args) or "main")
            return self._json(
                200, [{"id": c.sha, "title": c.message, "message": "", "authors": [{"user": a} for a in c.authors],
                       "date": c.created_at}
                      for c in history],
            )  # fmt: skip
        if method == "GET" and action == "tree":
            revision, prefix = (args[0] if args else "main"), "/".join(args[1:])
            tree = hub.tree(repo_id, revision=revision)
            items = [
                {"type": "file", "oid": e["oid"], "size": e["size"], "path": p}
                for p, e in sorted(tree.items())
                if not prefix or p.startswith(prefix.rstrip("/") + "/") or p == prefix
            ]
            return self._json(200, items)
        if method in ("POST", "DELETE", "PUT"):
            self._check_owner(repo_id, user, f"{method} {action or 'the repo'}")
        raise _HTTPError(404, f"no route for {method} /api/models/{repo_id}/{'/'.join(rest)}")

    def _commit(self, repo_id: str, revision: str, user: str | None, owner: bool) -> None:
        body = _Body(self.rfile, self._length(self.server.max_body_bytes))
        self.server.hub.resolve(repo_id, revision)  # RepoNotFound / RevisionNotFound before storing anything
        uploads = self.server.hub.root / "uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=uploads) as folder:
            header, files = self._read_commit(body, Path(folder))
            self._body_read = True
            if not owner and not collab_write_allowed(user, list(files), plan_exists=False):
                raise HubForbidden(f"user {user!r} may write only its own members/{user}/ files in {repo_id!r}")

            def check(tree: dict[str, dict]) -> None:  # under the repo lock, on the head it commits onto
                if not owner and not collab_write_allowed(user, list(files), plan_exists=PLAN_FILE in tree):
                    raise HubForbidden(f"{PLAN_FILE} exists in {repo_id!r}: it is written once", repo_id=repo_id)

            author = self.server.hub.commit_author(user) if user is not None else contextlib.nullcontext()
            with self.server.hub.commit_check(check), author:
                sha = self.server.hub.create_commit(
                    repo_id,
                    files,
                    commit_message=str(header.get("summary") or "commit"),
                    parent_commit=header.get("parentCommit"),
                    revision=revision,
                )
        self._json(200, {"success": True, "commitOid": sha, "pullRequestUrl": None,
                         "commitUrl": f"{self.server.endpoint}/{repo_id}/commit/{sha}"})  # fmt: skip

    def _read_commit(self, body: _Body, folder: Path) -> tuple[dict, dict[str, Path]]:
        """Parse an ndjson commit body, streaming each file's base64 content to a file in ``folder``."""
        header: dict = {}
        files: dict[str, Path] = {}
        limit = self.server.max_file_bytes
        while body.left > 0:
            line = body.readline(_LINE)
            if not line.strip():
                continue
            target = folder / f"{len(files)}.bin"
            if line.endswith(b"\n") or body.left == 0:
                item = parse_json(line, max_bytes=_LINE, what="commit line")
                if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
                    raise _HTTPError(400, "malformed commit line")
                if item.get("key") == "header":
                    header = item["value"]
                    continue
                content = item["value"].get("content")
                if not isinstance(content, str):
                    raise _HTTPError(400, "commit file without content")
                data = self._b64(content.encode())
                if len(data) > limit:
                    raise RequestTooLarge(f"file over the {limit}-byte limit")
                target.write_bytes(data)
            else:
                item = self._stream_file_line(line, body, target, limit)
            value = item["value"]
            if item.get("key") != "file" or value.get("encoding", "base64") != "base64":
                raise _HTTPError(400, f"unsupported commit operation {item.get('key')!r} (only regular files)")
            path = validate_path(value.get("path"))
            if path in files:
                raise _HTTPError(400, f"file {path!r} twice in one commit")
            files[path] = target
        return header, files

    @staticmethod
    def _b64(data: bytes) -> bytes:
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _HTTPError(400, f"bad base64 content: {exc}") from None

    def _stream_file_line(self, start: bytes, body: _Body, target: Path, limit: int) -> dict:
        """A commit line too long to hold: ``{"key": "file", "value": {"content": "<base64>", ...}}`` with the
        base64 decoded to ``target`` chunk by chunk; the small rest of the line is parsed as JSON."""
        match = _CONTENT.search(start)
        if match is None:
            raise _HTTPError(400, "commit line too long and not a file's content")
        head, rest = start[: match.start()], start[match.end() :]
        written, pending = 0, b""
        with target.open("wb") as out:
            while True:
                end = rest.find(b'"')
                chunk, rest = (rest, b"") if end < 0 else (rest[:end], rest[end + 1 :])
                pending += chunk
                cut = len(pending) - len(pending) % 4 if end < 0 else len(pending)
                data = self._b64(pending[:cut])
                pending = pending[cut:]
                written += len(data)
                if written > limit:
                    raise RequestTooLarge(f"file over the {limit}-byte limit")
                out.write(data)
                if end >= 0:
                    break
                rest = body.read(_LINE)
                if not rest:
                    raise _HTTPError(400, "commit body ended inside a file's content")
        body.unread(rest)
        tail = body.readline(_LINE)
        item = parse_json(head + b'"content": ""' + tail, max_bytes=2 * _LINE + 64, what="commit line")
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            raise _HTTPError(400, "malformed commit line")
        return item

    def _resolve_file(self, method: str, repo_id: str, revision: str, filename: str) -> None:
        hub = self.server.hub
        sha = hub.resolve(repo_id, revision)
        entry = hub.tree(repo_id, revision=sha).get(validate_path(filename))
        if entry is None:
            raise _HTTPError(404, f"{filename!r} not found in {repo_id!r} at {revision!r}", "EntryNotFound")
        self.send_response(200)
        for key, value in {
            "X-Repo-Commit": sha,
            "ETag": f'"{entry["oid"]}"',
            "Content-Type": "application/octet-stream",
            "Content-Length": str(entry["size"]),
        }.items():
            self.send_header(key, value)  # fmt: skip
        self.end_headers()
        if method == "GET":
            self.server.slots.extend(self._conn, entry["size"] / self.server.min_transfer_rate)
            with hub.download(repo_id, filename, revision=sha).open("rb") as blob:
                shutil.copyfileobj(blob, self.wfile, 1 << 20)  # streamed: the file is never held in memory


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, hub: LocalHub, *, tokens: dict[str, str], private: bool, minimal: bool,
                 max_body_bytes: int, max_file_bytes: int, request_timeout: float, max_connections: int,
                 request_log_size: int, max_pending: int, max_anonymous: int, header_timeout: float,
                 request_deadline: float, min_transfer_rate: float) -> None:  # fmt: skip
        # the slots first: a failed bind inside super().__init__ calls server_close, which stops them
        self.slots = _Slots({PENDING: max_pending, ANONYMOUS: max_anonymous, AUTHENTICATED: max_connections})
        super().__init__(address, _Handler)
        self.hub, self.tokens, self.private, self.minimal = hub, tokens, private, minimal
        self.max_body_bytes, self.max_file_bytes = max_body_bytes, max_file_bytes
        self.request_timeout, self.max_connections = request_timeout, max_connections
        self.header_timeout = min(header_timeout, request_timeout)
        self.request_deadline, self.min_transfer_rate = request_deadline, min_transfer_rate
        self.endpoint = ""
        self.requests: deque[tuple[str, str]] = deque(maxlen=request_log_size)
        self.faults: list[Fault] = []
        self._fault_lock = threading.Lock()
        self._reaper = threading.Thread(target=self.slots.reap_forever, name="hub-server-reaper", daemon=True)
        self._reaper.start()

    def log_request_line(self, method: str, path: str) -> None:
        self.requests.append((method, path))

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self._fault_lock:
            for fault in self.faults:
                if fault.count > 0 and fault.matches(method, path):
                    fault.count -= 1
                    return fault
        return None

    def process_request(self, request, client_address) -> None:
        """One thread per connection; a new connection takes a pending slot (cutting the oldest pending one when
        they are all taken), see :class:`_Slots`."""
        self.slots.admit(request, time.monotonic() + self.header_timeout)
        try:
            super().process_request(request, client_address)
        except RuntimeError:  # no thread could be started
            self.slots.release(request)
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release(request)

    @property
    def active_connections(self) -> int:
        return self.slots.live

    def server_close(self) -> None:
        self.slots.stopped.set()
        super().server_close()

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up or times out is routine: one debug line, not a traceback on stderr."""
        logger.debug("hub-serve: connection from %s ended with an error", client_address[0], exc_info=True)


class HubServer:
    """A Hub-compatible HTTP server over a LocalHub folder; use as a context manager, point clients at ``.endpoint``.

    ``tokens``: ``{user: token}``; with them every write needs a token and each user writes its own namespace (and
    its member files in collaborations that admit it), see the module docstring. ``token``: shorthand for one user,
    ``namespace``. Without tokens the server is open, and refuses a non-loopback ``host``. ``private``: reads need a
    token too (repos created private are always read by their owner only). ``minimal``: leave out the optional
    endpoints (``/api/validate-yaml``, repo listing), as a bare Hub-compatible server would.
    ``max_body_bytes``/``max_file_bytes``: largest commit body / file; ``request_timeout``: seconds a socket may
    stay silent; ``max_connections``: authenticated requests served at once (every request on an open server);
    ``max_anonymous``: requests without a valid token served at once (a separate, smaller pool);
    ``max_pending``: connections still sending a request's headers (when full, the oldest is cut);
    ``header_timeout``: seconds a request's line and headers may take in all (at most ``request_timeout``);
    ``request_deadline`` + body or file bytes / ``min_transfer_rate``: seconds a whole request may take in all
    (slow senders and readers are cut off); ``request_log_size``: requests remembered.
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
        tokens: Mapping[str, str] | None = None,
        private: bool = False,
        minimal: bool = False,
        max_body_bytes: int = 512 << 20,
        max_file_bytes: int | None = None,
        request_timeout: float = 30.0,
        max_connections: int = 128,
        request_log_size: int = 10_000,
        max_pending: int = 32,
        max_anonymous: int = 32,
        header_timeout: float = 10.0,
        request_deadline: float = 120.0,
        min_transfer_rate: float = 256 << 10,
    ) -> None:
        if min(max_pending, max_anonymous, max_connections) < 1 or min(header_timeout, request_deadline) <= 0:
            raise ValueError("connection pools need at least one slot each and deadlines must be positive")
        if min_transfer_rate <= 0:
            raise ValueError("min_transfer_rate must be positive (bytes per second)")
        users = dict(tokens or {})
        if token is not None:
            users.setdefault(namespace, token)
        users = check_tokens(users) if users else {}
        if not users and not is_loopback(host):
            raise ValueError(f"refusing to serve {host!r} without tokens: anyone reaching it could write every "
                             "repo; pass a tokens file (hub-serve --tokens-file) or serve on 127.0.0.1")  # fmt: skip
        self.hub = LocalHub(Path(root), namespace=namespace)
        self._server = _Server(
            (host, port), self.hub, tokens=users, private=private, minimal=minimal, max_body_bytes=max_body_bytes,
            max_file_bytes=max_file_bytes or max_body_bytes, request_timeout=request_timeout,
            max_connections=max_connections, request_log_size=request_log_size, max_pending=max_pending,
            max_anonymous=max_anonymous, header_timeout=header_timeout, request_deadline=request_deadline,
            min_transfer_rate=min_transfer_rate,
        )  # fmt: skip
        host_name, port_number = self._server.server_address[:2]
        self.endpoint = f"http://{host_name}:{port_number}"
        self._server.endpoint = self.endpoint
        self._thread: threading.Thread | None = None

    @property
    def requests(self) -> list[tuple[str, str]]:
        """``(method, path)`` of the last requests served (at most ``request_log_size``; tests and diagnostics)."""
        return list(self._server.requests)

    @property
    def active_connections(self) -> int:
        """Connections being served right now."""
        return self._server.active_connections

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
