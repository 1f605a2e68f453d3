"""Deterministic verdicts: what the emulated analysis answers for a given folder content.

The emulator's result depends only on the uploaded bytes (through ``content_digest``) and the
requested ``analyse_type``, never on timing or randomness. Tests of other modules use the same two
functions to predict, from the files on disk, the exact result the emulator returns:

    digest = content_digest((p.name, sha256(p.read_bytes()).hexdigest()) for p in folder_files)
    expected = expected_result(digest, ["decision"], [p.name for p in folder_files])
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["ANALYSE_TYPES", "SHARE_LINK_PREFIX", "content_digest", "expected_result"]

ANALYSE_TYPES = ("decision", "explanation", "share_link")
SHARE_LINK_PREFIX = "https://app.finovox.com/share/case-management/"

_FRAUD_TEXT = (
    (
        "Metadata shows the document was edited after issue.",
        "Les métadonnées montrent une modification du document après émission.",
    ),
    (
        "Fonts are inconsistent across the amounts.",
        "Les polices sont incohérentes sur les montants.",
    ),
    (
        "The document layout does not match the issuer's template.",
        "La mise en page ne correspond pas au modèle de l'émetteur.",
    ),
)
_COMPLIANCE_TEXT = (
    (
        "A required document is missing from the folder.",
        "Un document requis manque dans le dossier.",
    ),
    (
        "The income declared is below the use case threshold.",
        "Les revenus déclarés sont inférieurs au seuil du cas d'usage.",
    ),
    ("A document is older than three months.", "Un document date de plus de trois mois."),
)
_CROSS_TEXT = (
    ("The names match across documents.", "Les noms concordent entre les documents."),
    ("The addresses differ between documents.", "Les adresses diffèrent entre les documents."),
    (
        "The incomes are consistent across documents.",
        "Les revenus sont cohérents entre les documents.",
    ),
)
_ALL_CLEAR = ("All compliance checks passed.", "Tous les contrôles de conformité sont passés.")


def content_digest(files: Iterable[tuple[str, str]]) -> str:
    """Return the hex digest identifying a folder's content, independent of file order.

    ``files`` holds one ``(filename, sha256 hex of the bytes)`` pair per uploaded part, JSON
    forms included. Each pair is length-prefixed so that no two different folders collide by
    concatenation.
    """
    hasher = hashlib.sha256(b"bulk-engine-emulator/content/v1\n")
    for name, sha in sorted((name, sha.lower()) for name, sha in files):
        hasher.update(f"{len(name)}:{name}:{sha}\n".encode())
    return hasher.hexdigest()


def expected_result(
    digest: str, analyse_type: Sequence[str], filenames: Sequence[str]
) -> dict[str, Any]:
    """Return the result body the emulator gives for a folder (the 200 of retrieve or sync).

    ``digest`` comes from ``content_digest``; ``analyse_type`` lists the requested keys (only
    those appear in the result, duplicates ignored); ``filenames`` are the folder's file names in
    any order (names ending in ``.json`` are forms, never cited as source documents).
    Raises ``ValueError`` for an unknown or empty ``analyse_type``.
    """
    wanted = set(analyse_type)
    unknown = sorted(wanted - set(ANALYSE_TYPES))
    if unknown:
        raise ValueError(f"unknown analyse_type: {', '.join(unknown)}")
    if not wanted:
        raise ValueError("analyse_type must not be empty")
    seed = hashlib.sha256(f"verdict:{digest}".encode()).digest()
    fraud = _pick_fraud(seed[0])
    validation = "compliant" if seed[1] % 10 < 7 else "non_compliant"
    result: dict[str, Any] = {}
    if "decision" in wanted:
        approved = fraud == "low" and validation == "compliant"
        result["decision"] = {
            "status": "approved" if approved else "rejected",
            "status_fraud": fraud,
            "status_validation": validation,
        }
    if "explanation" in wanted:
        documents = sorted({n for n in filenames if not n.lower().endswith(".json")})
        result["explanation"] = _explanation(seed, fraud, validation, documents)
    if "share_link" in wanted:
        link = hashlib.sha256(f"share:{digest}".encode()).digest()[:16]
        result["share_link"] = {"url": SHARE_LINK_PREFIX + base64.urlsafe_b64encode(link).decode()}
    return result


def _pick_fraud(byte: int) -> str:
    bucket = byte % 20  # 60 % low, 25 % medium, 15 % high
    if bucket < 12:
        return "low"
    return "medium" if bucket < 17 else "high"


def _explanation(
    seed: bytes, fraud: str, validation: str, documents: list[str]
) -> list[dict[str, Any]]:
    def item(source: str, text: tuple[str, str], cited: list[str]) -> dict[str, Any]:
        return {"source": source, "data": {"en": text[0], "fr": text[1]}, "source_documents": cited}

    def one(offset: int) -> list[str]:
        return [documents[seed[offset] % len(documents)]] if documents else []

    items = []
    if fraud != "low":
        items.append(item("fraud", _FRAUD_TEXT[seed[2] % len(_FRAUD_TEXT)], one(3)))
    if validation == "non_compliant":
        items.append(item("compliance", _COMPLIANCE_TEXT[seed[4] % len(_COMPLIANCE_TEXT)], one(5)))
    if len(documents) >= 2:
        first = seed[6] % len(documents)
        second = (first + 1 + seed[7] % (len(documents) - 1)) % len(documents)
        cited = sorted({documents[first], documents[second]})
        items.append(item("cross_document", _CROSS_TEXT[seed[8] % len(_CROSS_TEXT)], cited))
    if not items:
        items.append(item("compliance", _ALL_CLEAR, list(documents)))
    return items
