"""A real S3-compatible server for the S3 tests and benchmarks: moto, in its own process.

Run as a script (``python tests/s3server.py``), it serves moto's S3 and IAM on 127.0.0.1, on a
free port it prints as one JSON line, until its standard input closes (so it never outlives the
test process that started it, even one killed with SIGKILL). It is moto's own WSGI app under
moto's ``ThreadedMotoServer`` recipe (``make_server`` with port 0, which reports the port it
bound; ``python -m moto.server -p 0`` would not tell us which one), wrapped in a small fault
injector: ``POST /_fault`` with ``{"kind": "503"|"reset"|"cut", "count": N, "match": "..."}``
makes the next N requests whose path contains ``match`` answer 503 SlowDown, have their
connection reset before any answer, or (GETs) send the headers and half the body, then reset.

In the test process, the session fixture ``s3_server`` starts it once, creates two IAM users
(``admin``: every action; ``nobody``: no policy, so every S3 call is AccessDenied) and then
turns moto's authentication on, so bad keys get InvalidAccessKeyId / SignatureDoesNotMatch and
access checks are real. ``s3_env`` puts the admin's credentials and the endpoint in the
environment (``AWS_ENDPOINT_URL``, with the shared config files pointed at empty files and the
EC2 metadata lookup turned off, so nothing outside this machine is ever asked). ``bucket``
gives each test a fresh bucket; ``big_object`` a bucket holding one 1 GiB object, built once
per session and shared by the tests that stream it. When ``CI=true`` a server that cannot start
fails the tests instead of skipping them.

The server's memory is its own: tests that measure the client's memory run the client in
another child process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REGION = "us-east-1"
ADMIN_POLICY = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)


# ---------------------------------------------------------------------- the server process


class _FaultInjector:
    """WSGI middleware: answers, resets or cuts the next N matching requests."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.rules: list[dict[str, Any]] = []
        self.seen: dict[str, int] = {}

    def _take(self, path: str, method: str) -> str | None:
        with self.lock:
            for rule in self.rules:
                if rule["count"] > 0 and rule["match"] in path and (
                    rule.get("method") in (None, method)
                ):
                    rule["count"] -= 1
                    self.seen[rule["kind"]] = self.seen.get(rule["kind"], 0) + 1
                    return str(rule["kind"])
        return None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == "/_fault":
            size = int(environ.get("CONTENT_LENGTH") or 0)
            body = json.loads(environ["wsgi.input"].read(size) or b"{}") if size else {}
            with self.lock:
                if body.get("clear"):
                    self.rules.clear()
                elif body:
                    self.rules.append({"match": "", **body})
                out = json.dumps({"seen": self.seen}).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [out]
        kind = self._take(path, environ.get("REQUEST_METHOD", ""))
        if kind == "503":
            body = (
                b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>"
            )
            start_response("503 Service Unavailable", [
                ("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body]
        if kind == "reset":
            _reset(environ)
            return []
        if kind == "cut":
            return self._cut(environ, start_response)
        return self.app(environ, start_response)

    def _cut(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        """The real answer's headers and the first half of its body, then a reset."""
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            captured["status"], captured["headers"] = status, headers
            return lambda data: None

        body = b"".join(self.app(environ, capture))
        write = start_response(captured["status"], captured["headers"])
        write(body[: len(body) // 2])
        _reset(environ)
        return []


def _reset(environ: dict[str, Any]) -> None:
    """Close the client's connection with a TCP reset (SO_LINGER 0)."""
    sock = environ.get("werkzeug.socket")
    if sock is None:  # pragma: no cover - werkzeug always sets it in its dev server
        raise RuntimeError("no socket to reset")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def serve() -> None:
    """The child's main: serve until stdin closes, then exit."""
    import logging

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on stderr
    app = _FaultInjector(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(json.dumps({"port": server.server_address[1], "pid": os.getpid()}), flush=True)
    sys.stdin.read()  # returns when the parent closes the pipe or dies
    server.shutdown()


# ---------------------------------------------------------------------- the test side


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key_id: str
    secret_access_key: str


@dataclass
class S3Server:
    """A running moto server: its endpoint, two users, and helpers to fill buckets."""

    endpoint: str
    process: subprocess.Popen[str]
    admin: Credentials
    nobody: Credentials

    def env(self, creds: Credentials | None = None) -> dict[str, str]:
        """AWS_* variables pointing at this server, with ``creds`` (admin by default)."""
        c = creds or self.admin
        return {
            "AWS_ACCESS_KEY_ID": c.access_key_id,
            "AWS_SECRET_ACCESS_KEY": c.secret_access_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, creds: Credentials | None = None) -> Any:
        """A plain (sync) boto3 S3 client for setting up fixtures."""
        import boto3
        from botocore.config import Config

        c = creds or self.admin
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=c.access_key_id, aws_secret_access_key=c.secret_access_key,
            config=Config(retries={"total_max_attempts": 1}),
        )

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name

    def put(self, bucket: str, key: str, data: bytes = b"x") -> str:
        """Store one object; returns its ETag."""
        return str(self.client().put_object(Bucket=bucket, Key=key, Body=data)["ETag"])

    def put_many(self, bucket: str, items: Iterable[tuple[str, bytes]]) -> None:
        s3 = self.client()
        for key, data in items:
            s3.put_object(Bucket=bucket, Key=key, Body=data)

    def put_big(self, bucket: str, key: str, *, part: bytes, parts: int) -> str:
        """A large object made of ``parts`` copies of ``part`` (>= 5 MiB), sent once.

        The part is uploaded once as a seed object, then every part of a multipart upload is an
        UploadPartCopy of it: the server copies in memory, nothing big crosses the socket.
        Returns the sha256 of the whole object.
        """
        s3 = self.client()
        seed = f"{key}.seed"
        s3.put_object(Bucket=bucket, Key=seed, Body=part)
        up = s3.create_multipart_upload(Bucket=bucket, Key=key)
        done = []
        for n in range(1, parts + 1):
            r = s3.upload_part_copy(Bucket=bucket, Key=key, UploadId=up["UploadId"],
                                    PartNumber=n, CopySource={"Bucket": bucket, "Key": seed})
            done.append({"PartNumber": n, "ETag": r["CopyPartResult"]["ETag"]})
        s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"],
                                     MultipartUpload={"Parts": done})
        s3.delete_object(Bucket=bucket, Key=seed)
        h = hashlib.sha256()
        for _ in range(parts):
            h.update(part)
        return h.hexdigest()

    def fault(self, kind: str, *, count: int = 1, match: str = "",
              method: str | None = None) -> None:
        """The next ``count`` requests whose path contains ``match`` fail as ``kind``."""
        self._fault({"kind": kind, "count": count, "match": match, "method": method})

    def clear_faults(self) -> dict[str, int]:
        """Drop pending faults; returns how many of each kind were served so far."""
        return dict(self._fault({"clear": True})["seen"])

    def _fault(self, body: dict[str, Any]) -> dict[str, Any]:
        import requests

        r = requests.post(self.endpoint + "/_fault", json=body, timeout=10)
        r.raise_for_status()
        return dict(r.json())


def _iam_user(iam: Any, name: str, policy: str | None) -> Credentials:
    iam.create_user(UserName=name)
    if policy is not None:
        iam.put_user_policy(UserName=name, PolicyName="all", PolicyDocument=policy)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return Credentials(key["AccessKeyId"], key["SecretAccessKey"])


@dataclass
class _Started:
    proc: subprocess.Popen[str]
    port: int


def _start(timeout: float) -> _Started:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BULK_ENGINE_"))}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve())],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=env,
    )
    assert proc.stdout is not None
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not line or not line[0].strip():
        stop(proc)
        raise RuntimeError(f"moto server did not start within {timeout} s "
                           f"(exit code {proc.poll()})")
    return _Started(proc, int(json.loads(line[0])["port"]))


def stop(proc: subprocess.Popen[str]) -> None:
    """Close the server's stdin (it exits), then make sure it is gone."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(5)
    except (subprocess.TimeoutExpired, OSError):
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@contextmanager
def running_server(start_timeout: float = 60.0) -> Iterator[S3Server]:
    """moto S3 + IAM in a child process with authentication on, stopped on exit.

    Raises whatever stopped it from starting (a missing package, a server that did not come up).
    """
    import boto3
    import requests

    started = _start(timeout=start_timeout)
    endpoint = f"http://127.0.0.1:{started.port}"
    try:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION,
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        admin = _iam_user(iam, "admin", ADMIN_POLICY)
        nobody = _iam_user(iam, "nobody", None)
        # From now on every request is authenticated and authorised like on AWS.
        requests.post(endpoint + "/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
        yield S3Server(endpoint, started.proc, admin, nobody)
    finally:
        stop(started.proc)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The server for the whole session; on CI a server that cannot start fails the tests."""
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(running_server())
        except Exception as exc:
            if os.environ.get("CI") == "true":
                pytest.fail(f"the S3 test server (moto) cannot start on CI: {exc}")
            pytest.skip(f"the S3 test server (moto) cannot start: {exc}; "
                        "pip install -e '.[test]' brings moto[server]")
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch,
           tmp_path_factory: pytest.TempPathFactory) -> S3Server:
    """The admin's credentials and the endpoint in the environment; nothing else from AWS_*."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    empty = tmp_path_factory.mktemp("aws")
    (empty / "config").write_text("")
    (empty / "credentials").write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket."""
    return s3_server.new_bucket()


@dataclass(frozen=True, slots=True)
class BigObject:
    """A bucket holding ``big/huge.bin`` (1 GiB, sha256 ``sha256``) and ``big/small.bin``."""

    bucket: str
    key: str
    size: int
    sha256: str
    small: bytes


@pytest.fixture(scope="session")
def big_object(s3_server: S3Server) -> BigObject:
    """One 1 GiB object, built once per session: one 64 MiB PUT, 16 UploadPartCopy of it and
    a complete (~13 s of the server's CPU, 20-35 s of wall time on 2 shared cores)."""
    import random

    bucket = s3_server.new_bucket()
    part = random.Random(11).randbytes(1 << 20) * 64  # 64 MiB
    sha = s3_server.put_big(bucket, "big/huge.bin", part=part, parts=16)
    small = b"warm-up"
    s3_server.put(bucket, "big/small.bin", small)
    return BigObject(bucket, "big/huge.bin", 1 << 30, sha, small)


if __name__ == "__main__":
    serve()
