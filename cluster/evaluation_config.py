"""``reco evaluate``'s configuration: a preset, a YAML file with ``bank:`` / ``segmenter:``
sections, ``--set SECTION.KEY=VALUE`` overrides and the flags, resolved into frozen configs."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, Optional, Sequence, Tuple

from reco.config import BankConfig, CRFConfig, SegmenterConfig, from_dict, preset, to_dict
from reco.errors import ConfigError


def resolve_configs(
    preset_name: str = "default",
    config_path: Optional[str] = None,
    sets: Sequence[str] = (),
    k: Optional[int] = None,
    crf: bool = False,
    background_threshold: Optional[str] = None,
) -> Tuple[BankConfig, SegmenterConfig, Optional[str]]:
    """Preset, then the YAML sections (``bank:`` / ``segmenter:``), then ``--set`` items, then the
    flags. Returns (bank, segmenter, 'cv' or None)."""
    from cluster.config import load_yaml_mapping

    bank_cfg, seg_cfg = preset(preset_name)
    data = load_yaml_mapping(config_path, "config file") if config_path else {}
    unknown = set(data) - {"bank", "segmenter"}
    if unknown:
        raise ConfigError(f"{config_path}: unknown top-level key(s) {sorted(unknown)}; expected bank, segmenter")
    sections = {"bank": dict(data.get("bank") or {}), "segmenter": dict(data.get("segmenter") or {})}
    for item in sets or []:
        _apply_set(sections, item)
    if sections["bank"]:
        bank_cfg = from_dict(BankConfig, {**to_dict(bank_cfg), **sections["bank"]}, "bank")
    if sections["segmenter"]:
        seg = {**to_dict(seg_cfg), **sections["segmenter"]}
        if isinstance(sections["segmenter"].get("crf"), dict) and seg_cfg.crf is not None:
            seg["crf"] = {**to_dict(seg_cfg.crf), **sections["segmenter"]["crf"]}
        seg_cfg = from_dict(SegmenterConfig, seg, "segmenter")
    if k:
        bank_cfg = replace(bank_cfg, k=k)
    if crf and seg_cfg.crf is None:
        seg_cfg = replace(seg_cfg, crf=CRFConfig())
    threshold_cv = None
    if background_threshold is not None:
        if str(background_threshold).strip().lower() == "cv":
            threshold_cv = "cv"
            if seg_cfg.crf is not None:
                raise ConfigError("--background-threshold cv cannot be combined with the CRF")
        else:
            try:
                value = float(background_threshold)
            except ValueError:
                value = float("nan")
            if not 0.0 <= value <= 1.0:  # NaN fails too
                raise ConfigError(
                    f"--background-threshold must be a number in [0, 1] or 'cv', got {background_threshold!r}"
                )
            seg_cfg = replace(seg_cfg, background_threshold=value)
    return bank_cfg, seg_cfg, threshold_cv


def _apply_set(sections: Dict[str, Dict[str, Any]], item: str) -> None:
    """``section.key[.sub]=value`` (value parsed as YAML) into the config sections."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
    path, value = item.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) < 2 or parts[0] not in sections:
        raise ConfigError(f"--set {item!r}: the key must start with bank. or segmenter.")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: {exc}") from exc
    node = sections[parts[0]]
    for key in parts[1:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {key} is not a section")
    node[parts[-1]] = parsed
