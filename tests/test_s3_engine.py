"""Folders in buckets end to end: moto's S3 (its own process, IAM on) → the engine → the emulator.

Every test runs the real engine against the in-process emulator and checks both ends: the lines
(one per row, each result the one computed from the bytes put in the bucket:
``conftest.expected_for_contents``) and what the emulator received (each part's sha256). Rows
name folders as ``s3://bucket/prefix/`` in a manifest, or come from a ``--root s3://`` walk.
Faults are the S3 server's own (a user without rights, a missing bucket, overwritten objects)
or its fault injector (503 SlowDown). Crashes are real: ``python -m bulk_engine`` killed with
SIGKILL. The pure rules (the leaf count against the walk, store identities, how an S3 failure
maps to a row or a stop) are tested first, without a network.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import signal
import subprocess
import sys
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import pytest

from bulk_engine.client import multipart_filename
from bulk_engine.config import load_settings
from bulk_engine.emulator import Emulator, EmulatorConfig, content_digest, run_emulator
from bulk_engine.emulator.verdict import expected_result
from bulk_engine.engine import Engine
from bulk_engine.errors import ConfigError, ManifestError, StoreUnavailableError
from bulk_engine.plan import make_plan
from bulk_engine.progress import BucketRowCounter, RowCounter
from bulk_engine.report import read_results, write_failed_manifest
from bulk_engine.s3 import S3Url
from bulk_engine.s3.access import bind_store, check_store, engine_error, store_identity
from bulk_engine.s3.errors import S3UnavailableError
from bulk_engine.s3.listing import LeafCounter, LeafWalk, ListPage, RawObject

from conftest import API_KEY, engine_settings, expected_for_contents, read_lines
from procs import child_env, count_lines, journal_snapshot, wait_for
from test_resume import run_until

if TYPE_CHECKING:
    from s3server import S3Server

# The server fixtures; a plugin (not an import) so that pytest rewrites its asserts.
pytest_plugins = ("s3server",)

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[1]
FAST = dict(processing_time=(0.01, 0.05), max_parallel_analyses=50, seed=1)


# ---------------------------------------------------------------------- helpers


def put_folders(server: S3Server, bucket: str, folders: dict[str, dict[str, bytes]]) -> None:
    """Store each folder's files under its prefix (``prefix/name``), four PUTs at a time."""
    s3 = server.client()  # boto3 clients are thread-safe
    items = [(f"{prefix.rstrip('/')}/{name}", data)
             for prefix, files in folders.items() for name, data in files.items()]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), items))


def write_manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "folder"])
        w.writerows(rows)
    return path


def sample_folders(n: int, *, seed: int, prefix: str = "cases") -> dict[str, dict[str, bytes]]:
    """``n`` folders of one to three small documents, deterministic."""
    rnd = random.Random(seed)
    return {
        f"{prefix}/c{i:03d}": {f"doc{j}.pdf": rnd.randbytes(rnd.randint(10, 3000))
                               for j in range(rnd.randint(1, 3))}
        for i in range(n)
    }


