"""Producer: manifest parsing, folder listing hazards, --root walk, counters, flat memory."""

from __future__ import annotations

import csv
import gc
import json
import os
import random
import stat
import tracemalloc
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bulk_engine import manifest as manifest_mod
from bulk_engine.errors import ConfigError, ManifestError
from bulk_engine.manifest import (
    BAD_ROW_KINDS,
    ProducerStats,
    RowDefaults,
    iter_manifest,
    iter_root,
    list_folder,
)
from bulk_engine.models import BadRow, Job, fingerprint_files

from archive_factory import make_archive, make_folder, make_pdf

MB = 1024 * 1024
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ─── helpers ───


def folder(path: Path, *names: str, seed: int = 0) -> Path:
    """A folder holding a small PDF under each of ``names``."""
    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for name in names:
        (path / name).write_bytes(make_pdf(rng, name))
    return path


def write_manifest(tmp: Path, text: str | bytes, name: str = "manifest.csv") -> Path:
    p = tmp / name
    p.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return p


def rows(path: Path, **kw: Any) -> list[Job | BadRow]:
    kw.setdefault("defaults", RowDefaults())
    kw.setdefault("max_file_size", MB)
    return list(iter_manifest(path, **kw))


def bad(items: list[Job | BadRow]) -> list[BadRow]:
    return [i for i in items if isinstance(i, BadRow)]


def one_bad(items: list[Job | BadRow]) -> BadRow:
    [b] = bad(items)
    return b


def listing(path: Path, **kw: Any) -> tuple[str, ...]:
    kw.setdefault("max_file_size", MB)
    kw.setdefault("follow_symlinks", False)
    return tuple(f.name for f in list_folder(path, **kw))


def list_error(path: Path, **kw: Any) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        listing(path, **kw)
    return info.value


def seen_set() -> Callable[[str], bool]:
    ids: set[str] = set()

    def seen(row_id: str) -> bool:
        if row_id in ids:
            return True
        ids.add(row_id)
        return False

    return seen


# ─── archive factory ───


def test_make_archive_writes_listable_folders_and_manifest(tmp_path: Path) -> None:
    """make_archive writes n folders of 1-3 PDFs (+ some forms) that the producer accepts."""
    m = make_archive(tmp_path / "arch", 12, seed=3)
    items = rows(m)
    assert [i.id for i in items] == [f"case-{i:05d}" for i in range(12)]
    jobs = [i for i in items if isinstance(i, Job)]
    assert len(jobs) == 12
    for job in jobs:
        pdfs = [f for f in job.files if f.name.endswith(".pdf")]
        assert 1 <= len(pdfs) <= 3
        assert all(f.path.read_bytes().startswith(b"%PDF-1.4") for f in pdfs)
    assert any(f.name == "form.json" for j in jobs for f in j.files)
    contents = {f.path.read_bytes() for j in jobs for f in j.files}
    assert len(contents) == sum(len(j.files) for j in jobs)  # varied content
    again = make_archive(tmp_path / "again", 12, seed=3, with_forms=False)
    assert not any(
        f.name == "form.json" for j in rows(again) if isinstance(j, Job) for f in j.files
    )


# ─── CSV format ───


def test_bom_and_case_insensitive_headers_are_accepted(tmp_path: Path) -> None:
    """A UTF-8 BOM and ' Folder ' / 'ID' headers still find the folder and id columns."""
    folder(tmp_path / "a", "x.pdf")
    m = write_manifest(tmp_path, "\ufeff ID , Folder ,notes\nr1,a,whatever\n")
    [job] = rows(m)
    assert isinstance(job, Job)
    assert (job.id, job.folder, job.line) == ("r1", "a", 2)


def test_crlf_line_endings_and_multiline_fields_keep_physical_line_numbers(tmp_path: Path) -> None:
    """With CRLF endings each row's line is the physical line where it starts."""
    for name in ("a", "b", "c"):
        folder(tmp_path / name, "x.pdf")
    text = 'id,folder,note\r\nr1,a,\r\nr2,b,"two\r\nlines"\r\nr3,c,\r\n'
    items = rows(write_manifest(tmp_path, text))
    assert [(i.id, i.line) for i in items] == [("r1", 2), ("r2", 3), ("r3", 5)]
    assert all(isinstance(i, Job) for i in items)


