"""S3 folders: URL rules, listing rules, the --root walk, streaming, errors and retries.

The rules and the walk are tested on hand-made pages first (no network); everything else runs
against moto's S3 in a child process (``s3server``), with IAM authentication on, so denied
access, unknown keys and wrong secrets are the server's real answers. Faults (503, resets,
bodies cut short) come from the server's fault injector. The 1 GiB test streams in a child
process of its own, so its memory is the client's alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import subprocess
import sys
import traceback
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import anyio.to_thread
import pytest
from aiohttp import web

from bulk_engine.backoff import full_jitter
from bulk_engine.errors import ConfigError, ManifestError
from bulk_engine.models import FileEntry, fingerprint_files
from bulk_engine.s3 import (
    S3Entry,
    S3ObjectPayload,
    S3Options,
    S3Source,
    S3UnavailableError,
    S3Url,
    body_error,
    fingerprint,
    is_s3_url,
    parse_s3_url,
)
from bulk_engine.s3.errors import Fault, classify
from bulk_engine.s3.listing import LeafWalk, ListPage, RawObject, mtime_ns

if TYPE_CHECKING:
    from s3server import BigObject, S3Server

# The server fixtures; a plugin (not an import) so that pytest rewrites its asserts.
pytest_plugins = ("s3server",)

pytestmark = pytest.mark.timeout(60)


class InstantClock:
    """A Clock whose sleeps return at once and are recorded (the retry schedule is asserted)."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self._now = 0.0

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self._now += seconds
        await asyncio.sleep(0)


def source(server: S3Server | None = None, clock: InstantClock | None = None,
           **options: Any) -> S3Source:
    """An S3Source on the environment's endpoint (or ``server``'s), seeded, with a fake clock."""
    endpoint = server.endpoint if server is not None else None
    return S3Source(S3Options(endpoint_url=endpoint, **options), rng=random.Random(7),
                    clock=clock or InstantClock())


# ---------------------------------------------------------------------- URLs


@pytest.mark.parametrize(("text", "bucket", "prefix"), [
    ("s3://archive/cases/2024/", "archive", "cases/2024/"),
    ("s3://archive/cases/2024", "archive", "cases/2024/"),
    ("S3://archive/a b/ü/", "archive", "a b/ü/"),
    ("s3://archive", "archive", ""),
    ("s3://archive/", "archive", ""),
    ("s3://my.bucket-1/x?y#z/", "my.bucket-1", "x?y#z/"),
])
def test_parse_s3_url_normalises_to_a_folder_prefix(text: str, bucket: str, prefix: str) -> None:
    """A folder URL always names a whole folder: the prefix ends in '/' (or is the top)."""
    url = parse_s3_url(text)
    assert (url.bucket, url.prefix) == (bucket, prefix)
    assert str(url) == f"s3://{bucket}/{prefix}"
    assert is_s3_url(text)


@pytest.mark.parametrize(("text", "says"), [
    ("/data/cases", "not an S3 URL"),
    ("s3:///cases/", "no bucket"),
    ("s3://Archive/cases/", "not a valid bucket name"),
    ("s3://ab/cases/", "not a valid bucket name"),
    ("s3://bucket_1/cases/", "not a valid bucket name"),
    ("s3://192.168.1.1/cases/", "not a valid bucket name"),
    ("s3://archive/cases//2024/", "empty segment"),
    ("s3://archive/cases/../2024/", "'..' segment"),
    ("s3://archive/./2024/", "'.' segment"),
    ("s3://archive/a\nb/", "control characters"),
    ("s3://archive/" + "k" * 1100, "above S3's 1024"),
    ("s3://archive/\udcff/", "not valid UTF-8"),
])
def test_parse_s3_url_rejects_bad_urls_with_a_clear_config_error(text: str, says: str) -> None:
    """A bad URL is a ConfigError that says what is wrong."""
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(".", r"\.")):
        parse_s3_url(text)


# ---------------------------------------------------------------------- pure rules


