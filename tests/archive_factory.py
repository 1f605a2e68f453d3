"""Sample archives for tests: folders of small valid-looking PDFs, forms, and a manifest.

Deterministic for a given seed, so tests can compare bytes uploaded with bytes on disk.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from bulk_engine.sample import minimal_pdf

DOC_NAMES = (
    "payslip",
    "tax_notice",
    "id_card",
    "bank_statement",
    "lease",
    "employment_contract",
    "utility_bill",
    "guarantor_letter",
    "proof_of_address",
)
_WORDS = (
    "net",
    "gross",
    "salary",
    "amount",
    "due",
    "tenant",
    "landlord",
    "period",
    "total",
    "reference",
    "account",
    "balance",
    "issued",
    "signature",
    "address",
    "employer",
)
_FIRST = ("Alice", "Bruno", "Chloé", "Dmitri", "Emma", "Farid", "Gaëlle", "Hugo")
_LAST = ("Martin", "Bernard", "Dubois", "Nguyen", "Leroy", "Moreau", "Fournier", "Girard")


def make_pdf(rng: random.Random, title: str) -> bytes:
    """A small, well-formed one-page PDF whose text and length vary with ``rng``."""
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 60)))
    return minimal_pdf(f"{title} {rng.randint(1000, 999999)} {words}")


def make_form(rng: random.Random) -> bytes:
    """A free-form applicant declaration, as the API reads ``*.json`` files."""
    form = {
        "applicant": {
            "first_name": rng.choice(_FIRST),
            "last_name": rng.choice(_LAST),
            "monthly_income": rng.randrange(1200, 9000, 50),
        },
        "rent": rng.randrange(400, 3000, 10),
    }
    return json.dumps(form, ensure_ascii=False, indent=2).encode("utf-8")


def make_folder(
    folder: Path, rng: random.Random, *, n_files: int | None = None, with_form: bool = False
) -> list[Path]:
    """Fill ``folder`` with 1–3 PDFs (or ``n_files``) and maybe a form.json; return the files."""
    folder.mkdir(parents=True, exist_ok=True)
    k = n_files if n_files is not None else rng.randint(1, 3)
    written = []
    for name in rng.sample(DOC_NAMES, k):
        p = folder / f"{name}.pdf"
        p.write_bytes(make_pdf(rng, name))
        written.append(p)
    if with_form:
        p = folder / "form.json"
        p.write_bytes(make_form(rng))
        written.append(p)
    return written


def make_archive(root: Path, n: int, *, seed: int = 0, with_forms: bool = True) -> Path:
    """Write ``n`` case folders under ``root/cases`` and ``root/manifest.csv``; return its path.

    Each folder holds 1–3 small PDFs and, when ``with_forms``, about half also a form.json. The
    manifest has the header ``id,folder`` and folder paths relative to ``root``.
    """
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rel = f"cases/case-{i:05d}"
        make_folder(root / rel, rng, with_form=with_forms and rng.random() < 0.5)
        rows.append((f"case-{i:05d}", rel))
    manifest = root / "manifest.csv"
    with manifest.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(("id", "folder"))
        writer.writerows(rows)
    return manifest
