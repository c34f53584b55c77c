"""ReCo+ segmentation model in plain torch: DeepLabV3+ (segmentation-models-pytorch), its
encoder weights, export (safetensors + JSON, never pickle), reload and inference. No Ray here.

**Export format** (a folder, :meth:`SegModel.save` / :meth:`SegModel.to_bytes`)::

    model.safetensors   the state dict of the smp model; its header metadata holds a copy of
                        model.json under the key ``reco_segmodel`` (the file alone is enough)
    model.json          format/version, architecture (smp class + kwargs), class names,
                        normalisation, inference settings, training provenance, and the
                        sha256 of model.safetensors (checked on load)

**Inference** (:meth:`SegModel.predict`): the image is resized so that its shorter side is
``base_size`` (the training scale before augmentation), normalised, padded to a multiple of the
encoder's output stride, segmented, the padding removed, the logits upsampled (bilinear) to the
image's own size and arg-maxed in float32. Labels index ``class_names``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ConfigError, WeightsMismatchError, WeightsNotFoundError

FORMAT = "reco-segmodel"
VERSION = 1
ARCHITECTURE = "DeepLabV3Plus"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
_HEADER_KEY = "reco_segmodel"
# keys of classifier heads found in ImageNet checkpoints; smp encoders have no classifier
_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.", "last_linear.", "head_drop.", "conv_head.")


@dataclass(frozen=True)
class SegModelSpec:
    """The architecture: everything needed to rebuild the module before loading its weights."""

    encoder: str
    num_classes: int
    output_stride: int = 8
    decoder_channels: int = 256

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.output_stride not in (8, 16):
            raise ConfigError(f"output_stride must be 8 or 16 (DeepLabV3+), got {self.output_stride}")
        if self.decoder_channels < 1:
            raise ConfigError(f"decoder_channels must be >= 1, got {self.decoder_channels}")

    def smp_kwargs(self) -> Dict[str, Any]:
        return {
            "encoder_name": self.encoder,
            "encoder_weights": None,
            "encoder_output_stride": self.output_stride,
            "decoder_channels": self.decoder_channels,
            "classes": self.num_classes,
        }


def check_encoder(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is an encoder smp can build: one of smp's own
    (``resnet18``, ``resnet101``, ``mobilenet_v2``, ...) or ``tu-<timm model>``."""
    import segmentation_models_pytorch as smp

    if name.startswith("tu-"):
        import timm

        if timm.is_model(name[3:]):
            return
        raise ConfigError(f"unknown encoder {name!r}: {name[3:]!r} is not a timm model")
    names = smp.encoders.get_encoder_names()
    if name not in names:
        close = [n for n in names if n.split("_")[0][:4] == name.split("_")[0][:4]][:8]
        raise ConfigError(
            f"unknown encoder {name!r}; smp encoders include {', '.join(close or names[:12])} (or tu-<timm model name>)"
        )


def build_model(spec: SegModelSpec) -> torch.nn.Module:
    """A randomly initialised DeepLabV3+ (never downloads: ``encoder_weights=None``)."""
    import segmentation_models_pytorch as smp

    check_encoder(spec.encoder)
    return smp.DeepLabV3Plus(**spec.smp_kwargs())


def required_multiple(model: torch.nn.Module) -> int:
    """Input sides must be multiples of this (the encoder's output stride)."""
    return int(getattr(getattr(model, "encoder", None), "output_stride", 32))


