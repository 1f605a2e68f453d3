"""The folder rules for S3 listings, apart from any I/O: what a page of ``ListObjectsV2`` means.

``S3Source`` fetches pages and hands them here; nothing in this module waits or talks to S3, so
every rule is tested on hand-made pages. The rules mirror ``manifest.list_folder`` and
``manifest.iter_root`` for local folders:

- a folder's files are the objects *directly* under its prefix (delimiter ``/``), sorted by
  name; sub-prefixes are not part of it, nor are hidden names (leading ``.``) or the zero-byte
  "directory marker" whose key is the prefix itself (what consoles create for an empty folder);
- nothing at all under the prefix (no object, marker or sub-prefix) is ``folder_missing``:
  on S3 a folder exists only through its keys; something, but no file to send, is
  ``folder_empty``; an object above ``max_file_size`` is ``file_too_large`` (the first in name
  order is named, with how many others there are, as for local folders);
- a *leaf* (``--root``) is a prefix with no sub-prefixes other than hidden ones; a prefix with
  sub-prefixes is walked into and its own objects are ignored, as ``iter_root`` ignores the files
  of a directory that has subdirectories.

``LeafCounter`` tells how many leaves the walk would yield from the *flat* listing (no
delimiter: up to 1000 keys a request, whatever the folders), for the progress panel's total: a
walk costs a request per folder, the count about one per few hundred folders.

``LeafWalk`` streams the leaves of a tree depth first while pages arrive: it holds one page of
pending sub-prefixes per level (and the current leaf's objects), never the whole tree, so a prefix
with millions of folders yields its first leaf after a handful of requests. Leaves come in S3's
key order (UTF-8 bytes of the whole key), which is the sorted order of the path segments except
where a name holds a character that sorts below ``/`` (space, ``!``, ``-``, ``.``, ...):
``a-b/`` comes before ``a/`` on S3. Reordering across pages would mean holding them all, so the
walk keeps S3's order; it is stable from run to run, which is what resuming needs.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bulk_engine.errors import ConfigError, ManifestError
from bulk_engine.s3.url import S3Url

__all__ = [
    "FolderListing",
    "LeafCounter",
    "LeafWalk",
    "ListPage",
    "ListRequest",
    "RawObject",
    "S3Entry",
    "S3Leaf",
    "fingerprint",
    "mtime_ns",
    "size_text",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class S3Entry:
    """One object of an S3 folder, as listed: what is uploaded, and how to check it is unchanged.

    ``name`` is the multipart filename (the key's last segment), ``etag`` the ETag exactly as
    S3 gives it (quotes included), ``mtime_ns`` its LastModified in nanoseconds since the epoch.
    """

    url: str  # s3://bucket/key
    bucket: str
    key: str
    name: str
    size: int
    etag: str
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class S3Leaf:
    """One leaf folder found by the ``--root`` walk, with its listing already done.

    ``id`` is the leaf's path relative to the walked prefix (``"."`` for the prefix itself), like
    ``iter_root``'s ids. Either ``entries`` (sorted by name) or ``error`` (the ManifestError that
    ``list_folder`` would raise for it: ``folder_empty``, ``file_too_large``,
    ``folder_unreadable``) is set. The listing comes with the leaf because the walk had to list
    the whole prefix anyway to know it has no sub-prefixes: no second request per folder.
    """

    id: str
    url: S3Url
    entries: tuple[S3Entry, ...] = ()
    error: ManifestError | None = None


@dataclass(frozen=True, slots=True)
class RawObject:
    """One ``Contents`` item of a ListObjectsV2 page."""

    key: str
    size: int
    etag: str
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class ListPage:
    """One ListObjectsV2 page (delimiter ``/``): objects, sub-prefixes, the next page's token."""

    objects: tuple[RawObject, ...] = ()
    prefixes: tuple[str, ...] = ()
    next_token: str | None = None


@dataclass(frozen=True, slots=True)
class ListRequest:
    """The page to fetch next: ``prefix`` in the walked bucket, from ``token`` (None: first)."""

    prefix: str
    token: str | None = None