def by_id(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    ids = Counter(r["id"] for r in lines)
    assert max(ids.values(), default=1) == 1, [i for i, n in ids.items() if n > 1]
    return {r["id"]: r for r in lines}


def received(emu: Emulator) -> dict[str, list[tuple[str, str, int]]]:
    """Each run's parts as the emulator read them: digest → [(filename, sha256, size)]."""
    return {s["digest"]: sorted((f["name"], f["sha256"], f["size"]) for f in s["files"])
            for s in emu.state.submissions_json()}


def parts_of(files: dict[str, bytes]) -> list[tuple[str, str, int]]:
    return sorted((multipart_filename(n), hashlib.sha256(b).hexdigest(), len(b))
                  for n, b in files.items() if not n.startswith("."))


def config(**kw: Any) -> EmulatorConfig:
    return EmulatorConfig(api_keys=(API_KEY,), **{**FAST, **kw})


# ---------------------------------------------------------------------- pure rules


def _delimiter_pages(keys: list[str], size: int) -> dict[tuple[str, str | None], ListPage]:
    """What ListObjectsV2 with delimiter '/' answers for every prefix of ``keys``, paged."""
    pages: dict[tuple[str, str | None], ListPage] = {}
    prefixes = {""} | {k[: i + 1] for k in keys for i, c in enumerate(k) if c == "/"}
    for prefix in prefixes:
        items: list[tuple[str, str]] = []  # (sort key, "o"/"p")
        seen_prefixes: set[str] = set()
        for k in sorted(keys):
            if not k.startswith(prefix):
                continue
            rest = k[len(prefix):]
            if "/" in rest:
                sub = prefix + rest.split("/", 1)[0] + "/"
                if sub not in seen_prefixes:
                    seen_prefixes.add(sub)
                    items.append((sub, "p"))
            else:
                items.append((k, "o"))
        chunks = [items[i:i + size] for i in range(0, len(items), size)] or [[]]
        for n, chunk in enumerate(chunks):
            token = None if n == 0 else f"t{n}"
            nxt = f"t{n + 1}" if n + 1 < len(chunks) else None
            pages[(prefix, token)] = ListPage(
                tuple(RawObject(k, 1, '"e"', 1) for k, t in chunk if t == "o"),
                tuple(k for k, t in chunk if t == "p"), nxt)
    return pages


@pytest.mark.parametrize("seed", range(25))
def test_leaf_count_from_the_flat_listing_is_the_walks(seed: int) -> None:
    """The panel's total for --root s3:// (flat listing, ~1 request per 1000 keys) equals the
    rows the walk yields (a request per folder): hidden names, markers, '//' and names that
    sort below '/' included."""
    rnd = random.Random(seed)
    segments = ["a", "b", "a-b", "a.b", ".h", "", "c d", "é"]
    keys = set()
    for _ in range(rnd.randint(1, 40)):
        depth = rnd.randint(0, 3)
        path = "/".join(rnd.choice(segments) for _ in range(depth))
        name = rnd.choice(["x.pdf", "y.pdf", ".DS_Store", ""])  # "": a folder marker
        keys.add("r/" + (f"{path}/" if depth else "") + name)
    keys.discard("r/")
    keys_sorted = sorted(keys, key=lambda k: k.encode())
    pages = _delimiter_pages(keys_sorted, size=rnd.randint(1, 4))
    walk = LeafWalk(S3Url("b", "r/"))
    leaves = []
    while (req := walk.next_request()) is not None:
        leaves += walk.take_ready()
        walk.feed(pages[(req.prefix, req.token)])
    leaves += walk.take_ready()
    counter = LeafCounter(S3Url("b", "r/"))
    for i in range(0, len(keys_sorted), 3):
        counter.feed(keys_sorted[i:i + 3])
    assert counter.finish() == len(leaves), (keys_sorted, [leaf.id for leaf in leaves])


def test_leaf_count_of_an_empty_root_is_a_config_error() -> None:
    """As for the walk: nothing under --root is an error, not zero rows."""
    with pytest.raises(ConfigError, match="holds nothing"):
        LeafCounter(S3Url("b", "r/")).finish()


def test_store_identity_names_the_store_not_the_region_nor_a_password() -> None:
    """Every AWS endpoint is one store (bucket names are global); others are scheme://host:port,
    never with a user or password of the URL."""
    assert store_identity(None) == "aws"
    assert store_identity("https://s3.eu-west-3.amazonaws.com") == "aws"
    assert store_identity("https://s3.amazonaws.com") == "aws"
    assert store_identity("http://user:secret@MinIO.local:9000/") == "http://minio.local:9000"
    assert "secret" not in store_identity("https://u:secret@ceph.example")


def test_a_journal_is_bound_to_the_first_store_it_reads() -> None:
    """The same s3:// URL on another endpoint is other objects: a resume there is refused."""
    meta: dict[str, str] = {}

    class Meta:
        def get_meta(self, key: str) -> str | None:
            return meta.get(key)

        def set_meta(self, key: str, value: str) -> None:
            meta[key] = value

    bind = bind_store(Meta())
    bind("http://127.0.0.1:9000")
    bind("http://127.0.0.1:9000")
    with pytest.raises(ConfigError, match=r"read from the S3 store http://127\.0\.0\.1:9000"):
        bind("aws")
    check_store(None)("aws")  # a dry run of a new output: anything goes
    with pytest.raises(ConfigError, match="another --output"):
        check_store("aws")("http://127.0.0.1:9000")


def test_an_s3_failure_fails_its_row_alone_or_stops_the_run() -> None:
    """Retries spent while the store answered others: the row fails (a rerun retries it);
    while it answered nothing: the run stops; a walk that cannot list stops in both cases."""
    alone = S3UnavailableError("S3 kept failing for s3://b/k (SlowDown, HTTP 503)",
                               http_status=503, kind="server_error")
    alone.isolated = True
    down = S3UnavailableError("S3 kept failing for s3://b/k (SlowDown, HTTP 503)",
                              http_status=503, kind="server_error")
    row = engine_error(alone)
    assert isinstance(row, ManifestError) and row.kind == "server_error"
    assert "plain rerun retries it" in row.message
    assert isinstance(engine_error(down), StoreUnavailableError)
    assert "rows in flight are saved" in str(engine_error(down))
    assert isinstance(engine_error(alone, walk=True), StoreUnavailableError)
    missing = ManifestError("folder_missing", "x")
    assert engine_error(missing) is missing


def test_settings_take_an_s3_root_literally_and_check_the_endpoint() -> None:
    """--root s3://... stays a URL ('//' not folded by Path), a bad one names the setting;
    --s3-endpoint-url must be http(s) and its message never shows a password."""
    s = load_settings(cli={"root": "s3://archive/2024/cases", "s3_endpoint_url":
                           "http://127.0.0.1:9000"}, environ={})
    assert s.root == S3Url("archive", "2024/cases/") and s.s3_endpoint_url
    env = load_settings(environ={"BULK_ENGINE_ROOT": "s3://archive/"})
    assert env.root == S3Url("archive", "")
    with pytest.raises(ConfigError, match=r"setting root: .*empty segment.*--root"):
        load_settings(cli={"root": "s3://archive//x/"}, environ={})
    with pytest.raises(ConfigError, match="s3_endpoint_url must be an http") as err:
        load_settings(cli={"s3_endpoint_url": "ftp://u:pw@host"}, environ={})
    assert "pw" not in str(err.value)
    assert isinstance(load_settings(cli={"root": "/data/x"}, environ={}).root, Path)


def test_the_panel_counts_a_manifest_of_bucket_rows_without_any_s3_request(
    tmp_path: Path,
) -> None:
    """A manifest's rows are counted from the file: no S3 access is even set up (a malformed
    URL is a row too, as it will be a failed line)."""
    manifest = write_manifest(tmp_path / "m.csv", [
        ("a", "s3://bucket-a/x/"), ("b", "s3://bucket-b/y"), ("bad", "s3://B/x/"),
        ("local", "folders/c")])
    counter = RowCounter.for_source(manifest, None)
    assert isinstance(counter, RowCounter)
    counter.step()
    assert counter.total == 4


def test_failed_manifest_keeps_bucket_folders_as_they_are(tmp_path: Path) -> None:
    """`report --failed-manifest`: an s3:// folder is absolute, never joined to a directory."""
    out = tmp_path / "out.jsonl"
    line = {"id": "a", "folder": "s3://b/cases/a/", "status": "failed", "result": None,
            "error": {"kind": "file_changed", "message": "m", "http_status": None},
            "path": None}
    out.write_text(json.dumps(line) + "\n")
    write_failed_manifest(read_results(out), tmp_path / "failed.csv")
    assert (tmp_path / "failed.csv").read_text().splitlines()[1] == "a,s3://b/cases/a/"


# ---------------------------------------------------------------------- end to end, on moto


async def test_bucket_rows_upload_byte_exact_beside_local_ones(
    s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    """s3:// rows, small (read whole) and large (streamed, several objects), next to a local
    row: every part the emulator read is the object's bytes, every result its folder's own."""
    rnd = random.Random(1)
    folders = {
        "cases/small": {"a.pdf": rnd.randbytes(1000), "form.json": b'{"k": 1}',
                        ".DS_Store": b"x", "sub/deep.pdf": b"not part of the folder"},
        "cases/large": {"big1.bin": rnd.randbytes(200_000), "big2.bin": rnd.randbytes(150_001),
                        "empty.pdf": b""},
        "cases/uni é": {"relevé de compte.pdf": rnd.randbytes(5000)},
    }
    put_folders(s3_env, bucket, folders)
    s3_env.put(bucket, "cases/small/", b"")  # a console's folder marker: skipped
    local = tmp_path / "local" / "case"
    local.mkdir(parents=True)
    (local / "payslip.pdf").write_bytes(b"%PDF local")
    manifest = write_manifest(tmp_path / "m.csv", [
        ("small", f"s3://{bucket}/cases/small"), ("large", f"s3://{bucket}/cases/large/"),
        ("uni", f"s3://{bucket}/cases/uni é/"), ("local", "local/case"),
    ])
    out = tmp_path / "out.jsonl"
    async with run_emulator(config()) as emu:
        result = await Engine(engine_settings(emu.base_url, out, concurrency=3), manifest).run()
        got = received(emu)
        stats = emu.stats()
    assert result.exit_code == 0, result.summary.to_json()
    lines = by_id(read_lines(out))
    del folders["cases/small"]["sub/deep.pdf"]
    contents = {"small": folders["cases/small"], "large": folders["cases/large"],
                "uni": folders["cases/uni é"], "local": {"payslip.pdf": b"%PDF local"}}
    for row_id, files in contents.items():
        rec = lines[row_id]
        assert rec["status"] == "completed" and rec["result"] == expected_for_contents(files)
        assert parts_of(files) in got.values(), row_id
    assert lines["large"]["path"] == f"s3://{bucket}/cases/large/"
    assert lines["large"]["bytes"] == 350_001 and lines["large"]["files"] == 3
    assert stats["bytes_received"] == sum(len(b) for f in contents.values()
                                          for n, b in f.items() if not n.startswith("."))
    summary = result.summary.to_json()
    assert summary["s3_get_calls"] == 6 and summary["s3_changed_objects"] == 0
    assert summary["s3_bytes_read"] == 1000 + 8 + 350_001 + 5000


async def test_every_upload_attempt_reads_the_objects_again(
    s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    """The API resets uploads (the emulator's reset-before-body fault): each retry of the POST
    streams the folder from fresh GETs, and the run that finally lands has the exact bytes."""
    rnd = random.Random(13)
    files = {"a.bin": rnd.randbytes(200_000), "b.bin": rnd.randbytes(100_000)}
    put_folders(s3_env, bucket, {"cases/big": files})
    manifest = write_manifest(tmp_path / "m.csv", [("big", f"s3://{bucket}/cases/big/")])
    out = tmp_path / "out.jsonl"
    async with run_emulator(config(reset_before_body_rate=0.6, seed=3)) as emu:
        result = await Engine(engine_settings(emu.base_url, out), manifest).run()
        got = received(emu)
    summary = result.summary.to_json()
    assert result.exit_code == 0
    assert summary["submits"] >= 2 and summary["s3_get_calls"] > len(files)
    assert list(got.values()) == [parts_of(files)]
    assert read_lines(out)[0]["result"] == expected_for_contents(files)


async def test_root_s3_every_leaf_prefix_is_a_row_and_dry_run_and_count_only_list(
    s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    """--root s3://bucket/archive/: leaf prefixes are rows (ids relative, hidden prefixes and
    non-leaf objects skipped, an empty leaf failed); the panel's count and --dry-run agree with
    the run and read no object; the run uploads each leaf byte-exact."""
    folders = sample_folders(5, seed=2, prefix="archive/2024")
    folders["archive/solo"] = {"x.pdf": b"solo"}
    folders["archive/.trash/old"] = {"x.pdf": b"hidden"}
    put_folders(s3_env, bucket, folders)
    s3_env.put(bucket, "archive/2024/notes.txt", b"2024 has sub-folders: not a row")
    s3_env.put(bucket, "archive/empty/", b"")  # a leaf with nothing to send
    root = S3Url(bucket, "archive/")
    out = tmp_path / "out.jsonl"
    settings = engine_settings("http://127.0.0.1:9", out, root=root, dry_run=True)

    counter = RowCounter.for_source(None, root, settings)
    assert isinstance(counter, BucketRowCounter)
    assert await counter.count_all() == 7
    plan = await anyio.to_thread.run_sync(make_plan, settings, None)
    assert (plan.rows_read, plan.rows_to_submit, plan.rows_rejected) == (7, 6, 1)
    assert plan.rejected_by_kind == {"folder_empty": 1}
    assert plan.bytes == sum(len(b) for k, f in folders.items() if ".trash" not in k
                             for b in f.values())
    assert plan.to_json()["s3_get_calls"] == 0 and plan.to_json()["s3_list_calls"] >= 8

    async with run_emulator(config()) as emu:
        result = await Engine(settings.replace(base_url=emu.base_url, dry_run=False), None).run()
    assert result.exit_code == 2
    lines = by_id(read_lines(out))
    assert sorted(lines) == sorted([*(k.removeprefix("archive/") for k in folders
                                      if ".trash" not in k), "empty"])
    assert lines["empty"]["error"]["kind"] == "folder_empty"
    for key, files in folders.items():
        if ".trash" not in key:
            rec = lines[key.removeprefix("archive/")]
            assert rec["folder"] == f"s3://{bucket}/{key}/"
            assert rec["result"] == expected_for_contents(files)


async def test_a_large_prefix_starts_uploading_before_its_walk_ends(
    s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    """--root s3:// over many folders: the first upload goes out while most of the tree is
    still unlisted (rows stream from the walk; a thread hop ends after 50 ms of listing)."""
    folders = sample_folders(40, seed=10, prefix="many")
    put_folders(s3_env, bucket, folders)
    out = tmp_path / "out.jsonl"
    at_first_upload: list[int] = []
    async with run_emulator(config()) as emu:
        engine = Engine(engine_settings(emu.base_url, out, root=S3Url(bucket, "many/"),
                                        concurrency=2), None)

        async def watch() -> None:
            with anyio.fail_after(30):
                while engine.s3 is None or engine.counters.submitted == 0:
                    await anyio.sleep(0.001)
            stats = engine.s3.statistics()
            at_first_upload.append(stats.list_calls if stats else 0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            result = await engine.run()
    total = result.summary.to_json()["s3_list_calls"]
    assert result.exit_code == 0 and len(read_lines(out)) == 40
    assert total >= 41 and at_first_upload[0] < total / 2, (at_first_upload, total)


@pytest.fixture(scope="module")
def limited(s3_server: S3Server) -> Any:
    """A user allowed every S3 action on buckets named ``t-open-*`` only."""
    import boto3

    from s3server import REGION, _iam_user

    iam = boto3.client("iam", endpoint_url=s3_server.endpoint, region_name=REGION,
                       aws_access_key_id=s3_server.admin.access_key_id,
                       aws_secret_access_key=s3_server.admin.secret_access_key)
    policy = json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "s3:*",
        "Resource": ["arn:aws:s3:::t-open-*", "arn:aws:s3:::t-open-*/*"]}]})
    return _iam_user(iam, f"limited-{uuid.uuid4().hex[:8]}", policy)


async def test_bucket_failures_are_failed_lines_of_their_kind(
    s3_env: S3Server, bucket: str, limited: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Denied bucket → folder_unreadable; no such bucket or nothing under the prefix →
    folder_missing; a malformed URL → bad_row; the readable row completes; exit 2."""
    open_bucket = f"t-open-{uuid.uuid4().hex[:12]}"
    s3_env.client().create_bucket(Bucket=open_bucket)
    put_folders(s3_env, open_bucket, {"ok": {"a.pdf": b"fine"}})
    put_folders(s3_env, bucket, {"secret": {"a.pdf": b"not for this user"}})
    for k, v in s3_env.env(limited).items():
        monkeypatch.setenv(k, v)
    manifest = write_manifest(tmp_path / "m.csv", [
        ("ok", f"s3://{open_bucket}/ok/"),
        ("denied", f"s3://{bucket}/secret/"),
        ("no-bucket", f"s3://t-open-{uuid.uuid4().hex[:12]}/x/"),
        ("no-prefix", f"s3://{open_bucket}/nothing-here/"),
        ("bad-url", "s3://Not_A_Bucket/x/"),
        ("bad-segment", f"s3://{open_bucket}/a//b/"),
    ])
    out = tmp_path / "out.jsonl"
    async with run_emulator(config()) as emu:
        result = await Engine(engine_settings(emu.base_url, out), manifest).run()
        stats = emu.stats()
    assert result.exit_code == 2
    lines = by_id(read_lines(out))
    kinds = {i: (r["error"] or {}).get("kind") for i, r in lines.items()}
    assert kinds == {"ok": None, "denied": "folder_unreadable", "no-bucket": "folder_missing",
                     "no-prefix": "folder_missing", "bad-url": "bad_row",
                     "bad-segment": "bad_row"}
    assert "AccessDenied" in lines["denied"]["error"]["message"]
    assert "s3:ListBucket" in lines["denied"]["error"]["message"]
    assert "NoSuchBucket" in lines["no-bucket"]["error"]["message"]
    assert "not a valid bucket name" in lines["bad-url"]["error"]["message"]
    assert lines["ok"]["result"] == expected_for_contents({"a.pdf": b"fine"})
    assert stats["submissions"] == 1
    assert limited.secret_access_key not in out.read_text()


async def test_object_changed_after_listing_fails_file_changed_and_is_never_sent(
    s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    """An object overwritten between listing and upload (a streamed folder, held back by the
    rate limit meanwhile): its row fails file_changed, no run is created from either content,
    and --retry-failed then sends the folder as it is now."""
    rnd = random.Random(4)
    listed = {"b.bin": rnd.randbytes(300_000), "c.pdf": b"c"}
    now = {"b.bin": rnd.randbytes(300_000), "c.pdf": b"c"}  # same size, other bytes
    put_folders(s3_env, bucket, {"cases/a": {"a.pdf": b"a"}, "cases/big": listed})
    manifest = write_manifest(tmp_path / "m.csv", [("a", f"s3://{bucket}/cases/a/"),
                                                   ("big", f"s3://{bucket}/cases/big/")])
    out = tmp_path / "out.jsonl"
    async with run_emulator(config()) as emu:
        # One call a second: "big" waits for its rate token after it was listed.
        engine = Engine(engine_settings(emu.base_url, out, rate_limit=1.0, burst=1,
                                        concurrency=1), manifest)

        async def overwrite_once_listed() -> None:
            with anyio.fail_after(20):
                while engine.statistics().producer.rows_accepted < 2:
                    await anyio.sleep(0.002)
            await anyio.to_thread.run_sync(s3_env.put, bucket, "cases/big/b.bin", now["b.bin"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(overwrite_once_listed)
            first = await engine.run()
        got = received(emu)
        lines = by_id(read_lines(out))
        assert first.exit_code == 2
        assert lines["big"]["error"]["kind"] == "file_changed"
        assert "PreconditionFailed" in lines["big"]["error"]["message"]
        assert parts_of(listed) not in got.values() and parts_of(now) not in got.values()
        assert first.summary.to_json()["s3_changed_objects"] == 1
        again = await Engine(engine_settings(emu.base_url, out, retry_failed=True),
                             manifest).run()
    assert again.exit_code == 0
    lines = by_id(read_lines(out))
    assert lines["big"]["result"] == expected_for_contents(now)
    assert lines["a"]["result"] == expected_for_contents({"a.pdf": b"a"})


async def test_object_changed_between_runs_is_resubmitted_never_paired_with_the_old_result(
    s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    """A run stopped with every token live; one object is overwritten (same size); the rerun
    re-lists through S3, polls the unchanged rows' tokens and resubmits the changed folder
    under a new key: its line holds the new content's result and run."""
    folders = sample_folders(4, seed=5)
    put_folders(s3_env, bucket, folders)
    manifest = write_manifest(tmp_path / "m.csv", [
        (k.split("/")[-1], f"s3://{bucket}/{k}/") for k in folders])
    out = tmp_path / "out.jsonl"
    async with run_emulator(config()) as emu:
        first = Engine(engine_settings(emu.base_url, out, poll_min=20, poll_max=30), manifest)
        r1 = await run_until(first, lambda: first.counters.submitted == 4)
        assert r1.exit_code == 130
        changed = dict(folders["cases/c002"])
        name = sorted(changed)[0]
        changed[name] = bytes(b ^ 0xFF for b in changed[name])
        s3_env.put(bucket, f"cases/c002/{name}", changed[name])
        second = await Engine(engine_settings(emu.base_url, out), manifest).run()
        subs = emu.state.submissions_json()
    assert second.exit_code == 0
    assert second.summary.to_json()["rows_resumed"] == 4
    lines = by_id(read_lines(out))
    for key, files in folders.items():
        rec = lines[key.split("/")[-1]]
        want = changed if key == "cases/c002" else files
        assert rec["result"] == expected_for_contents(want), key
        assert rec["attempts"] == (2 if key == "cases/c002" else 1)
    sent = Counter(json.dumps(sorted((f["name"], f["sha256"], f["size"]) for f in s["files"]))
                   for s in subs)
    assert len(subs) == 5  # four in the first run, the changed folder again in the second
    assert sent[json.dumps(parts_of(changed))] == 1
    assert sent[json.dumps(parts_of(folders["cases/c002"]))] == 1


async def test_an_s3_outage_stops_the_run_with_rows_unfailed_and_the_rerun_finishes(
    s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    """S3 starts answering 503 to everything mid-run: once a read spends its retries with no
    other S3 call answered meanwhile, the run stops (exit 1) instead of failing rows; no line
    is written for it, live tokens stay journaled, and the rerun completes every row once."""
    folders = sample_folders(10, seed=6)
    put_folders(s3_env, bucket, folders)
    manifest = write_manifest(tmp_path / "m.csv", [
        (k.split("/")[-1], f"s3://{bucket}/{k}/") for k in folders])
    out = tmp_path / "out.jsonl"
    async with run_emulator(config()) as emu:
        # Long polls: nothing finishes in the first run; tokens stay live.
        engine = Engine(engine_settings(emu.base_url, out, poll_min=20, poll_max=30,
                                        concurrency=2, rate_limit=20.0, burst=1), manifest)

        async def outage() -> None:
            with anyio.fail_after(20):
                while engine.counters.submitted < 3:
                    await anyio.sleep(0.002)
            await anyio.to_thread.run_sync(
                lambda: s3_env.fault("503", count=100_000, match=f"/{bucket}"))

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(outage)
                first = await engine.run()
        finally:
            s3_env.clear_faults()
        assert first.exit_code == 1
        assert isinstance(first.error, StoreUnavailableError)
        assert "S3 is unavailable" in str(first.error) and "SlowDown" in str(first.error)
        assert not out.exists() or read_lines(out) == []
        journal = journal_snapshot(out.with_name("out.jsonl.journal"), tmp_path / "copy")
        assert journal["counts"].get("submitted", 0) >= 3
        assert journal["counts"].get("submitting", 0) == 0  # reads failed before any POST
        second = await Engine(engine_settings(emu.base_url, out), manifest).run()
        stats = emu.stats()
    assert second.exit_code == 0
    assert second.summary.to_json()["rows_resumed"] >= 3
    lines = by_id(read_lines(out))
    assert len(lines) == 10 and all(r["status"] == "completed" for r in lines.values())
    for key, files in folders.items():
        assert lines[key.split("/")[-1]]["result"] == expected_for_contents(files)
    assert stats["submissions"] == 10 and stats["duplicate_submissions"] == 0


async def test_one_object_failing_alone_fails_its_row_and_a_plain_rerun_retries_it(
    s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    """One object keeps answering 503 while the store serves the others: only its row fails,
    with a transport kind (not final), the run goes on; a plain rerun retries that row."""
    folders = sample_folders(16, seed=7)
    put_folders(s3_env, bucket, folders)
    manifest = write_manifest(tmp_path / "m.csv", [
        (k.split("/")[-1], f"s3://{bucket}/{k}/") for k in folders])
    out = tmp_path / "out.jsonl"
    s3_env.fault("503", count=100_000, match=f"/{bucket}/cases/c000/", method="GET")
    try:
        async with run_emulator(config()) as emu:
            first = await Engine(engine_settings(emu.base_url, out, concurrency=4,
                                                 retry_base=0.05, retry_cap=0.2),
                                 manifest).run()
    finally:
        s3_env.clear_faults()
    assert first.exit_code == 2, first.error
    lines = by_id(read_lines(out))
    assert [i for i, r in lines.items() if r["status"] == "failed"] == ["c000"]
    error = lines["c000"]["error"]
    assert error["kind"] == "server_error" and "a plain rerun retries it" in error["message"]
    async with run_emulator(config()) as emu:
        second = await Engine(engine_settings(emu.base_url, out), manifest).run()
    assert second.exit_code == 0
    lines = by_id(read_lines(out))
    assert len(lines) == 16
    assert lines["c000"]["result"] == expected_for_contents(folders["cases/c000"])


# ---------------------------------------------------------------------- processes


def _cli(manifest: Path, out: Path, base_url: str, *extra: str, env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "bulk_engine", str(manifest), "--output", str(out),
           "--base-url", base_url, "--no-progress", "--log-format", "json", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                          env=env or child_env(BULK_ENGINE_API_KEY=API_KEY))


async def test_resume_after_kill_9_relists_through_s3_and_writes_each_row_once(
    s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    """`python -m bulk_engine` on bucket rows, SIGKILLed mid-run, then the same command again:
    live tokens are re-listed through S3 and polled; every row has exactly one line, each with
    its own folder's result."""
    folders = sample_folders(40, seed=8)
    put_folders(s3_env, bucket, folders)
    manifest = write_manifest(tmp_path / "m.csv", [
        (k.split("/")[-1], f"s3://{bucket}/{k}/") for k in folders])
    out = tmp_path / "out.jsonl"
    args = ("--poll-min", "0.05", "--poll-max", "0.5", "--rate-limit", "300",
            "--concurrency", "4", "--max-outstanding", "8", "--seed", "1")
    async with run_emulator(config(processing_time=(0.1, 0.5))) as emu:
        cmd = [sys.executable, "-m", "bulk_engine", str(manifest), "--output", str(out),
               "--base-url", emu.base_url, "--no-progress", "--log-level", "warning", *args]
        async with await anyio.open_process(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=child_env(BULK_ENGINE_API_KEY=API_KEY)) as proc:
            try:
                await anyio.to_thread.run_sync(lambda: wait_for(
                    lambda: count_lines(out) >= 10 or proc.returncode is not None, timeout=60,
                    what="10 output lines"))
                assert proc.returncode is None, "the run ended before the kill"
            finally:
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
        killed = journal_snapshot(out.with_name("out.jsonl.journal"), tmp_path / "copy")
        assert killed["counts"].get("submitted", 0) >= 1  # live tokens for the rerun
        stats_json = tmp_path / "stats.json"
        rerun = await anyio.to_thread.run_sync(lambda: _cli(
            manifest, out, emu.base_url, *args, "--stats-json", str(stats_json)))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(stats_json.read_text())["rows_resumed"] >= 1
    data = out.read_bytes()
    assert data.endswith(b"\n")
    lines = by_id([json.loads(x) for x in data.splitlines()])
    assert len(lines) == 40
    for key, files in folders.items():
        rec = lines[key.split("/")[-1]]
        assert rec["status"] == "completed" and rec["result"] == expected_for_contents(files)


@pytest.mark.parametrize("which", ["wrong_secret", "unknown_key", "none"])
def test_bad_credentials_stop_the_run_early_with_exit_1_and_never_show_the_secret(
    s3_env: S3Server, bucket: str, tmp_path: Path, which: str
) -> None:
    """Refused or missing credentials: exit 1 before any row is written, a message naming what
    to fix, and neither the secret nor the key id anywhere (stdout, stderr, debug logs, output)."""
    put_folders(s3_env, bucket, {"f": {"a.pdf": b"a"}})
    manifest = write_manifest(tmp_path / "m.csv", [("f", f"s3://{bucket}/f/")])
    secret = "Secret-Value-9f8e7d-must-not-leak"
    key_id = "AKIAUNKNOWN1234567890" if which == "unknown_key" else s3_env.admin.access_key_id
    env = child_env(BULK_ENGINE_API_KEY=API_KEY, AWS_ACCESS_KEY_ID=key_id,
                    AWS_SECRET_ACCESS_KEY=secret)
    if which == "none":
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    out = tmp_path / "out.jsonl"
    log = tmp_path / "run.log"
    proc = _cli(manifest, out, "http://127.0.0.1:9", "--log-level", "debug", "--log-file",
                str(log), env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    says = {"wrong_secret": "SignatureDoesNotMatch", "unknown_key": "InvalidAccessKeyId",
            "none": "no AWS credentials found"}[which]
    assert says in proc.stderr and "AWS_ACCESS_KEY_ID" in proc.stderr
    everything = proc.stdout + proc.stderr + log.read_text() + (
        out.read_text() if out.exists() else "")
    assert secret not in everything
    assert which == "none" or key_id not in everything
    assert not out.exists() or out.read_text() == ""


async def test_a_resume_against_another_store_is_refused(
    s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    """The journal is bound to the store its rows were read from: resuming with another
    endpoint (the same URLs would name other objects) stops with exit 1; the original resumes."""
    folders = sample_folders(3, seed=9)
    put_folders(s3_env, bucket, folders)
    manifest = write_manifest(tmp_path / "m.csv", [
        (k.split("/")[-1], f"s3://{bucket}/{k}/") for k in folders])
    out = tmp_path / "out.jsonl"
    other = s3_env.endpoint.replace("127.0.0.1", "localhost")
    async with run_emulator(config()) as emu:
        first = Engine(engine_settings(emu.base_url, out, poll_min=20, poll_max=30), manifest)
        assert (await run_until(first, lambda: first.counters.submitted == 3)).exit_code == 130
        elsewhere = await Engine(engine_settings(emu.base_url, out, s3_endpoint_url=other),
                                 manifest).run()
        assert elsewhere.exit_code == 1 and isinstance(elsewhere.error, ConfigError)
        assert "http://localhost:" in str(elsewhere.error)
        assert "rerun with the original endpoint" in str(elsewhere.error)
        again = await Engine(engine_settings(emu.base_url, out), manifest).run()
    assert again.exit_code == 0 and len(read_lines(out)) == 3


_ENGINE_CHILD = r"""
import asyncio, json, os, sys
from pathlib import Path
from bulk_engine.config import Settings
from bulk_engine.engine import Engine
from bulk_engine.logs import configure_logging

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

async def main(base_url, manifest, out):
    configure_logging(level="warning")
    settings = Settings(base_url=base_url, api_key=os.environ["BULK_ENGINE_API_KEY"],
                        output=Path(out), concurrency=1, rate_limit=100.0, poll_min=0.05,
                        poll_max=0.2, max_file_size=2 << 30, progress=False)
    engine = Engine(settings, Path(manifest))
    seen = {"base": None, "peak": 0, "samples": 0}

    async def sample():  # the warm-up folder is sent first: then the 1 GiB one streams
        while True:
            if seen["base"] is None:
                if engine.counters.submitted >= 1:
                    seen["base"] = rss()
            else:
                seen["peak"] = max(seen["peak"], rss())
                seen["samples"] += 1
            await asyncio.sleep(0.02)

    task = asyncio.create_task(sample())
    result = await engine.run()
    task.cancel()
    print(json.dumps({"exit_code": result.exit_code, **seen,
                      "s3": result.summary.to_json().get("s3_bytes_read")}))

asyncio.run(main(*sys.argv[1:4]))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_one_gib_object_streams_through_the_engine_with_flat_memory(
    s3_env: S3Server, big_object: Any, tmp_path: Path
) -> None:
    """A folder holding a 1 GiB object, uploaded by the engine in a child process to the
    emulator: the emulator reads exactly its bytes, and the child's RSS grows under 30 MB
    while it streams (sampled every 20 ms against the base after a warm-up folder was sent).

    The 1 GiB object is the S3 layer test's own (``big_object``, built once per session), so
    this adds only the transfer: ~1 GiB through moto, the engine and the emulator's hashing.
    """
    warm = random.Random(12).randbytes(300_000)  # streamed too: the same code path warms up
    s3_env.put(big_object.bucket, "warm/w.bin", warm)
    manifest = write_manifest(tmp_path / "m.csv", [
        ("warm", f"s3://{big_object.bucket}/warm/"), ("big", f"s3://{big_object.bucket}/big/")])
    out = tmp_path / "out.jsonl"
    async with run_emulator(config(max_upload_bytes=2 << 30)) as emu:
        env = child_env(BULK_ENGINE_API_KEY=API_KEY,
                        PYTHONPATH=str(REPO))
        proc = await anyio.run_process(
            [sys.executable, "-c", _ENGINE_CHILD, emu.base_url, str(manifest), str(out)],
            env=env, check=False)
        got = received(emu)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    child = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert child["exit_code"] == 0 and child["samples"] > 10
    big_parts = sorted([(multipart_filename("huge.bin"), big_object.sha256, big_object.size),
                        *parts_of({"small.bin": big_object.small})])
    assert big_parts in got.values()
    growth = child["peak"] - child["base"]
    assert growth < 30_000_000, f"engine RSS grew by {growth / 1e6:.1f} MB streaming 1 GiB"
    lines = by_id(read_lines(out))
    assert lines["big"]["bytes"] == big_object.size + len(big_object.small)
    assert lines["big"]["result"] == expected_result(
        content_digest((n, sha) for n, sha, _ in big_parts), ("decision",),
        [n for n, _, _ in big_parts])
    print(f"RSS growth streaming 1 GiB through the engine: {growth / 1e6:.2f} MB")


async def test_without_the_s3_extra_a_bucket_row_stops_the_run_with_the_install_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No aiobotocore: the first bucket row is a ConfigError saying what to install."""
    from bulk_engine.s3.access import S3Access

    monkeypatch.setitem(sys.modules, "bulk_engine.s3.source", None)  # import fails
    async with S3Access() as s3:
        with pytest.raises(ConfigError, match=r"pip install 'bulk-engine\[s3\]'"):
            await s3.list_folder(S3Url("b", "p/"), max_file_size=1)