# ---------------------------------------------------------------------------------------------
# encoder weights (ImageNet checkpoints given as a local file)


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Tensors of a weight file: ``.safetensors``, or a torch file read with ``weights_only=True``
    (plain tensors only; no pickled code runs). A ``state_dict``/``model`` wrapper is unwrapped."""
    p = Path(path)
    if not p.is_file():
        raise WeightsNotFoundError(f"encoder weights {p} do not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsMismatchError(f"cannot read encoder weights {p}: {type(exc).__name__}: {exc}") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatchError(f"{p} is not a state dict of tensors")
    return dict(state)


def load_encoder_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str = "<weights>") -> int:
    """Load an ImageNet checkpoint into ``model.encoder`` (torchvision/timm key names; prefixes
    ``module.``/``encoder.`` and classifier heads are dropped; timm ``tu-`` encoders get their
    ``model.`` prefix). Every encoder tensor must be matched with its shape and be finite, else
    :class:`WeightsMismatchError`. Returns the number of tensors loaded."""
    enc = model.get_submodule("encoder")
    own = enc.state_dict()
    clean = {}
    for k, v in state.items():
        for pre in ("module.", "encoder."):
            if k.startswith(pre):
                k = k[len(pre) :]
        if not k.startswith(_CLASSIFIER_PREFIXES):
            clean[k] = v
    best: Dict[str, torch.Tensor] = {}
    for prefix in ("", "model."):
        cand = {prefix + k: v for k, v in clean.items()}
        if len(set(cand) & set(own)) > len(set(best) & set(own)):
            best = cand
    missing = [k for k in own if k not in best and not k.endswith("num_batches_tracked")]
    wrong = [k for k in own if k in best and tuple(best[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        raise WeightsMismatchError(
            f"{source} does not fit encoder {type(enc).__name__}: {len(missing)} tensors missing "
            f"(e.g. {missing[:3]}), {len(wrong)} of another shape (e.g. {wrong[:3]})"
        )
    load = {k: best[k].to(own[k].dtype) for k in own if k in best}
    bad = [k for k, v in load.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsMismatchError(f"{source} holds NaN/Inf in {len(bad)} encoder tensors (e.g. {bad[:3]})")
    enc.load_state_dict(load, strict=False)
    return len(load)


def file_sha256(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# inference


def preprocess(
    image: Image.Image, base_size: int, mean: Sequence[float], std: Sequence[float], multiple: int
) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(1, 3, H', W') normalised tensor of ``image`` resized to shorter side ``base_size`` and
    zero-padded (= the mean colour) to multiples of ``multiple``; and the unpadded (h, w)."""
    w, h = image.size
    s = base_size / min(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    img = image.convert("RGB").resize((nw, nh), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    ph, pw = math.ceil(nh / multiple) * multiple, math.ceil(nw / multiple) * multiple
    x = F.pad(x, (0, pw - nw, 0, ph - nh))
    return x.unsqueeze(0), (nh, nw)


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    image: Image.Image,
    base_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: Union[str, torch.device] = "cpu",
    bf16: bool = False,
) -> torch.Tensor:
    """(C, H, W) float32 logits of ``image`` at its own size (see the module docstring)."""
    was_training = model.training
    model.eval()
    try:
        x, (nh, nw) = preprocess(image, base_size, mean, std, required_multiple(model))
        dev = torch.device(device)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x.to(dev))
        out = out.float()[:, :, :nh, :nw]
        w, h = image.size
        return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)[0].cpu()
    finally:
        model.train(was_training)


