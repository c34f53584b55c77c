"""Vocabulary files for ``reco build-bank`` (and ``--vocab`` of pseudo-label/segment), validated up front.

Two formats:

* text: one concept name per line (UTF-8); lines starting with ``#`` are comments;
* YAML (``.yaml``/``.yml``): a list of names, or a mapping ``name: {synonyms: [...],
  exemplars: DIR}`` (either key optional; ``name:`` alone is fine). Synonyms are averaged into
  the concept's CLIP text embedding and retrieval query; ``exemplars`` is a folder of images
  that replaces retrieval for that concept.

Rejected, with the line number: blank names, names longer than :data:`MAX_NAME_LENGTH`,
duplicates after normalising case and whitespace, lines that are not valid UTF-8, and names that
could be read as paths (``/``, ``\\``, ``..``, only dots, NUL or other control characters): a name
is a name, never a path. A UTF-8 byte-order mark at the start of the file is dropped.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from reco.errors import ConfigError

MAX_NAME_LENGTH = 100


@dataclass(frozen=True)
class Concept:
    name: str
    synonyms: Tuple[str, ...] = ()
    exemplars: Optional[str] = None
    line: int = 0


@dataclass
class Vocabulary:
    concepts: List[Concept] = field(default_factory=list)

    @property
    def names(self) -> List[str]:
        return [c.name for c in self.concepts]

    def __len__(self) -> int:
        return len(self.concepts)


def normalise(name: str) -> str:
    return " ".join(name.split()).casefold()


def _path_like(name: str) -> Optional[str]:
    """Why ``name`` could reach outside a folder when joined to it, or None."""
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if ".." in name or set(name) == {"."}:
        return "contains '..' or is only dots"
    return None


def _check(name: str, line: int, seen: Dict[str, int], path: str) -> str:
    raw = str(name)
    bad = next((c for c in raw if c != "\t" and unicodedata.category(c) == "Cc"), None)
    if bad is not None:  # before whitespace folding, which would hide some of them
        raise ConfigError(f"{path}:{line}: concept name {raw[:30]!r} contains the control character {bad!r}")
    clean = " ".join(raw.split())
    if not clean:
        raise ConfigError(f"{path}:{line}: blank concept name")
    why = _path_like(clean)
    if why:
        raise ConfigError(f"{path}:{line}: concept name {clean[:30]!r} {why}: a concept is a name, not a path")
    if len(clean) > MAX_NAME_LENGTH:
        raise ConfigError(f"{path}:{line}: concept name longer than {MAX_NAME_LENGTH} characters ({clean[:30]}...)")
    key = normalise(clean)
    if key in seen:
        raise ConfigError(f"{path}:{line}: duplicate concept {clean!r} (first on line {seen[key]})")
    seen[key] = line
    return clean


def check_names(names: List[str], where: str) -> List[str]:
    """Names given inline (``--vocab a,b,c``), checked like a file's (position instead of line)."""
    seen: Dict[str, int] = {}
    out = [_check(n, i, seen, where) for i, n in enumerate(names, start=1)]
    if not out:
        raise ConfigError(f"{where} names no concept")
    return out


def read_vocabulary(path: str) -> Vocabulary:
    """Parse and validate a vocabulary file (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"vocabulary file {p} does not exist")
    raw = p.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors) is not part of a name
        raw = raw[3:]
    lines: List[str] = []
    for i, b in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append(b.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}:{i}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        return _from_yaml(p, "\n".join(lines))
    vocab, seen = Vocabulary(), {}  # type: Vocabulary, Dict[str, int]
    if lines and lines[-1] == "":
        lines = lines[:-1]  # the final newline
    for i, text in enumerate(lines, start=1):
        if text.lstrip().startswith("#"):
            continue
        vocab.concepts.append(Concept(_check(text, i, seen, str(p)), line=i))
    if not vocab.concepts:
        raise ConfigError(f"{p}: no concept names")
    return vocab


def _from_yaml(p: Path, text: str) -> Vocabulary:
    import yaml

    try:
        nodes = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from exc
    vocab, seen = Vocabulary(), {}  # type: Vocabulary, Dict[str, int]
    if nodes is None:
        raise ConfigError(f"{p}: no concept names")
    if isinstance(nodes, yaml.SequenceNode):
        for n in nodes.value:
            line = n.start_mark.line + 1
            if not isinstance(n, yaml.ScalarNode):
                raise ConfigError(f"{p}:{line}: expected a concept name")
            vocab.concepts.append(Concept(_check(n.value, line, seen, str(p)), line=line))
    elif isinstance(nodes, yaml.MappingNode):
        data = yaml.safe_load(text)
        for key_node, _ in nodes.value:
            line = key_node.start_mark.line + 1
            name = _check(key_node.value, line, seen, str(p))
            spec = data.get(key_node.value) or {}
            if not isinstance(spec, dict):
                raise ConfigError(f"{p}:{line}: {name!r} must map to {{synonyms: [...], exemplars: DIR}}")
            unknown = set(spec) - {"synonyms", "exemplars"}
            if unknown:
                raise ConfigError(
                    f"{p}:{line}: unknown key(s) {sorted(unknown)} for {name!r}; valid: synonyms, exemplars"
                )
            syn = spec.get("synonyms") or []
            if isinstance(syn, str) or not all(isinstance(s, str) and s.strip() for s in syn):
                raise ConfigError(f"{p}:{line}: synonyms of {name!r} must be a list of non-blank names")
            ex = spec.get("exemplars")
            if ex is not None and not isinstance(ex, str):
                raise ConfigError(f"{p}:{line}: exemplars of {name!r} must be a folder path or URI")
            if ex and "://" not in ex and not Path(ex).is_absolute():
                ex = str((p.parent / ex).resolve())
            vocab.concepts.append(Concept(name, tuple(s.strip() for s in syn), ex, line))
    else:
        raise ConfigError(f"{p}: expected a list of names or a mapping name -> {{synonyms, exemplars}}")
    if not vocab.concepts:
        raise ConfigError(f"{p}: no concept names")
    return vocab