def test_blank_lines_are_not_rows(tmp_path: Path) -> None:
    """Empty lines and all-blank lines like ',,' are skipped and counted apart from rows."""
    folder(tmp_path / "a", "x.pdf")
    st = ProducerStats()
    items = rows(write_manifest(tmp_path, "\nid,folder\n\n , \nr1,a\n,,\n"), stats=st)
    assert [(i.id, i.line) for i in items] == [("r1", 5)]
    assert st.blank_rows == 3 and st.rows_read == 1


def test_id_defaults_to_folder_as_written(tmp_path: Path) -> None:
    """Without an id column (or with an empty id) the folder as written is the id."""
    folder(tmp_path / "a", "x.pdf")
    folder(tmp_path / "b", "x.pdf")
    assert [i.id for i in rows(write_manifest(tmp_path, "folder\na\n./b\n"))] == ["a", "./b"]
    assert [i.id for i in rows(write_manifest(tmp_path, "id,folder\n,a\n"))] == ["a"]


def test_ragged_rows_are_rejected_but_short_optional_columns_are_fine(tmp_path: Path) -> None:
    """More fields than the header is ragged_row; fewer is fine while the folder is present."""
    folder(tmp_path / "a", "x.pdf")
    text = "id,folder,use_case,payload\nr1,a,x,{},extra\nr2,a\nr3\n"
    items = rows(write_manifest(tmp_path, text))
    assert [(i.id, type(i).__name__) for i in items] == [
        ("r1", "BadRow"),
        ("r2", "Job"),
        ("r3", "BadRow"),
    ]
    assert {b.kind for b in bad(items)} == {"ragged_row"}
    assert "5 fields but the header has 4" in bad(items)[0].message
    assert "folder" in bad(items)[1].message


def test_nul_byte_rejects_only_its_row(tmp_path: Path) -> None:
    """A NUL byte makes its row a bad_row; the rows around it are read normally."""
    folder(tmp_path / "a", "x.pdf")
    m = write_manifest(tmp_path, b"id,folder\nr1,a\nr\x002,a\nr3,a\n")
    items = rows(m)
    assert [i.line for i in items] == [2, 3, 4]
    b = one_bad(items)
    assert (b.kind, b.line, b.id) == ("bad_row", 3, "r\ufffd2")
    assert "NUL" in b.message


def test_invalid_utf8_rejects_only_its_row(tmp_path: Path) -> None:
    """An undecodable byte makes its row bad_encoding with a printable id; others go on."""
    folder(tmp_path / "a", "x.pdf")
    m = write_manifest(tmp_path, b"id,folder\ncaf\xe9,a\nr2,a\n")
    items = rows(m)
    b = one_bad(items)
    assert (b.kind, b.line, b.id) == ("bad_encoding", 2, "caf\ufffd")
    assert "UTF-8" in b.message
    json.dumps(b.id, ensure_ascii=False).encode("utf-8")  # no lone surrogates reach the output
    assert isinstance(items[1], Job)


def test_unterminated_quote_reports_the_rest_as_one_parse_error(tmp_path: Path) -> None:
    """An unclosed quote yields one manifest_parse_error saying rows were lost, then stops."""
    folder(tmp_path / "a", "x.pdf")
    text = 'id,folder\nr1,a\nr2,"a\nr3,a\nr4,a\n'
    st = ProducerStats()
    items = rows(write_manifest(tmp_path, text), stats=st)
    assert isinstance(items[0], Job)
    b = one_bad(items)
    assert (b.kind, b.line) == ("manifest_parse_error", 3)
    assert "unknown number of rows" in b.message and "3-5" in b.message
    assert (st.rows_read, st.rows_accepted, st.rows_rejected) == (2, 1, 1)
    assert st.unparsed_lines == 3
    assert st.rejected_by_kind == {"manifest_parse_error": 1}


