"""The committed parts of a concept bank (``OUT/parts/part-NNNNN-<token>.safetensors``): one atomic
file per commit of :mod:`cluster.bank_job`, every concept's table row (ok and failed) in the
safetensors header and each built concept's tensors under ``<kind>:<name>/<field>``; and reading
them back, each part once."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

import torch

from index.output import Parts, ResumableOutput
from index.storage import join
from reco.bank import ConceptReference

if TYPE_CHECKING:
    from .bank_job import ConceptTask

PARTS_DIR = "parts"
_HEADER = "reco_bank_part"


def concept_row(
    name: str, kind: str, ref: Optional[ConceptReference], info: Mapping[str, Any], task: ConceptTask, digest: str
) -> Dict[str, Any]:
    read = info.get("read", {})
    return {
        "name": name,
        "kind": kind,
        "status": "ok" if ref is not None else "failed",
        "error": "" if ref is not None else str(info.get("error", "")),
        "source": task.source,
        "archive": [str(u) for u in info.get("archive", [])],
        "requested": len(task.uris),
        "images_skipped": dict(read.get("skipped_files", {})),
        "seed_index": [] if ref is None else ref.seed_index.tolist(),
        "seed_scores": [] if ref is None or ref.seed_scores is None else [round(float(v), 6) for v in ref.seed_scores],
        "grid": [0, 0] if ref is None else list(ref.grid),
        "language_guidance": bool(ref.language_guidance) if ref is not None else False,
        "context_eliminated": [] if ref is None else list(ref.context),
        "reused_context_reference": bool(ref.reused_context) if ref is not None else False,
        "seconds": float(info.get("seconds", 0.0)),
        "config_hash": digest,
    }


#: what a part keeps of each built concept (besides its table row): ``<kind>:<name>/<field>``
_PART_FIELDS = ("reference", "prototypes", "calibration", "member_sums", "member_counts")


def part_bytes(entries: List[Tuple[Dict[str, Any], Optional[ConceptReference]]]) -> bytes:
    """One atomic part: every concept's row (ok and failed) in the header; for each built
    concept its reference, prototypes, calibration and (with ``keep_members``) archive members
    under ``<kind>:<name>/<field>``, and its co-segmentation score maps ``scores/<kind>:<name>``
    (k, h, w) float16 (the archive browser's heat-maps)."""
    from safetensors.torch import save

    tensors: Dict[str, torch.Tensor] = {}
    for row, ref in entries:
        if ref is None:
            continue
        key = f"{row['kind']}:{row['name']}"
        for f in _PART_FIELDS:
            t = getattr(ref, f)
            if t is not None:
                tensors[f"{key}/{f}"] = t.float().contiguous()
        if ref.scores is not None and ref.scores.numel():
            tensors[f"scores/{key}"] = ref.scores.to(torch.float16).contiguous()
    if not tensors:
        tensors["empty"] = torch.zeros(1)
    return save(tensors, metadata={_HEADER: json.dumps([row for row, _ in entries])})


def commit_part(out: ResumableOutput, entries: List[Tuple[Dict[str, Any], Optional[ConceptReference]]]) -> None:
    """Commit one part (atomic; the writer lock is checked first)."""
    out.commit(part_bytes(entries))


def committed_reference(
    row: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], key: str, legacy: Optional[torch.Tensor] = None
) -> ConceptReference:
    """A committed concept as the builder returned it (without its score maps)."""

    def get(f):
        return tensors.get(f"{key}/{f}")

    reference = get("reference") if legacy is None else legacy
    return ConceptReference(
        str(row["name"]),
        reference,
        torch.tensor(row["seed_index"], dtype=torch.long),
        tuple(row["grid"]),
        len(row["archive"]),
        bool(row["language_guidance"]),
        tuple(row["context_eliminated"]),
        bool(row["reused_context_reference"]),
        seed_scores=torch.tensor(row["seed_scores"], dtype=torch.float32) if row["seed_scores"] else None,
        prototypes=get("prototypes"),
        calibration=get("calibration"),
        member_sums=get("member_sums"),
        member_counts=get("member_counts"),
    )


class Committed:
    """The committed concepts of an output, folded in part by part (each part read once):
    ``rows`` and ``refs`` keyed ``<kind>:<name>``. A concept committed twice (never by this
    code) raises."""

    def __init__(self, parts: Parts):
        self.parts = parts
        self.rows: Dict[str, Dict[str, Any]] = {}
        self.refs: Dict[str, ConceptReference] = {}

    def update(self) -> "Committed":
        from safetensors.torch import load

        from reco.bank import safetensors_metadata

        for part, data in self.parts.read_new():
            part_rows = json.loads(safetensors_metadata(data)[_HEADER])
            tensors = load(data)
            stacked = tensors.get("references")  # parts written before per-concept tensors
            k = 0
            for r in part_rows:
                key = f"{r['kind']}:{r['name']}"
                if key in self.rows:
                    raise RuntimeError(f"concept {r['name']!r} committed twice ({part})")
                self.rows[key] = r
                if r["status"] == "ok":
                    self.refs[key] = committed_reference(r, tensors, key, stacked[k] if stacked is not None else None)
                    k += 1
        return self


def open_parts(out_uri: str, storage_options=None) -> Parts:
    return Parts(join(out_uri, PARTS_DIR), ".safetensors", storage_options)


def committed(out_uri: str, storage_options=None) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, ConceptReference], int]:
    """({key: row}, {key: reference}, next part number) of every committed part, keyed
    ``<kind>:<name>``."""
    parts = open_parts(out_uri, storage_options)
    done = Committed(parts).update()
    return done.rows, done.refs, parts.next_seq()