def mtime_ns(value: datetime) -> int:
    """LastModified as integer nanoseconds since the epoch, without float rounding."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def fingerprint(entries: Iterable[S3Entry]) -> str:
    """A short digest of the folder's names, sizes, ETags and LastModified times.

    Same shape as ``models.fingerprint_files`` (32 hex characters). Overwriting an object changes
    its ETag or LastModified (or both), so the fingerprint changes, and a resumed run never pairs
    a changed folder with the result of its old content.
    """
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.name}\x00{e.size}\x00{e.etag}\x00{e.mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _hidden(name: str) -> bool:
    return name.startswith(".")


def size_text(n: int) -> str:
    """A file size for a message: ``12.3 MiB (12897485 bytes)``."""
    if n < 1024:
        return f"{n} bytes"
    x = n / 1024
    for unit in ("KiB", "MiB"):
        if x < 1024:
            return f"{x:.1f} {unit} ({n} bytes)"
        x /= 1024
    return f"{x:.1f} GiB ({n} bytes)"


@dataclass(slots=True)
class FolderListing:
    """The pages of one prefix, folded into the folder they describe (see the module's rules)."""

    url: S3Url
    files: list[RawObject] = field(default_factory=list)
    seen_anything: bool = False  # any key at all under the prefix: the folder exists
    subfolders: bool = False  # a sub-prefix that is not hidden

    def add(self, page: ListPage) -> list[str]:
        """Fold in one page; returns its visible sub-prefixes (full prefixes), in page order."""
        start = len(self.url.prefix)
        if page.objects or page.prefixes:
            self.seen_anything = True
        for obj in page.objects:
            name = obj.key[start:]
            # name == "": the folder's own marker. A key that still holds "/" cannot come with
            # delimiter "/", but a store that ignores the delimiter must not smuggle it in.
            if name and not _hidden(name) and "/" not in name:
                self.files.append(obj)
        subs = [p for p in page.prefixes if not _hidden(p[start:])]
        if subs:
            self.subfolders = True
        return subs

    def entries(self, max_file_size: int | None) -> tuple[S3Entry, ...]:
        """The folder's files sorted by name, or the ManifestError that stops it."""
        where = str(self.url)
        if not self.seen_anything:
            raise ManifestError(
                "folder_missing",
                f"folder {where} does not exist: nothing is stored under that prefix; "
                "check the bucket and the prefix",
            )
        start = len(self.url.prefix)
        files = sorted(self.files, key=lambda o: o.key)
        if max_file_size is not None:
            big = [o for o in files if o.size > max_file_size]
            if big:
                more = ""
                if len(big) > 1:
                    more = f" (and {len(big) - 1} more problem(s) in this folder)"
                raise ManifestError(
                    "file_too_large",
                    f"in folder {where}: file {big[0].key[start:]!r} is {size_text(big[0].size)}, "
                    f"above max_file_size ({size_text(max_file_size)}); raise --max-file-size or "
                    f"remove the object{more}",
                )
        if not files:
            raise ManifestError(
                "folder_empty",
                f"folder {where} has no files to upload (sub-prefixes, hidden names and folder "
                "markers are ignored); add the documents or remove the row",
            )
        return tuple(
            S3Entry(
                url=self.url.key_url(o.key), bucket=self.url.bucket, key=o.key,
                name=o.key[start:], size=o.size, etag=o.etag, mtime_ns=o.mtime_ns,
            )
            for o in files
        )


@dataclass(slots=True)
class _Frame:
    listing: FolderListing
    token: str | None = None
    done: bool = False
    pending: deque[str] = field(default_factory=deque)


class LeafWalk:
    """Depth-first walk of the leaf prefixes under ``root``, driven by whoever fetches pages.

    The driver loops: ``req = walk.next_request()``; hand out ``walk.take_ready()``; stop when
    ``req`` is None, else fetch that page and ``walk.feed(page)`` (or ``walk.fail(error)`` when
    the prefix cannot be listed). Raises ``ConfigError`` when nothing at all is stored under
    ``root``, and when ``root`` itself cannot be listed (``fail`` on the first request).
    """

    def __init__(self, root: S3Url, *, max_file_size: int | None = None) -> None:
        self.root = root
        self.max_file_size = max_file_size
        self._stack: list[_Frame] = [_Frame(FolderListing(root))]
        self._ready: deque[S3Leaf] = deque()

    def next_request(self) -> ListRequest | None:
        """The next page to fetch, or None when the walk is over (leaves may be ready)."""
        while self._stack:
            top = self._stack[-1]
            if top.pending:
                self._stack.append(_Frame(FolderListing(self.root.child(top.pending.popleft()))))
                continue
            if not top.done:
                return ListRequest(top.listing.url.prefix, top.token)
            self._stack.pop()
            if len(self._stack) == 0 and not top.listing.seen_anything:
                raise ConfigError(
                    f"--root {self.root} holds nothing: no object is stored under that prefix; "
                    "check the bucket and the prefix"
                )
            if not top.listing.subfolders:
                self._ready.append(self._leaf(top.listing))
        return None

    def feed(self, page: ListPage) -> None:
        """The page asked for by the last ``next_request``."""
        top = self._stack[-1]
        subs = top.listing.add(page)
        if subs:
            top.listing.files.clear()  # not a leaf: its own objects are not uploaded
            top.pending.extend(subs)
        top.token = page.next_token
        top.done = page.next_token is None

    def fail(self, error: ManifestError) -> None:
        """The last requested prefix cannot be listed: it becomes a row with ``error``."""
        top = self._stack[-1]
        if len(self._stack) == 1 and top.token is None:
            raise ConfigError(f"--root {self.root} cannot be listed: {error.message}")
        self._stack.pop()
        self._ready.append(S3Leaf(self._id(top.listing.url), top.listing.url, error=error))

    def take_ready(self) -> Sequence[S3Leaf]:
        """The leaves finished since the last call, in walk order."""
        out = list(self._ready)
        self._ready.clear()
        return out

    def _id(self, url: S3Url) -> str:
        rel = url.prefix[len(self.root.prefix):].removesuffix("/")
        return rel or "."

    def _leaf(self, listing: FolderListing) -> S3Leaf:
        try:
            entries = listing.entries(self.max_file_size)
        except ManifestError as exc:
            return S3Leaf(self._id(listing.url), listing.url, error=exc)
        return S3Leaf(self._id(listing.url), listing.url, entries=entries)


class LeafCounter:
    """Counts the leaves ``LeafWalk`` would yield under ``root``, from every key in key order.

    Feed the keys of the flat listing (no delimiter) in the order S3 gives them, then
    ``finish()``. All keys under one prefix are contiguous in that order, so a folder is
    complete as soon as a key outside it arrives: the counter holds the current key's chain of
    folders, never the tree. A folder is a leaf when it has no visible sub-folder, as for the
    walk: hidden names (``.x``) neither count nor are entered, a marker ``a/b/`` makes ``b`` a
    folder, and the root is itself the one leaf (id ``.``) when it has no visible sub-folder.
    """

    def __init__(self, root: S3Url) -> None:
        self.root = root
        self._chain: list[list[Any]] = []  # [segment, has a visible sub-folder]
        self._root_has_child = False
        self._seen = False
        self.count = 0

    def feed(self, keys: Iterable[str]) -> None:
        """The next keys of the flat listing, in S3's order."""
        start = len(self.root.prefix)
        chain = self._chain
        for key in keys:
            self._seen = True
            folders = key[start:].split("/")[:-1]  # the last part is the name ("": a marker)
            hidden = next((i for i, f in enumerate(folders) if _hidden(f)), len(folders))
            folders = folders[:hidden]
            same = 0
            while same < len(chain) and same < len(folders) and chain[same][0] == folders[same]:
                same += 1
            self._close(same)
            for segment in folders[same:]:
                if chain:
                    chain[-1][1] = True
                else:
                    self._root_has_child = True
                chain.append([segment, False])

    def finish(self) -> int:
        """The number of leaves; ConfigError when nothing is stored under the root."""
        self._close(0)
        if not self._seen:
            raise ConfigError(
                f"--root {self.root} holds nothing: no object is stored under that prefix; "
                "check the bucket and the prefix"
            )
        return self.count + (0 if self._root_has_child else 1)

    def _close(self, depth: int) -> None:
        while len(self._chain) > depth:
            _, has_child = self._chain.pop()
            if not has_child:
                self.count += 1