def test_overlong_quoted_field_stops_with_a_parse_error_and_counts_the_rest(
    tmp_path: Path,
) -> None:
    """A quote swallowing more than csv's field limit stops reading; skipped lines are counted."""
    folder(tmp_path / "a", "x.pdf")
    text = 'id,folder\nr1,"a\n' + "".join(f"r{i},{'y' * 40}\n" for i in range(100))
    old = csv.field_size_limit(1000)
    try:
        st = ProducerStats()
        items = rows(write_manifest(tmp_path, text), stats=st)
    finally:
        csv.field_size_limit(old)
    b = one_bad(items)
    assert (b.kind, b.line) == ("manifest_parse_error", 2)
    assert st.unparsed_lines == 101 and "(101 lines)" in b.message


def test_stray_quote_inside_a_line_rejects_that_row_only(tmp_path: Path) -> None:
    """A quote followed by text ('"a"b') is one bad_row; parsing resumes on the next line."""
    folder(tmp_path / "a", "x.pdf")
    items = rows(write_manifest(tmp_path, 'id,folder\nr1,"a"b\nr2,a\n'))
    b = one_bad(items)
    assert (b.kind, b.line, b.id) == ("bad_row", 2, "<line 2>")
    assert isinstance(items[1], Job) and items[1].line == 3


def test_overlong_line_stops_with_a_parse_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A line longer than MAX_LINE_CHARS is not buffered: one parse error, reading stops."""
    monkeypatch.setattr(manifest_mod, "MAX_LINE_CHARS", 64)
    folder(tmp_path / "a", "x.pdf")
    items = rows(write_manifest(tmp_path, "id,folder\nr1,a\nr2," + "z" * 200 + "\nr3,a\n"))
    assert [type(i).__name__ for i in items] == ["Job", "BadRow"]
    assert items[1].kind == "manifest_parse_error"  # type: ignore[union-attr]


def test_duplicate_ids_via_seen(tmp_path: Path) -> None:
    """With a seen() callback a repeated id becomes duplicate_id, keyed apart by its line."""
    folder(tmp_path / "a", "x.pdf")
    items = rows(write_manifest(tmp_path, "id,folder\nr1,a\nr1,a\nr2,a\n"), seen=seen_set())
    b = one_bad(items)
    assert (b.kind, b.line, b.id) == ("duplicate_id", 3, "r1")
    assert "ids must be unique" in b.message
    assert b.key != items[0].key


def test_empty_folder_value(tmp_path: Path) -> None:
    """An empty folder cell is empty_folder; with no id either the id is '<line N>'."""
    items = rows(write_manifest(tmp_path, "id,folder,use_case\nr1,\n,  ,loan\n"))
    assert [(b.kind, b.id) for b in bad(items)] == [
        ("empty_folder", "r1"),
        ("empty_folder", "<line 3>"),
    ]


# ─── row values ───


def test_per_row_use_case_analyse_type_and_payload_override_defaults(tmp_path: Path) -> None:
    """Row columns override the run defaults; the payload object merges on top of them."""
    folder(tmp_path / "a", "x.pdf")
    defaults = RowDefaults(
        use_case="rental",
        analyse_type=("decision",),
        payload={"share_link_settings": {"access": "public"}, "k": 1},
    )
    text = (
        "folder,use_case,analyse_type,payload\n"
        'a,loan, decision ; share_link ;decision,"{""k"": 2, ""extra"": [1]}"\n'
        "a,,,\n"
    )
    first, second = rows(write_manifest(tmp_path, text), defaults=defaults)
    assert isinstance(first, Job) and isinstance(second, Job)
    assert first.use_case == "loan"
    assert first.analyse_type == ("decision", "share_link")
    assert first.payload == {"share_link_settings": {"access": "public"}, "k": 2, "extra": [1]}
    assert (second.use_case, second.analyse_type) == ("rental", ("decision",))
    assert second.payload == defaults.payload and second.payload is not defaults.payload


@pytest.mark.parametrize(
    ("column", "value", "kind"),
    [
        ("analyse_type", "decision;verdict", "bad_analyse_type"),
        ("analyse_type", ";", "bad_analyse_type"),
        ("payload", "{not json", "bad_payload"),
        ("payload", "[1, 2]", "bad_payload"),
        ("payload", '{"x": NaN}', "bad_payload"),
    ],
)
def test_bad_row_values_are_rejected(tmp_path: Path, column: str, value: str, kind: str) -> None:
    """An unknown analyse_type or a payload that is not a JSON object rejects the row."""
    folder(tmp_path / "a", "x.pdf")
    m = tmp_path / "m.csv"
    with m.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([("id", "folder", column), ("r1", "a", value)])
    b = one_bad(rows(m))
    assert b.kind == kind
    assert (
        ("decision, explanation, share_link" in b.message)
        if kind == "bad_analyse_type"
        else ("JSON object" in b.message)
    )


# ─── folders ───


def test_missing_folder_and_not_a_directory(tmp_path: Path) -> None:
    """A missing folder is folder_missing (with hints); a file is not_a_directory."""
    folder(tmp_path / "a", "x.pdf")
    items = rows(write_manifest(tmp_path, "id,folder\nr1,nope\nr2,a/x.pdf\nr3,a \nr4,~/a\n"))
    assert [(b.kind, b.id) for b in bad(items)] == [
        ("folder_missing", "r1"),
        ("not_a_directory", "r2"),
        ("folder_missing", "r3"),
        ("folder_missing", "r4"),
    ]
    assert "relative paths resolve against the manifest's directory" in items[0].message  # type: ignore[union-attr]
    assert "spaces" in items[2].message and "'~' is not expanded" in items[3].message  # type: ignore[union-attr]


def test_relative_folders_resolve_against_the_manifest_directory(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Relative folders resolve against the manifest's directory, not the working directory."""
    folder(tmp_path / "data" / "a", "x.pdf")
    m = write_manifest(tmp_path / "data", "folder\na\n")
    monkeypatch.chdir(tmp_path)
    [job] = rows(Path("data/manifest.csv"))
    assert isinstance(job, Job)
    assert job.path.samefile(tmp_path / "data" / "a") and job.path.is_absolute()
    assert m.exists()