def test_error_classification_table() -> None:
    """Codes decide first; the HTTP status decides for codes the table does not know."""
    assert classify("SlowDown", 503) is Fault.TRANSIENT
    assert classify("InternalError", 500) is Fault.TRANSIENT
    assert classify(None, 502) is Fault.TRANSIENT
    assert classify("Whatever", 429) is Fault.TRANSIENT
    assert classify("NoSuchBucket", 404) is Fault.MISSING
    assert classify("AccessDenied", 403) is Fault.DENIED
    assert classify("InvalidAccessKeyId", 403) is Fault.CREDENTIALS
    assert classify("SignatureDoesNotMatch", 403) is Fault.CREDENTIALS
    assert classify("ExpiredToken", 400) is Fault.CREDENTIALS
    assert classify("PreconditionFailed", 412) is Fault.CHANGED
    assert classify("PermanentRedirect", 301) is Fault.REGION
    assert classify("InvalidArgument", 400) is Fault.OTHER


def test_network_and_tls_exceptions_are_classified() -> None:
    """Connection trouble is transient; an untrusted certificate is configuration."""
    from botocore import exceptions as bx

    from bulk_engine.s3.errors import fault_of

    assert fault_of(bx.EndpointConnectionError(endpoint_url="http://x"))[0] is Fault.TRANSIENT
    assert fault_of(bx.ConnectTimeoutError(endpoint_url="http://x"))[0] is Fault.TRANSIENT
    assert fault_of(bx.ReadTimeoutError(endpoint_url="http://x"))[0] is Fault.TRANSIENT
    assert fault_of(ConnectionResetError())[0] is Fault.TRANSIENT
    assert fault_of(bx.SSLError(endpoint_url="https://x", error="bad"))[0] is Fault.TLS
    assert fault_of(bx.NoCredentialsError())[0] is Fault.CREDENTIALS


def _obj(key: str, size: int = 1) -> RawObject:
    return RawObject(key, size, f'"{hashlib.md5(key.encode()).hexdigest()}"', 1_000)


def test_leaf_walk_yields_leaves_depth_first_while_pages_arrive() -> None:
    """The walk asks for one page at a time and hands out a leaf as soon as it is complete."""
    pages = {
        ("r/", None): ListPage((_obj("r/top.pdf"),), ("r/.hidden/", "r/a/", "r/b/"), "t1"),
        ("r/", "t1"): ListPage((), ("r/c/",), None),
        ("r/a/", None): ListPage((_obj("r/a/"), _obj("r/a/2.pdf"), _obj("r/a/.x")), (), "t2"),
        ("r/a/", "t2"): ListPage((_obj("r/a/1.pdf", 5),), (), None),
        ("r/b/", None): ListPage((), ("r/b/x/",), None),
        ("r/b/x/", None): ListPage((_obj("r/b/x/"),), (), None),
        ("r/c/", None): ListPage((_obj("r/c/big.pdf", 99),), ("r/c/.git/",), None),
    }
    walk = LeafWalk(S3Url("bkt", "r/"), max_file_size=50)
    asked, got = [], []
    while (req := walk.next_request()) is not None:
        got += [(leaf.id, len(asked)) for leaf in walk.take_ready()]
        asked.append((req.prefix, req.token))
        walk.feed(pages[(req.prefix, req.token)])
    leaves = {leaf.id: leaf for leaf in walk.take_ready()}
    got += [(i, len(asked)) for i in leaves]
    assert asked == [("r/", None), ("r/a/", None), ("r/a/", "t2"), ("r/b/", None),
                     ("r/b/x/", None), ("r/", "t1"), ("r/c/", None)]
    # a/ is handed out before b/ is even asked for; the hidden prefix is never listed
    assert got == [("a", 3), ("b/x", 5), ("c", 7)]


def test_leaf_walk_applies_the_folder_rules_to_each_leaf() -> None:
    """Each leaf carries list_folder's answer: sorted entries, or the folder's error."""
    walk = LeafWalk(S3Url("bkt", "r/"), max_file_size=50)
    feed = iter([
        ListPage((), ("r/a/", "r/b/", "r/c/"), None),
        ListPage((_obj("r/a/2.pdf"), _obj("r/a/10.pdf"), _obj("r/a/.x")), (), None),
        ListPage((_obj("r/b/"),), (), None),
        ListPage((_obj("r/c/big.pdf", 99), _obj("r/c/huge.pdf", 98)), (), None),
    ])
    leaves = []
    while (req := walk.next_request()) is not None:
        leaves += walk.take_ready()
        assert req.token is None
        walk.feed(next(feed))
    leaves += walk.take_ready()
    a, b, c = leaves
    assert [e.name for e in a.entries] == ["10.pdf", "2.pdf"] and a.error is None
    assert a.entries[0].url == "s3://bkt/r/a/10.pdf"
    assert b.error is not None and b.error.kind == "folder_empty"
    assert c.error is not None and c.error.kind == "file_too_large"
    assert "'big.pdf'" in c.error.message and "1 more problem" in c.error.message


