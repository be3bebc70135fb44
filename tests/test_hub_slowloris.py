"""hub-serve under slow and anonymous clients: separate connection pools before and after authentication, and
whole-header and whole-request deadlines (not per read)."""

from __future__ import annotations

import socket
import time

import pytest
from huggingface_hub import HfApi

from sorlora_gossip.hub import HubServer

TOKENS = {"alice": "hf_alice_0123456789abcdef", "bob": "hf_bob_0123456789abcdef00"}
PARTIAL = b"POST /api/models/alice/p/commit/main HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"


def _address(server: HubServer) -> tuple[str, int]:
    host, port = server.endpoint.removeprefix("http://").split(":")
    return host, int(port)


def _slow_sockets(server: HubServer, count: int) -> list[socket.socket]:
    """``count`` anonymous connections that send part of a request's headers and then stall."""
    sockets = []
    for _ in range(count):
        conn = socket.create_connection(_address(server), timeout=5)
        conn.sendall(PARTIAL)
        sockets.append(conn)
    return sockets


def _closed_by_server(conn: socket.socket, within: float) -> bool:
    conn.settimeout(within)
    try:
        conn.recv(4096)  # an answer (a 4xx/503) or b"": the close itself
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_140_slow_anonymous_sockets_do_not_deny_an_authenticated_push(tmp_path):
    with HubServer(tmp_path / "srv", tokens=TOKENS) as server:  # the default pools and deadlines
        sockets = _slow_sockets(server, 140)
        try:
            time.sleep(0.3)
            assert server.active_connections <= 32, "slow header senders hold pending slots only"
            start = time.monotonic()
            api = HfApi(endpoint=server.endpoint, token=TOKENS["alice"])
            api.create_repo("alice/p")
            api.upload_file(path_or_fileobj=b"pushed", path_in_repo="a.txt", repo_id="alice/p",
                            commit_message="through the slow sockets")  # fmt: skip
            elapsed = time.monotonic() - start
            assert server.hub.read_bytes("alice/p", "a.txt", revision="main") == b"pushed"
            assert elapsed < 10, f"the push took {elapsed:.1f} s"
            anonymous = HfApi(endpoint=server.endpoint, token=False)
            assert anonymous.model_info("alice/p").sha, "anonymous reads are still served (their own pool)"
        finally:
            for conn in sockets:
                conn.close()
    print(f"authenticated push with 140 slow sockets open: {elapsed:.2f} s")


def test_a_request_has_a_whole_header_deadline_not_a_per_read_timeout(tmp_path):
    with HubServer(tmp_path / "srv", tokens=TOKENS, request_timeout=30.0, header_timeout=1.0) as server:
        conn = socket.create_connection(_address(server), timeout=5)
        try:
            start = time.monotonic()
            cut = False
            for i in range(40):  # one header byte every 0.1 s: never silent for request_timeout
                try:
                    conn.sendall(PARTIAL[i : i + 1])
                except OSError:
                    cut = True
                    break
                time.sleep(0.1)
                conn.settimeout(0.001)
                try:
                    if conn.recv(1) == b"":
                        cut = True
                        break
                except TimeoutError:
                    pass
                except OSError:
                    cut = True
                    break
            assert cut and time.monotonic() - start < 3, "the header trickle is cut after header_timeout"
        finally:
            conn.close()


def test_a_slow_authenticated_body_is_cut_at_the_request_deadline(tmp_path):
    with HubServer(tmp_path / "srv", tokens=TOKENS, request_deadline=1.5) as server:
        HfApi(endpoint=server.endpoint, token=TOKENS["alice"]).create_repo("alice/p")
        conn = socket.create_connection(_address(server), timeout=5)
        try:
            body = b'{"key": "header", "value": {"summary": "slow"}}\n' + b" " * 200
            conn.sendall(b"POST /api/models/alice/p/commit/main HTTP/1.1\r\nHost: x\r\n"
                         b"Authorization: Bearer " + TOKENS["alice"].encode() + b"\r\n"
                         b"Content-Type: application/x-ndjson\r\nContent-Length: " + str(len(body)).encode() +
                         b"\r\n\r\n")  # fmt: skip
            start = time.monotonic()
            cut = False
            for i in range(len(body)):  # one byte every 0.05 s: 10 s in all, never silent
                try:
                    conn.sendall(body[i : i + 1])
                except OSError:
                    cut = True
                    break
                time.sleep(0.05)
                if time.monotonic() - start > 5:
                    break
            if not cut:
                cut = _closed_by_server(conn, 0.5)
            assert cut and time.monotonic() - start < 5, "cut off at the request deadline"
        finally:
            conn.close()
        assert server.hub.list_commits("alice/p")[0].message != "slow"


@pytest.mark.parametrize("tokens", [TOKENS, None])
def test_anonymous_requests_beyond_their_pool_get_503_and_authenticated_ones_are_served(tmp_path, tokens):
    with HubServer(tmp_path / "srv", tokens=tokens, max_anonymous=2, request_deadline=3.0) as server:
        host, port = _address(server)
        held = []
        try:
            for _ in range(4):  # anonymous requests whose body never comes hold anonymous (or, open: all) slots
                conn = socket.create_connection((host, port), timeout=5)
                conn.sendall(b"POST /api/validate-yaml HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
                held.append(conn)
            time.sleep(0.3)
            answers = []
            for conn in held:
                conn.settimeout(0.2)
                try:
                    answers.append(conn.recv(64))
                except TimeoutError:
                    answers.append(b"")
            busy = sum(a.startswith(b"HTTP/1.1 503") for a in answers)
            assert busy == (2 if tokens else 0), answers
            token = TOKENS["bob"] if tokens else None
            api = HfApi(endpoint=server.endpoint, token=token)
            api.create_repo("bob/q" if tokens else "gossip/q")
        finally:
            for conn in held:
                conn.close()