def test_folder_with_no_files_is_folder_empty(tmp_path: Path) -> None:
    """A folder holding only subfolders and hidden files is folder_empty."""
    f = tmp_path / "a"
    folder(f / "sub", "x.pdf")
    (f / ".DS_Store").write_bytes(b"junk")
    assert list_error(f).kind == "folder_empty"
    b = one_bad(rows(write_manifest(tmp_path, "folder\na\n")))
    assert b.kind == "folder_empty" and "add the documents" in b.message


@pytest.mark.skipif(IS_ROOT, reason="root can list any folder")
def test_unreadable_folder(tmp_path: Path) -> None:
    """A folder that cannot be listed is folder_unreadable."""
    f = folder(tmp_path / "a", "x.pdf")
    f.chmod(0)
    try:
        assert list_error(f).kind == "folder_unreadable"
    finally:
        f.chmod(0o755)


def test_unreadable_folder_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PermissionError while listing the folder is folder_unreadable (simulated for root)."""
    f = folder(tmp_path / "a", "x.pdf")

    def refuse(path: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(manifest_mod.os, "scandir", refuse)
    err = list_error(f)
    assert err.kind == "folder_unreadable" and "permissions" in err.message


def test_hidden_files_skipped_and_order_is_by_name(tmp_path: Path) -> None:
    """Dotfiles are skipped; files are listed sorted by their name string."""
    f = folder(tmp_path / "a", "b.pdf", "B.pdf", "a10.pdf", "a2.pdf", ".hidden.pdf", "é.pdf")
    (f / "sub").mkdir()
    assert listing(f) == ("B.pdf", "a10.pdf", "a2.pdf", "b.pdf", "é.pdf")
    files = list_folder(f, max_file_size=MB, follow_symlinks=False)
    assert all(x.path == f / x.name and x.size == (f / x.name).stat().st_size for x in files)


def test_fingerprint_tracks_the_folder_contents(tmp_path: Path) -> None:
    """A Job's fingerprint is fingerprint_files of its listing and changes when a file does."""
    f = folder(tmp_path / "a", "x.pdf")
    m = write_manifest(tmp_path, "folder\na\n")
    [job] = rows(m)
    assert isinstance(job, Job) and job.fingerprint == fingerprint_files(job.files)
    (f / "y.pdf").write_bytes(b"%PDF-1.4 more")
    [job2] = rows(m)
    assert isinstance(job2, Job) and job2.fingerprint != job.fingerprint


