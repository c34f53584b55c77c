"""ReCo+ in ``reco evaluate``: a trained model scored on the same images, protocol and label mapping
as ReCo (:mod:`cluster.evaluation`), with its provenance (checkpoint, selection, training overlap)."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, replace
from typing import Any, Dict

logger = logging.getLogger(__name__)


def add_model_scores(
    report, model, req, spec, eval_items, protocol, background_concepts, class_map, storage, out, has_bank: bool
) -> None:
    plus = _score_model(model, req, spec, eval_items, protocol, background_concepts, class_map, storage, out)
    if has_bank:
        report["reco"] = {
            k: report[k]
            for k in ("miou", "pixel_accuracy", "seconds_per_image", "images", "mode", "metrics", "label_map")
        }
    else:
        report.update(
            {
                k: plus[k]
                for k in (
                    "metrics",
                    "miou",
                    "pixel_accuracy",
                    "seconds_per_image",
                    "images",
                    "executor",
                    "mode",
                    "label_map",
                    "overlays",
                )
            }
        )
        report.update({"bank": None, "encoders": None, "background_concepts": background_concepts})
    report["reco_plus"] = plus
    report["reco_plus"]["model"] = _model_info(model, req.model, eval_items, storage)
    if has_bank:
        if plus["images"]["evaluated"] != report["images"]["evaluated"]:
            logger.warning(
                "ReCo scored %d images, ReCo+ %d (unreadable images differ?)",
                report["images"]["evaluated"],
                plus["images"]["evaluated"],
            )
        report["comparison"] = {
            "images": [it.id for it in eval_items],
            "protocol": protocol.describe(),
            "note": "ReCo and ReCo+ scored on the same images with the same protocol, "
            "label mapping and confusion-matrix metrics",
        }


def _score_model(
    model, req, spec, eval_items, protocol, background_concepts, class_map, storage, out: str
) -> Dict[str, Any]:
    """ReCo+ (a trained model) on the same images, protocol and label mapping as ReCo.
    Overlays go to OUT/reco_plus/overlays/."""
    from cluster.evaluate import Evaluator, ModelSegmenter, label_map_for, run_in_process, run_on_ray, summarize

    seg = ModelSegmenter(model, req.model)
    label_map = label_map_for(seg.class_names, spec, background_concepts, class_map)
    executor = req.executor
    if executor == "auto":
        executor = "ray" if len(eval_items) > req.ray_min_images else "local"
    from index.storage import join

    plus_out = join(out, "reco_plus")
    if executor == "local":
        rows = run_in_process(eval_items, Evaluator(seg, spec, label_map, protocol), req.overlays, plus_out, storage)
    else:
        from cluster.config import resolve_cluster_config
        from cluster.runtime import init_ray

        cluster = resolve_cluster_config(req.ray_config)
        actors = cluster.segment if not req.actors else replace(cluster.segment, num_actors=req.actors)
        init_ray(cluster.ray)
        rows = run_on_ray(
            eval_items,
            actors,
            req.overlays,
            bank_bytes=None,
            encoders=None,
            config=None,
            spec=spec,
            label_map=label_map,
            protocol=protocol,
            out_uri=plus_out,
            storage_options=storage,
            model_bytes=model.to_bytes(),
            model_source=str(req.model),
        )
    m = summarize(rows, spec)
    return {
        "miou": m["miou"],
        "pixel_accuracy": m["pixel_accuracy"],
        "seconds_per_image": m["seconds_per_image"],
        "images": m["images"],
        "mode": seg.mode,
        "executor": executor,
        "metrics": {k: v for k, v in m.items() if k not in ("images", "seconds_per_image")},
        "label_map": dict(zip(seg.class_names, label_map)),
        "overlays": ["reco_plus/" + str(r["overlay"]) for r in rows if r["overlay"]],
    }


def _norm_uri(uri: str) -> str:

    from index.storage import is_url

    return uri if is_url(uri) else os.path.realpath(os.path.expanduser(uri))


def _model_info(model, uri: str, scored_items, storage) -> Dict[str, Any]:
    """Which model and checkpoint were scored, how that checkpoint was chosen (from the model's
    training provenance), and how many of the scored images it was trained on."""
    prov = dict(model.training or {})
    sel = prov.get("selection")
    why = {
        "last": "the last checkpoint was exported: no checkpoint selection at all",
        "holdout": "the checkpoint with the best mIoU against the pseudo-labels of a held-out slice of the "
        "pseudo-labelled training images: pseudo-labels only, never ground truth of any split",
    }
    info: Dict[str, Any] = {
        "uri": str(uri),
        "classes": list(model.class_names),
        "spec": asdict(model.spec),
        "base_size": model.base_size,
        "encoder_init": prov.get("encoder_init"),
        "config_hash": prov.get("config_hash"),
        "trained": prov.get("date"),
        "checkpoint": {
            "exported": prov.get("checkpoint"),
            "step": prov.get("step"),
            "iterations": (prov.get("config") or {}).get("iterations"),
            "selection": sel or "unknown (the model carries no training provenance)",
            "rule": prov.get("selection_rule"),
            "evaluation_split_used_for_selection": False if sel in why else None,
            "why": why.get(sel, "unknown: not a `reco train` export"),
        },
    }
    labels_uri = prov.get("labels_uri")
    data: Dict[str, Any] = {"labels_uri": labels_uri, "pseudo_label_config_hash": prov.get("pseudo_label_config_hash")}
    if labels_uri:
        try:
            from cluster.train import read_pseudo_labels

            pl = read_pseudo_labels(labels_uri, storage)
            trained = {_norm_uri(smp.uri) for smp in pl.samples}
            overlap = sorted(it.id for it in scored_items if _norm_uri(it.image_uri) in trained)
            data.update(
                {
                    "images": len(pl.samples),
                    "pseudo_label_bank_sha256": pl.settings.get("bank_sha256"),
                    "scored_images_trained_on": len(overlap),
                    "overlap_ids": overlap[:20],
                }
            )
            if overlap:
                logger.warning(
                    "the model was trained on pseudo-labels of %d of the %d scored images",
                    len(overlap),
                    len(scored_items),
                )
        except Exception as exc:  # noqa: BLE001 - provenance is informative; the score does not depend on it
            data.update({"scored_images_trained_on": None, "unchecked": f"{type(exc).__name__}: {exc}"})
    info["training_data"] = data
    return info
