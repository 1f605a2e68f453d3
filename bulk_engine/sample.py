"""Sample archives: small valid PDFs and JSON forms, for the demo, tests and benchmarks."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

__all__ = [
    "make_sample_archive",
    "minimal_pdf",
]

_DOC_KINDS = ("payslip", "tax_notice", "id_card", "bank_statement", "lease", "employment_contract")
_FIRST = ("Julien", "Amira", "Chloe", "Lucas", "Ines", "Hugo", "Lea", "Noah", "Sofia", "Adam")
_LAST = ("Moreau", "Martin", "Bernard", "Dubois", "Laurent", "Simon", "Michel", "Garcia")


def minimal_pdf(text: str) -> bytes:
    """A small, valid one-page PDF showing ``text`` (correct xref offsets)."""
    safe = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    stream = f"BT /F1 12 Tf 72 720 Td ({safe}) Tj ET".encode("latin-1", "replace")
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objs, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def make_sample_archive(root: Path, n: int, *, seed: int = 0, forms: bool = True,
                        manifest_name: str = "manifest.csv") -> Path:
    """Write ``n`` applicant folders under ``root`` and a manifest; return the manifest path.

    Each folder holds 1–3 PDFs and, for about two in three when ``forms``, a ``form.json``
    with the declared applicant data. Content is deterministic for a given seed.
    """
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / manifest_name
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "folder"])
        for i in range(n):
            name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
            folder = root / "folders" / f"folder_{i:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            for kind in rng.sample(_DOC_KINDS, rng.randint(1, 3)):
                amount = rng.randint(900, 6000)
                (folder / f"{kind}.pdf").write_bytes(
                    minimal_pdf(f"{kind} - {name} - {amount} EUR - case {i} - {seed}"))
            if forms and rng.random() < 0.66:
                form = {"participants": [{"name": name, "monthly_income": rng.randint(1200, 7000),
                                          "role": "applicant"}], "case": i}
                (folder / "form.json").write_text(json.dumps(form), encoding="utf-8")
            w.writerow([f"case-{i:05d}", f"folders/folder_{i:05d}"])
    return manifest