def test_symlink_outside_folder_is_refused_unless_following(tmp_path: Path) -> None:
    """A link leading out of its folder fails the row, unless follow_symlinks is set."""
    outside = folder(tmp_path / "elsewhere", "secret.pdf")
    f = folder(tmp_path / "a", "x.pdf")
    (f / "link.pdf").symlink_to(outside / "secret.pdf")
    err = list_error(f)
    assert err.kind == "symlink_outside" and "--follow-symlinks" in err.message
    files = list_folder(f, max_file_size=MB, follow_symlinks=True)
    assert [(x.name, x.path) for x in files] == [
        ("link.pdf", (outside / "secret.pdf").resolve()),
        ("x.pdf", f / "x.pdf"),
    ]
    b = one_bad(rows(write_manifest(tmp_path, "folder\na\n")))
    assert b.kind == "symlink_outside"


def test_symlink_to_a_file_in_the_same_folder_is_listed_under_its_name(tmp_path: Path) -> None:
    """A link to a sibling file is fine: listed under the link's name, path = the target."""
    f = folder(tmp_path / "a", "x.pdf")
    (f / "alias.pdf").symlink_to("x.pdf")
    (f / "dirlink").symlink_to(tmp_path)  # a linked directory is ignored like a subdirectory
    files = list_folder(f, max_file_size=MB, follow_symlinks=False)
    assert [(x.name, x.path) for x in files] == [
        ("alias.pdf", (f / "x.pdf").resolve()),
        ("x.pdf", f / "x.pdf"),
    ]


def test_dangling_symlink(tmp_path: Path) -> None:
    """A link to nothing fails the row as symlink_dangling, naming the missing target."""
    f = folder(tmp_path / "a", "x.pdf")
    (f / "gone.pdf").symlink_to("nowhere.pdf")
    err = list_error(f, follow_symlinks=True)
    assert err.kind == "symlink_dangling" and "nowhere.pdf" in err.message


@pytest.mark.timeout(5)
def test_fifo_is_refused_without_being_opened(tmp_path: Path) -> None:
    """A FIFO (or a link to one) is special_file and is never opened, so nothing blocks."""
    f = folder(tmp_path / "a", "x.pdf")
    os.mkfifo(f / "pipe")
    err = list_error(f)
    assert err.kind == "special_file" and "'pipe'" in err.message
    g = folder(tmp_path / "b", "x.pdf")
    os.mkfifo(g / "pipe")
    (g / "link").symlink_to("pipe")
    err = list_error(g)
    assert err.kind == "special_file" and "and 1 more problem" in err.message