def test_leaf_walk_of_a_prefix_without_subfolders_is_the_prefix_itself() -> None:
    """Like iter_root on a directory without subdirectories: one row, id '.'."""
    walk = LeafWalk(S3Url("bkt", "r/"))
    assert walk.next_request() is not None
    walk.feed(ListPage((_obj("r/a.pdf"),), (), None))
    assert walk.next_request() is None
    (leaf,) = walk.take_ready()
    assert leaf.id == "." and [e.name for e in leaf.entries] == ["a.pdf"]


def test_leaf_walk_of_an_empty_root_is_a_config_error() -> None:
    """Nothing stored under --root: the run cannot start (as --root on a missing directory)."""
    walk = LeafWalk(S3Url("bkt", "nothing/"))
    walk.next_request()
    walk.feed(ListPage())
    with pytest.raises(ConfigError, match="holds nothing"):
        walk.next_request()


def test_fingerprint_has_the_local_shape_and_follows_every_field() -> None:
    """Same length and alphabet as models.fingerprint_files; name, size, ETag, mtime all count."""
    e = S3Entry(url="s3://b/k/a.pdf", bucket="b", key="k/a.pdf", name="a.pdf", size=3,
                etag='"abc"', mtime_ns=1)
    local = fingerprint_files((FileEntry(Path("/x/a.pdf"), "a.pdf", 3, 1),))
    fp = fingerprint((e,))
    assert len(fp) == len(local) == 32 and int(fp, 16) >= 0
    variants = [
        S3Entry(e.url, e.bucket, e.key, "b.pdf", 3, '"abc"', 1),
        S3Entry(e.url, e.bucket, e.key, "a.pdf", 4, '"abc"', 1),
        S3Entry(e.url, e.bucket, e.key, "a.pdf", 3, '"abd"', 1),
        S3Entry(e.url, e.bucket, e.key, "a.pdf", 3, '"abc"', 2),
    ]
    assert len({fp, *(fingerprint((v,)) for v in variants)}) == 5


def test_mtime_ns_is_exact() -> None:
    """LastModified to integer nanoseconds, without float rounding."""
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert mtime_ns(when) == 1767323045_678901000


# ---------------------------------------------------------------------- listing, on moto


async def test_list_folder_keeps_direct_visible_objects_sorted_by_name(
    s3_env: S3Server, bucket: str
) -> None:
    """Sub-prefixes, hidden names and the folder marker are skipped; entries carry S3 facts."""
    s3_env.put_many(bucket, [
        ("f/", b""), ("f/b.pdf", b"bb"), ("f/a.pdf", b"a"), ("f/.DS_Store", b"x"),
        ("f/sub/", b""), ("f/sub/deep.pdf", b"d"), ("f/Z.json", b"{}"), ("f2/other.pdf", b"o"),
    ])
    async with source() as s3:
        entries = await s3.list_folder(f"s3://{bucket}/f", max_file_size=100)
    assert [e.name for e in entries] == ["Z.json", "a.pdf", "b.pdf"]
    b = entries[2]
    assert (b.url, b.bucket, b.key, b.size) == (f"s3://{bucket}/f/b.pdf", bucket, "f/b.pdf", 2)
    assert b.etag == f'"{hashlib.md5(b"bb").hexdigest()}"'
    assert abs(b.mtime_ns / 1e9 - datetime.now(UTC).timestamp()) < 600


async def test_list_folder_pages_through_the_listing(s3_env: S3Server, bucket: str) -> None:
    """A folder longer than one page (page_size 3 here, 1000 on AWS) is listed whole."""
    names = [f"doc{i:02d}.pdf" for i in range(10)]
    s3_env.put_many(bucket, [(f"p/{n}", n.encode()) for n in names]
                    + [(f"p/sub{i}/x", b"x") for i in range(4)])
    async with source(page_size=3) as s3:
        entries = await s3.list_folder(S3Url(bucket, "p/"), max_file_size=100)
        stats = s3.statistics()
    assert [e.name for e in entries] == names
    assert stats.list_calls == 5  # 14 keys and prefixes, 3 per page