class SegModel:
    """A trained ReCo+ model: ``predict(pil_image) -> (labels (H, W) int64, class_names)``."""

    def __init__(
        self,
        model: torch.nn.Module,
        spec: SegModelSpec,
        class_names: Sequence[str],
        base_size: int = 320,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        training: Optional[Mapping[str, Any]] = None,
        device: Union[str, torch.device] = "cpu",
        bf16: bool = False,
    ):
        if len(class_names) != spec.num_classes:
            raise ConfigError(f"{len(class_names)} class names for a {spec.num_classes}-class model")
        self.model = model.to(device).eval()
        self.spec = spec
        self.class_names = list(class_names)
        self.base_size = int(base_size)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.training = dict(training or {})
        self.device = torch.device(device)
        self.bf16 = bool(bf16)

    # -- inference ----------------------------------------------------------------------------
    def logits(self, image: Image.Image) -> torch.Tensor:
        return predict_logits(self.model, image, self.base_size, self.mean, self.std, self.device, self.bf16)

    def predict(self, image: Image.Image) -> Tuple[np.ndarray, List[str]]:
        """Labels (H, W) int64 indexing the returned class names, at the image's own size."""
        from .image import to_pil

        return self.logits(to_pil(image)).argmax(0).numpy().astype(np.int64), list(self.class_names)

    def to(self, device: Union[str, torch.device], bf16: Optional[bool] = None) -> "SegModel":
        self.device = torch.device(device)
        self.model.to(self.device)
        if bf16 is not None:
            self.bf16 = bf16
        return self

    # -- export / load ------------------------------------------------------------------------
    def metadata(self) -> Dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "architecture": ARCHITECTURE,
            "spec": asdict(self.spec),
            "smp_kwargs": self.spec.smp_kwargs(),
            "classes": self.class_names,
            "normalisation": {"input": "RGB scaled to [0, 1]", "mean": list(self.mean), "std": list(self.std)},
            "inference": {
                "base_size": self.base_size,
                "resize": "shorter side to base_size, bilinear",
                "pad_to_multiple_of": required_multiple(self.model),
                "upsample": "bilinear logits to the input size, argmax in float32",
            },
            "training": self.training,
        }

    def to_bytes(self) -> Tuple[bytes, bytes]:
        """(model.safetensors bytes, model.json bytes)."""
        from safetensors.torch import save

        meta = self.metadata()
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        weights = save(state, metadata={_HEADER_KEY: json.dumps(meta, sort_keys=True)})
        meta["weights_sha256"] = hashlib.sha256(weights).hexdigest()
        return weights, json.dumps(meta, indent=2).encode()

    @classmethod
    def from_bytes(
        cls,
        weights: bytes,
        meta_json: Optional[bytes] = None,
        source: str = "<bytes>",
        device: Union[str, torch.device] = "cpu",
    ) -> "SegModel":
        """Rebuild from :meth:`to_bytes` output (``meta_json`` None: the copy in the header)."""
        from safetensors.torch import load

        try:
            state = load(weights)
        except Exception as exc:
            raise WeightsMismatchError(f"{source} is not a safetensors model file: {exc}") from exc
        meta_text: Union[str, bytes, None] = meta_json
        if meta_text is None:
            meta_text = _header_metadata(weights)
            if meta_text is None:
                raise WeightsMismatchError(
                    f"{source}: no {_HEADER_KEY} metadata in the safetensors header and no {META_FILE}"
                )
        try:
            meta = json.loads(meta_text)
        except json.JSONDecodeError as exc:
            raise WeightsMismatchError(f"{source}: model.json is not valid JSON: {exc}") from exc
        if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
            raise WeightsMismatchError(
                f"{source} is not a {FORMAT} v<={VERSION} model "
                f"(format {meta.get('format')!r}, version {meta.get('version')!r})"
            )
        want = meta.get("weights_sha256")
        if want and hashlib.sha256(weights).hexdigest() != want:
            raise WeightsMismatchError(f"{source}: model.safetensors does not match the sha256 in model.json")
        spec = SegModelSpec(**meta["spec"])
        model = build_model(spec)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsMismatchError(f"{source}: weights do not fit {spec}: {exc}") from exc
        norm = meta.get("normalisation", {})
        return cls(
            model,
            spec,
            meta["classes"],
            meta.get("inference", {}).get("base_size", 320),
            norm.get("mean", IMAGENET_MEAN),
            norm.get("std", IMAGENET_STD),
            meta.get("training"),
            device,
        )

    def save(self, folder: Union[str, Path]) -> Path:
        """Write model.safetensors then model.json into a local folder (atomic renames)."""
        import os

        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        weights, meta = self.to_bytes()
        for name, data in ((WEIGHTS_FILE, weights), (META_FILE, meta)):
            tmp = d / f".{name}.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, d / name)
        return d

    @classmethod
    def load(cls, folder: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "SegModel":
        d = Path(folder)
        w = d / WEIGHTS_FILE if d.is_dir() else d
        if not w.is_file():
            raise WeightsNotFoundError(f"{folder} holds no {WEIGHTS_FILE}")
        m = w.with_name(META_FILE)
        return cls.from_bytes(w.read_bytes(), m.read_bytes() if m.is_file() else None, str(folder), device)


def _header_metadata(data: bytes) -> Optional[str]:
    """The ``reco_segmodel`` JSON string in a safetensors header (None when absent)."""
    import struct

    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    return (header.get("__metadata__") or {}).get(_HEADER_KEY)


__all__ = [
    "SegModel",
    "SegModelSpec",
    "build_model",
    "check_encoder",
    "load_encoder_weights",
    "read_state_dict",
    "predict_logits",
    "preprocess",
    "required_multiple",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