def test_device_file_is_refused(tmp_path: Path) -> None:
    """A character device in the folder is special_file."""
    f = folder(tmp_path / "a", "x.pdf")
    try:
        os.mknod(f / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot create a device node here: {exc}")
    assert list_error(f).kind == "special_file"


@pytest.mark.skipif(IS_ROOT, reason="root reads chmod 000 files")
def test_unreadable_file(tmp_path: Path) -> None:
    """A file without read permission fails the row as file_unreadable."""
    f = folder(tmp_path / "a", "x.pdf", "y.pdf")
    (f / "y.pdf").chmod(0)
    assert list_error(f).kind == "file_unreadable"


def test_unreadable_file_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that os.access or open refuses is file_unreadable (simulated, works as root)."""
    f = folder(tmp_path / "a", "x.pdf", "y.pdf")
    real_access, real_open = os.access, os.open
    monkeypatch.setattr(
        manifest_mod.os, "access", lambda p, m: not str(p).endswith("y.pdf") and real_access(p, m)
    )
    err = list_error(f)
    assert (err.kind, "'y.pdf'" in err.message) == ("file_unreadable", True)
    monkeypatch.setattr(manifest_mod.os, "access", real_access)

    def refuse_open(p: Any, flags: int, *a: Any) -> int:
        if str(p).endswith("x.pdf"):
            raise PermissionError(13, "Permission denied")
        return real_open(p, flags, *a)

    monkeypatch.setattr(manifest_mod.os, "open", refuse_open)
    assert list_error(f).kind == "file_unreadable"


def test_file_too_large(tmp_path: Path) -> None:
    """A file above max_file_size fails the row with the limit and the fix in the message."""
    f = folder(tmp_path / "a", "x.pdf")
    (f / "big.pdf").write_bytes(b"%PDF-1.4" + b"0" * 5000)
    err = list_error(f, max_file_size=4096)
    assert err.kind == "file_too_large" and "--max-file-size" in err.message
    assert listing(f, max_file_size=6000) == ("big.pdf", "x.pdf")


def test_non_utf8_file_name_is_listed(tmp_path: Path) -> None:
    """A file name with undecodable bytes lists as the OS gives it (surrogate escapes)."""
    f = folder(tmp_path / "a", "x.pdf")
    try:
        with open(os.fsencode(f) + b"/caf\xe9.pdf", "wb") as fh:
            fh.write(b"%PDF-1.4 latin-1 name")
    except OSError as exc:  # pragma: no cover - some filesystems refuse
        pytest.skip(f"filesystem refuses non-UTF-8 names: {exc}")
    files = list_folder(f, max_file_size=MB, follow_symlinks=False)
    assert [x.name for x in files] == ["caf\udce9.pdf", "x.pdf"]
    assert os.fsencode(files[0].path).endswith(b"caf\xe9.pdf")
    assert files[0].path.read_bytes() == b"%PDF-1.4 latin-1 name"
    assert fingerprint_files(files)


def test_nfd_and_nfc_names_are_listed_as_given(tmp_path: Path) -> None:
    """NFC and NFD spellings of a name are distinct files, each listed exactly as on disk."""
    nfc = unicodedata.normalize("NFC", "café.pdf")
    nfd = unicodedata.normalize("NFD", "café.pdf")
    f = folder(tmp_path / "a", nfc, nfd)
    names = listing(f)
    assert sorted(names) == sorted(os.listdir(f)) and set(names) == {nfc, nfd}


# ─── confinement ───


def test_confine_to_rejects_folders_that_escape_the_root(tmp_path: Path) -> None:
    """With confine_to, '..' escapes, absolute paths and links out are outside_root."""
    root = tmp_path / "root"
    folder(root / "a", "x.pdf")
    folder(tmp_path / "other", "x.pdf")
    (root / "linked").symlink_to(tmp_path / "other")
    text = (
        f"id,folder\nr1,a\nr2,../other\nr3,{tmp_path / 'other'}\nr4,{root / 'a'}\nr5,linked\n"
        "r6,a/../a\n"
    )
    m = write_manifest(root, text)
    items = rows(m, confine_to=root)
    assert [(i.id, getattr(i, "kind", "job")) for i in items] == [
        ("r1", "job"),
        ("r2", "outside_root"),
        ("r3", "outside_root"),
        ("r4", "job"),
        ("r5", "outside_root"),
        ("r6", "job"),
    ]
    assert "allowed root" in items[1].message  # type: ignore[union-attr]
    assert all(isinstance(i, Job) for i in rows(m))  # without confinement all are allowed


# ─── header ───


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        ("id,path\nr1,a\n", "no 'folder' column"),
        ("", "is empty"),
        ("\n\n", "is empty"),
        ("id,folder,Folder\n", "appears twice"),
        ('id,"folder\n', "header row"),
    ],
)
def test_unusable_manifest_is_a_config_error(tmp_path: Path, content: str, phrase: str) -> None:
    """No folder column, an empty file or a broken header stop the run with a clear ConfigError."""
    with pytest.raises(ConfigError, match=phrase):
        rows(write_manifest(tmp_path, content))


def test_missing_manifest_is_a_config_error(tmp_path: Path) -> None:
    """A manifest path that does not exist is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="cannot read manifest"):
        rows(tmp_path / "nope.csv")


# ─── --root ───