@pytest.mark.parametrize(("keys", "url_prefix", "kind"), [
    ([], "nothing/", "folder_missing"),
    ([("other/a.pdf", b"a")], "oth/", "folder_missing"),  # a prefix of a name is not a folder
    ([("f/sub/a.pdf", b"a")], "f/", "folder_empty"),
    ([("f/.hidden", b"a"), ("f/.dir/a.pdf", b"a")], "f/", "folder_empty"),
    ([("f/", b"")], "f/", "folder_empty"),
    ([("f/a.pdf", b"a"), ("f/big.pdf", b"x" * 11)], "f/", "file_too_large"),
])
async def test_list_folder_errors_are_manifest_errors(
    s3_env: S3Server, bucket: str, keys: list[tuple[str, bytes]], url_prefix: str, kind: str
) -> None:
    """Missing, empty and oversized folders fail their row with the local kinds."""
    s3_env.put_many(bucket, keys)
    async with source() as s3:
        with pytest.raises(ManifestError) as err:
            await s3.list_folder(f"s3://{bucket}/{url_prefix}", max_file_size=10)
    assert err.value.kind == kind
    assert f"s3://{bucket}/" in err.value.message


async def test_missing_bucket_is_folder_missing(s3_env: S3Server) -> None:
    """NoSuchBucket: the row's folder does not exist."""
    async with source() as s3:
        with pytest.raises(ManifestError) as err:
            await s3.list_folder("s3://no-such-bucket-here/f/", max_file_size=10)
    assert err.value.kind == "folder_missing"
    assert "NoSuchBucket" in err.value.message