def test_iter_root_yields_each_leaf_folder_in_sorted_order(tmp_path: Path) -> None:
    """--root makes every leaf folder a row: posix relative id, ordinal line, sorted."""
    root = tmp_path / "archive"
    folder(root / "2024" / "b", "x.pdf")
    folder(root / "2024" / "a", "x.pdf")
    folder(root / "2023" / "z", "y.pdf")
    (root / "2024" / "loose.pdf").write_bytes(b"%PDF-1.4")  # not a leaf: ignored
    folder(root / ".git" / "objects", "x.pdf")  # hidden: skipped
    (root / "2022").mkdir()  # empty leaf
    (root / "2023" / "link").symlink_to(tmp_path)  # linked dir: not followed, not counted
    st = ProducerStats()
    items = list(
        iter_root(root, defaults=RowDefaults(use_case="rental"), max_file_size=MB, stats=st)
    )
    assert [(i.line, i.id) for i in items] == [
        (1, "2022"),
        (2, "2023/z"),
        (3, "2024/a"),
        (4, "2024/b"),
    ]
    assert isinstance(items[0], BadRow) and items[0].kind == "folder_empty"
    assert all(isinstance(i, Job) and i.use_case == "rental" for i in items[1:])
    assert st.rows_read == 4 == st.rows_accepted + st.rows_rejected