async def test_access_denied_is_folder_unreadable(
    s3_env: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user without s3:ListBucket gets AccessDenied: the row fails as folder_unreadable."""
    s3_env.put(bucket, "f/a.pdf")
    for k, v in s3_env.env(s3_env.nobody).items():
        monkeypatch.setenv(k, v)
    async with source() as s3:
        with pytest.raises(ManifestError) as err:
            await s3.list_folder(f"s3://{bucket}/f/", max_file_size=10)
    assert err.value.kind == "folder_unreadable"
    assert "AccessDenied" in err.value.message and "environment" in err.value.message


def _all_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc)


@pytest.mark.parametrize(("which", "says"), [
    ("unknown_key", "InvalidAccessKeyId"),
    ("wrong_secret", "SignatureDoesNotMatch"),
])
async def test_bad_credentials_are_config_errors_that_never_show_the_secret(
    s3_env: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch, which: str, says: str
) -> None:
    """Refused credentials stop the run with what to fix; the secret and key id stay out."""
    secret = "s3cr3t-Value-that-must-not-leak"
    key_id = "AKIAUNKNOWN0000000000" if which == "unknown_key" else s3_env.admin.access_key_id
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    async with source() as s3:
        with pytest.raises(ConfigError) as err:
            await s3.list_folder(f"s3://{bucket}/f/", max_file_size=10)
    text = _all_text(err.value)
    assert says in str(err.value)
    assert "AWS_ACCESS_KEY_ID" in str(err.value) and "AWS_ENDPOINT_URL" in str(err.value)
    assert secret not in text and key_id not in text


async def test_no_credentials_is_a_config_error_naming_the_sources(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No credentials anywhere (env, files, profile): entering the source says what to set."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ConfigError, match="no AWS credentials found") as err:
        async with source():
            pass
    assert "AWS_PROFILE" in str(err.value) and "~/.aws/credentials" in str(err.value)


async def test_credentials_from_a_profile_of_the_shared_files(
    s3_env: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The standard chain: AWS_PROFILE picks a profile of the shared credentials file."""
    s3_env.put(bucket, "f/a.pdf")
    creds = tmp_path / "credentials"
    creds.write_text(f"[archive]\naws_access_key_id = {s3_env.admin.access_key_id}\n"
                     f"aws_secret_access_key = {s3_env.admin.secret_access_key}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "archive")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    async with source() as s3:
        entries = await s3.list_folder(f"s3://{bucket}/f/", max_file_size=10)
    assert [e.name for e in entries] == ["a.pdf"]
    # and a wrong secret there is blamed on that file and profile
    creds.write_text(f"[archive]\naws_access_key_id = {s3_env.admin.access_key_id}\n"
                     "aws_secret_access_key = wrong\n")
    async with source() as s3:
        with pytest.raises(ConfigError, match=r"shared credentials file.*'archive'"):
            await s3.list_folder(f"s3://{bucket}/f/", max_file_size=10)


# ---------------------------------------------------------------------- the --root walk


async def test_iter_leaf_prefixes_walks_the_tree_like_iter_root(
    s3_env: S3Server, bucket: str
) -> None:
    """Leaves only, hidden prefixes skipped, relative ids, listings carried, pages followed."""
    s3_env.put_many(bucket, [
        ("root/2024/01/case-a/a.pdf", b"a"), ("root/2024/01/case-a/.x", b"x"),
        ("root/2024/01/case-b/b.pdf", b"b"), ("root/2024/01/case-b/c.pdf", b"c"),
        ("root/2024/notes.txt", b"ignored: 2024 has subfolders"),
        ("root/2024/02/", b""),
        ("root/.trash/old/x.pdf", b"x"),
        ("root/solo/x.pdf", b"x"), ("root/solo/.cache/y", b"y"),
    ])
    async with source(page_size=2) as s3:
        leaves = [leaf async for leaf in s3.iter_leaf_prefixes(f"s3://{bucket}/root/",
                                                                max_file_size=10)]
    assert [leaf.id for leaf in leaves] == ["2024/01/case-a", "2024/01/case-b", "2024/02", "solo"]
    assert [e.name for e in leaves[1].entries] == ["b.pdf", "c.pdf"]
    assert leaves[2].error is not None and leaves[2].error.kind == "folder_empty"
    assert leaves[3].url == S3Url(bucket, "root/solo/")


async def test_iter_leaf_prefixes_yields_the_first_leaf_before_the_listing_ends(
    s3_env: S3Server, bucket: str
) -> None:
    """A prefix of many folders: the first leaf comes after three requests, not the listing."""
    s3_env.put_many(bucket, [(f"many/c{i:03d}/d.pdf", b"d") for i in range(40)])
    async with source(page_size=5) as s3:
        walk = s3.iter_leaf_prefixes(S3Url(bucket, "many/"))
        first = await anext(walk)
        calls_at_first = s3.statistics().list_calls
        rest = [leaf.id async for leaf in walk]
        total = s3.statistics().list_calls
    assert first.id == "c000" and len(rest) == 39
    assert calls_at_first == 2  # the first page of many/, then c000/
    assert total == 8 + 40  # 8 pages of many/, one per folder


async def test_iter_leaf_prefixes_from_a_worker_thread(s3_env: S3Server, bucket: str) -> None:
    """The producer's path: a sync iterator in an anyio worker thread, on the loop's client."""
    s3_env.put_many(bucket, [("t/a/1.pdf", b"1"), ("t/b/2.pdf", b"2")])
    async with source(page_size=1) as s3:
        blocking = s3.blocking()

        def produce() -> list[tuple[str, list[str]]]:
            out = [(leaf.id, [e.name for e in leaf.entries])
                   for leaf in blocking.iter_leaf_prefixes(f"s3://{bucket}/t/")]
            out.append(("list", [e.name for e in blocking.list_folder(
                f"s3://{bucket}/t/b/", max_file_size=10)]))
            return out

        got = await anyio.to_thread.run_sync(produce)
    assert got == [("a", ["1.pdf"]), ("b", ["2.pdf"]), ("list", ["2.pdf"])]


async def test_iter_leaf_prefixes_of_a_missing_root_is_a_config_error(s3_env: S3Server) -> None:
    """--root on a bucket that does not exist stops the run before the first row."""
    async with source() as s3:
        with pytest.raises(ConfigError, match=r"cannot be listed.*NoSuchBucket"):
            async for _ in s3.iter_leaf_prefixes("s3://no-such-bucket-here/"):
                pass


# ---------------------------------------------------------------------- fingerprints


async def test_fingerprint_changes_when_an_object_is_overwritten(
    s3_env: S3Server, bucket: str
) -> None:
    """Same name, same size, new content: the folder's fingerprint changes."""
    s3_env.put_many(bucket, [("f/a.pdf", b"aaaa"), ("f/b.pdf", b"bbbb")])
    async with source() as s3:
        before = fingerprint(await s3.list_folder(f"s3://{bucket}/f/", max_file_size=10))
        again = fingerprint(await s3.list_folder(f"s3://{bucket}/f/", max_file_size=10))
        s3_env.put(bucket, "f/b.pdf", b"BBBB")
        after = fingerprint(await s3.list_folder(f"s3://{bucket}/f/", max_file_size=10))
    assert before == again != after


# ---------------------------------------------------------------------- streaming


class Sink:
    """Collects a multipart body's parts the way the API's server would read them."""

    def __init__(self) -> None:
        self.parts: list[tuple[str | None, str]] = []  # (filename, sha256)
        self.content_length: int | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.content_length = request.content_length
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            assert isinstance(part, aiohttp.BodyPartReader)
            h = hashlib.sha256()
            while chunk := await part.read_chunk(65536):
                h.update(chunk)
            self.parts.append((part.filename, h.hexdigest()))
        return web.json_response({"ok": True})


async def _sink_server(sink: Sink) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/case", sink.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/case"
    finally:
        await runner.cleanup()


def _multipart(s3: S3Source, entries: tuple[S3Entry, ...]) -> aiohttp.MultipartWriter:
    mp = aiohttp.MultipartWriter("form-data")
    for e in entries:
        part = mp.append_payload(s3.payload(e))
        part.set_content_disposition("form-data", name="documents", filename=e.name)
    return mp


async def test_objects_stream_byte_exact_into_a_multipart_upload(
    s3_env: S3Server, bucket: str
) -> None:
    """Every part of the POST equals its object (sha256), sizes around the chunk size too."""
    rnd = random.Random(3)
    sizes = {"empty.pdf": 0, "one.pdf": 1, "chunk.pdf": 4096, "more.pdf": 3 * 4096 + 7,
             "big.pdf": 300_000}
    blobs = {n: rnd.randbytes(s) for n, s in sizes.items()}
    s3_env.put_many(bucket, [(f"f/{n}", b) for n, b in blobs.items()])
    sink = Sink()
    async with source(chunk_size=4096) as s3:
        entries = await s3.list_folder(f"s3://{bucket}/f/", max_file_size=1 << 20)
        async for url in _sink_server(sink):
            async with aiohttp.ClientSession() as http:
                for _ in range(2):  # a second attempt re-reads every object with fresh GETs
                    async with http.post(url, data=_multipart(s3, entries)) as resp:
                        assert resp.status == 200
        stats = s3.statistics()
    want = sorted((n, hashlib.sha256(b).hexdigest()) for n, b in blobs.items())
    assert sink.parts[:5] == want and sink.parts[5:] == want
    assert sink.content_length is not None  # sizes known up front: no chunked encoding
    assert stats.get_calls == 10 and stats.bytes_read == 2 * sum(sizes.values())


async def test_object_overwritten_after_listing_raises_file_changed(
    s3_env: S3Server, bucket: str
) -> None:
    """IfMatch: a changed object is never sent as the listed one, alone or inside a POST."""
    s3_env.put(bucket, "f/a.pdf", b"listed content")
    sink = Sink()
    async with source() as s3:
        (entry,) = await s3.list_folder(f"s3://{bucket}/f/", max_file_size=100)
        s3_env.put(bucket, "f/a.pdf", b"LISTED CONTENT")  # same size, new ETag
        with pytest.raises(ManifestError) as err:
            await s3.read_object(entry)
        assert err.value.kind == "file_changed" and "PreconditionFailed" in err.value.message
        async for url in _sink_server(sink):
            async with aiohttp.ClientSession() as http:
                with pytest.raises(aiohttp.ClientError) as failed:
                    await http.post(url, data=_multipart(s3, (entry,)))
        found = body_error(failed.value)
        assert isinstance(found, ManifestError) and found.kind == "file_changed"
        assert s3.statistics().changed_objects == 2
    assert sink.parts == []  # the server never got a whole body


async def test_object_deleted_after_listing_raises_file_changed(
    s3_env: S3Server, bucket: str
) -> None:
    """A listed object that vanished is file_changed too, not a transient error."""
    s3_env.put(bucket, "f/a.pdf", b"x")
    async with source() as s3:
        (entry,) = await s3.list_folder(f"s3://{bucket}/f/", max_file_size=100)
        s3_env.client().delete_object(Bucket=bucket, Key="f/a.pdf")
        with pytest.raises(ManifestError, match="changed or vanished") as err:
            await s3.read_object(entry)
    assert err.value.kind == "file_changed"


async def test_payload_as_bytes_reads_small_objects_whole(s3_env: S3Server, bucket: str) -> None:
    """The small-folder path: the same bytes, read in one go, checked by ETag."""
    s3_env.put(bucket, "f/a.pdf", b"small")
    async with source() as s3:
        (entry,) = await s3.list_folder(f"s3://{bucket}/f/", max_file_size=100)
        payload = s3.payload(entry)
        assert isinstance(payload, S3ObjectPayload) and payload.size == 5
        assert await payload.as_bytes() == b"small"


# ---------------------------------------------------------------------- transient faults


async def test_503_slowdown_is_retried_with_full_jitter(s3_env: S3Server, bucket: str) -> None:
    """Two 503 SlowDown answers: two retries, delays from full_jitter with the injected rng."""
    s3_env.put(bucket, "f/a.pdf")
    clock = InstantClock()
    async with source(clock=clock, retry_base=0.5, retry_cap=30.0) as s3:
        s3_env.fault("503", count=2, match=bucket)
        entries = await s3.list_folder(f"s3://{bucket}/f/", max_file_size=10)
        stats = s3.statistics()
    assert [e.name for e in entries] == ["a.pdf"]
    rng = random.Random(7)
    assert clock.sleeps == [full_jitter(i, base=0.5, cap=30.0, rng=rng) for i in range(2)]
    assert stats.retries == 2 and stats.list_calls == 3
    assert s3_env.clear_faults()["503"] >= 2


async def test_retries_are_bounded_then_s3_unavailable(s3_env: S3Server, bucket: str) -> None:
    """A store that keeps failing: max_retries retries, then S3UnavailableError (retryable)."""
    clock = InstantClock()
    async with source(clock=clock, max_retries=3) as s3:
        s3_env.fault("503", count=10, match=bucket)
        try:
            with pytest.raises(S3UnavailableError) as err:
                await s3.list_folder(f"s3://{bucket}/f/", max_file_size=10)
        finally:
            s3_env.clear_faults()
    assert len(clock.sleeps) == 3
    assert err.value.kind == "server_error" and err.value.http_status == 503
    assert "SlowDown" in err.value.message


class GatedClock(InstantClock):
    """Sleeps wait until ``gate`` is set (then return at once): a test decides what happens
    while a call is between two attempts."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.sleeping = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.sleeping.set()
        await self.gate.wait()
        await super().sleep(seconds)


async def test_spent_retries_say_whether_the_store_answered_others_meanwhile(
    s3_env: S3Server, bucket: str
) -> None:
    """``isolated``: another call was answered while this one kept failing (one bucket or
    object in trouble); not when none was (an outage). The engine fails a row or stops."""
    good = s3_env.new_bucket()
    s3_env.put(bucket, "f/a.pdf")
    s3_env.put(good, "f/b.pdf")
    try:
        s3_env.fault("503", count=1000, match=f"/{bucket}")
        async with source(max_retries=2) as s3:
            with pytest.raises(S3UnavailableError) as alone:
                await s3.list_folder(f"s3://{bucket}/f/", max_file_size=10)
        clock = GatedClock()
        async with source(clock=clock, max_retries=2) as s3:
            failing = asyncio.ensure_future(
                s3.list_folder(f"s3://{bucket}/f/", max_file_size=10))
            await clock.sleeping.wait()  # its first attempt failed; it waits to retry
            await s3.list_folder(f"s3://{good}/f/", max_file_size=10)  # answered meanwhile
            clock.gate.set()
            with pytest.raises(S3UnavailableError) as others_answered:
                await failing
    finally:
        s3_env.clear_faults()
    assert not alone.value.isolated
    assert others_answered.value.isolated and len(clock.sleeps) == 2


async def test_a_read_sent_before_the_trouble_and_finished_during_it_proves_nothing(
    s3_env: S3Server, bucket: str
) -> None:
    """An object read opened before a call first failed and finished while it retried is no
    sign that the store is up (an outage may have begun after it was sent): the call, its
    retries spent, is not ``isolated``, and the engine stops the run instead of failing a row."""
    good = s3_env.new_bucket()
    s3_env.put(bucket, "f/a.pdf")
    s3_env.put(good, "f/big.pdf", b"y" * 4096)
    clock = GatedClock()
    try:
        async with source(clock=clock, max_retries=2, chunk_size=1024) as s3:
            (entry,) = await s3.list_folder(f"s3://{good}/f/", max_file_size=None)
            stream = s3.iter_object(entry)
            first = await anext(stream)  # the GET was sent and answered its headers
            s3_env.fault("503", count=1000, match=f"/{bucket}")
            failing = asyncio.ensure_future(
                s3.list_folder(f"s3://{bucket}/f/", max_file_size=10))
            await clock.sleeping.wait()  # its first attempt failed; it waits to retry
            rest = b"".join([chunk async for chunk in stream])  # the whole object, meanwhile
            clock.gate.set()
            with pytest.raises(S3UnavailableError) as err:
                await failing
    finally:
        s3_env.clear_faults()
    assert first + rest == b"y" * 4096
    assert not err.value.isolated


async def test_unreachable_endpoint_is_retried_then_unavailable(s3_env: S3Server) -> None:
    """Connection refused: retried like any transient fault, then S3UnavailableError 'network'."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clock = InstantClock()
    s3 = S3Source(S3Options(endpoint_url=f"http://127.0.0.1:{port}", max_retries=2),
                  rng=random.Random(1), clock=clock)
    async with s3:
        with pytest.raises(S3UnavailableError) as err:
            await s3.list_folder("s3://bucket/f/", max_file_size=10)
    assert err.value.kind == "network" and len(clock.sleeps) == 2
    assert f"127.0.0.1:{port}" in err.value.message


async def test_connection_reset_is_retried(s3_env: S3Server, bucket: str) -> None:
    """A connection reset before the answer is transient: retried, then the listing succeeds.

    aiohttp itself re-sends an idempotent request once on a dropped connection (meant for stale
    keep-alive connections, below botocore): two resets in a row reach our policy once.
    """
    s3_env.put(bucket, "f/a.pdf")
    async with source() as s3:
        s3_env.fault("reset", count=2, match=bucket)
        entries = await s3.list_folder(f"s3://{bucket}/f/", max_file_size=10)
        assert s3.statistics().retries == 1
    assert [e.name for e in entries] == ["a.pdf"]
    assert s3_env.clear_faults()["reset"] == 2


async def test_a_body_cut_mid_stream_resumes_with_a_range_request(
    s3_env: S3Server, bucket: str
) -> None:
    """Half the object, then a reset: the read resumes at that offset; the bytes are exact."""
    data = random.Random(5).randbytes(200_000)
    s3_env.put(bucket, "f/a.pdf", data)
    async with source(chunk_size=8192) as s3:
        (entry,) = await s3.list_folder(f"s3://{bucket}/f/", max_file_size=1 << 20)
        s3_env.fault("cut", count=1, match="/f/a.pdf", method="GET")
        got = await s3.read_object(entry)
        stats = s3.statistics()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert stats.retries == 1 and stats.get_calls == 2 and stats.bytes_read == len(data)


# ---------------------------------------------------------------------- 1 GiB, flat memory

_STREAM_CHILD = r"""
import asyncio, hashlib, json, os, sys
from bulk_engine.s3 import S3Options, S3Source

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

class HashingWriter:  # what aiohttp's StreamWriter does with a part: write it out
    def __init__(self):
        self.h, self.n, self.peak = hashlib.sha256(), 0, 0
    async def write(self, chunk):
        self.h.update(chunk)
        self.n += len(chunk)
        if self.n % (16 << 20) < len(chunk):
            self.peak = max(self.peak, rss())

async def main(url):
    async with S3Source(S3Options()) as s3:
        entries = await s3.list_folder(url, max_file_size=1 << 31)
        small = [e for e in entries if e.size < (1 << 20)]
        big = [e for e in entries if e.size >= (1 << 20)]
        await s3.payload(small[0]).write(HashingWriter())  # warm up: pool, buffers, imports
        base = rss()
        w = HashingWriter()
        await s3.payload(big[0]).write(w)
    print(json.dumps({"sha256": w.h.hexdigest(), "bytes": w.n, "base": base, "peak": w.peak}))

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_one_gib_object_streams_with_flat_memory(s3_env: S3Server, big_object: BigObject) -> None:
    """1 GiB through the payload in a child process: exact bytes, RSS growth under 30 MB.

    Cost on this 2-core machine: building the object in moto (one 64 MiB PUT, 16
    UploadPartCopy of it, complete) takes ~13 s of the server's CPU, 20-35 s of wall time
    depending on the load (once per session: the ``big_object`` fixture, shared with the
    engine's 1 GiB test); streaming and hashing it ~3 s of the child's CPU, 5-9 s of wall.
    Measured growth: under 1 MB (RSS sampled every 16 MiB against the warmed-up base).
    """
    bucket, want = big_object.bucket, big_object.sha256
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", _STREAM_CHILD, f"s3://{bucket}/big/"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["bytes"] == 1 << 30 and out["sha256"] == want
    growth = out["peak"] - out["base"]
    assert growth < 30_000_000, f"client RSS grew by {growth / 1e6:.1f} MB while streaming"