def test_iter_root_reports_unreadable_directories(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A directory os.walk cannot list becomes a folder_unreadable row, not a silent gap."""
    root = tmp_path / "archive"
    folder(root / "a", "x.pdf")
    folder(root / "b" / "c", "x.pdf")
    real_walk = os.walk

    def walk(top: str, onerror: Any = None, **kw: Any) -> Iterator[Any]:
        for dirpath, dirnames, files in real_walk(top, onerror=onerror, **kw):
            if dirpath.endswith("/b"):
                dirnames.clear()  # as os.walk does: an unlistable directory is not descended
                onerror(PermissionError(13, "Permission denied", dirpath))
                continue
            yield dirpath, dirnames, files

    monkeypatch.setattr(manifest_mod.os, "walk", walk)
    items = list(iter_root(root, defaults=RowDefaults(), max_file_size=MB))
    assert [(i.id, getattr(i, "kind", "job")) for i in items] == [
        ("a", "job"),
        ("b", "folder_unreadable"),
    ]


def test_iter_root_needs_a_directory(tmp_path: Path) -> None:
    """--root that is not a directory is a ConfigError."""
    with pytest.raises(ConfigError, match="not a directory"):
        list(iter_root(tmp_path / "nope", defaults=RowDefaults(), max_file_size=MB))


# ─── counters, resume, memory ───


def test_torture_manifest_counts_every_row_exactly_once(tmp_path: Path) -> None:
    """On a manifest mixing every hazard, rows_read == accepted + rejected and kinds add up."""
    folder(tmp_path / "ok", "x.pdf")
    folder(tmp_path / "ok2", "x.pdf")
    (tmp_path / "empty").mkdir()
    folder(tmp_path / "lnk", "x.pdf")
    (tmp_path / "lnk" / "out.pdf").symlink_to(tmp_path / "ok" / "x.pdf")
    folder(tmp_path / "dang", "x.pdf")
    (tmp_path / "dang" / "d.pdf").symlink_to("missing")
    folder(tmp_path / "fifo", "x.pdf")
    os.mkfifo(tmp_path / "fifo" / "p")
    text = (
        "\ufeffid,folder,analyse_type,payload\r\n"
        "ok,ok,,\r\n"
        "dup,ok2,,\r\n"
        "dup,ok,,\r\n"
        ",,,\r\n"
        "nofolder,,,\r\n"
        "missing,nowhere,,\r\n"
        "file,ok/x.pdf,,\r\n"
        "empty,empty,,\r\n"
        "lnk,lnk,,\r\n"
        "dang,dang,,\r\n"
        "fifo,fifo,,\r\n"
        "rag,ok,,,,\r\n"
        "nul\x00,ok,,\r\n"
        "at,ok,bogus,\r\n"
        'pl,ok,,"[1]"\r\n'
        'stray,"ok"x,,\r\n'
        'multi,"o\r\nk",,\r\n'
        "ok3,ok2,explanation,\r\n"
        'tail,"ok\r\n'
        "lost,ok,,\r\n"
    )
    st = ProducerStats()
    items = rows(write_manifest(tmp_path, text), stats=st, seen=seen_set())
    assert st.rows_read == len(items) == st.rows_accepted + st.rows_rejected == 18
    assert st.rows_accepted == 3 and st.blank_rows == 1
    assert sum(st.rejected_by_kind.values()) == st.rows_rejected
    assert set(st.rejected_by_kind) <= set(BAD_ROW_KINDS)
    assert st.rejected_by_kind == {
        "duplicate_id": 1,
        "empty_folder": 1,
        "folder_missing": 2,
        "not_a_directory": 1,
        "folder_empty": 1,
        "symlink_outside": 1,
        "symlink_dangling": 1,
        "special_file": 1,
        "ragged_row": 1,
        "bad_row": 2,
        "bad_analyse_type": 1,
        "bad_payload": 1,
        "manifest_parse_error": 1,
    }
    assert len({i.key for i in items}) == len(items)  # one journal key per row
    assert [i.line for i in items] == sorted(i.line for i in items)
    assert st.to_json()["rows_read"] == 18


def test_is_done_skips_rows_without_listing_their_folders(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows is_done() reports finished are counted as skipped and their folders not listed."""
    folder(tmp_path / "a", "x.pdf")
    listed: list[Path] = []
    real = manifest_mod.list_folder

    def spy(path: Path, **kw: Any) -> Any:
        listed.append(path)
        return real(path, **kw)

    monkeypatch.setattr(manifest_mod, "list_folder", spy)
    st = ProducerStats()
    items = rows(
        write_manifest(tmp_path, "id,folder\nr1,a\nr2,a\nr3,a\n"),
        stats=st,
        is_done=lambda key: key in {"r1", "r3"},
    )
    assert [i.id for i in items] == ["r2"] and len(listed) == 1
    assert (st.rows_read, st.rows_skipped_done) == (3, 2)
    assert st.rows_read == st.rows_accepted + st.rows_rejected + st.rows_skipped_done


def _big_manifest(tmp: Path, n: int) -> Path:
    """n rows, wide enough that the file is far bigger than the memory the test allows."""
    for k in range(5):
        make_folder(tmp / f"f{k}", random.Random(k), n_files=1)
    m = tmp / "big.csv"
    note = "n" * 120
    with m.open("w", encoding="utf-8", newline="") as fh:
        fh.write("id,folder,note\n")
        for i in range(n):
            # Most rows are already done (a resumed run); the rest are listed or missing.
            where = f"f{i % 5}" if i % 20 == 0 else ("gone" if i % 20 == 1 else "f0")
            fh.write(f"row-{i:07d},{where},{note}\n")
    return m


def _done(key: str) -> bool:
    return int(key[4:]) % 20 >= 2


def test_manifest_is_streamed_tracemalloc_peak_is_small(tmp_path: Path) -> None:
    """Iterating a manifest never holds it: traced peak stays far below the file's size."""
    m = _big_manifest(tmp_path, 20_000)
    st = ProducerStats()
    gc.collect()
    tracemalloc.start()
    try:
        for _ in iter_manifest(
            m, defaults=RowDefaults(), max_file_size=MB, is_done=_done, stats=st
        ):
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert st.rows_read == 20_000 and st.rows_accepted == 1000 and st.rows_rejected == 1000
    assert m.stat().st_size > 2 * MB
    assert peak < 1 * MB, f"peak {peak} bytes"


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_200k_row_manifest_memory_stays_flat(tmp_path: Path) -> None:
    """200k rows (27 MB of CSV) stream with resident memory growing by less than 20 MB."""
    n = 200_000
    m = _big_manifest(tmp_path, n)
    assert m.stat().st_size > 25 * MB
    st = ProducerStats()
    gc.collect()
    list(
        iter_manifest(
            _big_manifest(tmp_path / "warm", 100), defaults=RowDefaults(), max_file_size=MB
        )
    )  # warm up lazy imports and caches
    base = peak = _rss()
    it = iter_manifest(m, defaults=RowDefaults(), max_file_size=MB, is_done=_done, stats=st)
    for i, _ in enumerate(it):
        if i % 5000 == 0:
            peak = max(peak, _rss())
    peak = max(peak, _rss())
    assert st.rows_read == n and st.rows_accepted == n // 20 and st.rows_rejected == n // 20
    assert st.rows_read == st.rows_accepted + st.rows_rejected + st.rows_skipped_done
    assert peak - base < 20 * MB, f"RSS grew by {(peak - base) / MB:.1f} MB"
