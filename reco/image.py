"""Image decoding and preprocessing (bytes/PIL in, tensors out; no file paths here)."""

from __future__ import annotations

import io
import math
import warnings
from typing import List, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import ImageDecodeError

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]

# Refuse decompression bombs explicitly (PIL's default only warns below 2x the limit).
MAX_PIXELS = 178_956_970


def decode_image(data: bytes, source: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes into an RGB PIL image.

    Greyscale, palette, CMYK, 16-bit and alpha images are converted to RGB (alpha is composited
    on white). Raises :class:`ImageDecodeError` (naming ``source``) for empty, corrupt, truncated
    or oversized inputs, and for bytes that are not an image at all ("not an image").
    """
    if not data:
        raise ImageDecodeError(f"{source}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(f"{source}: {w}x{h} exceeds the {max_pixels}-pixel limit")
            if w < 1 or h < 1:
                raise ImageDecodeError(f"{source}: degenerate size {w}x{h}")
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"{source}: too large to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:  # its message names an anonymous BytesIO: say what it means
        raise ImageDecodeError(
            f"{source}: not an image (no known image format in its {len(data)} bytes, starting {data[:8]!r})"
        ) from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        raise ImageDecodeError(f"{source}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (alpha composited on white, 16-bit scaled)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        arr = (255.0 * (arr - arr.min()) / max(arr.max() - arr.min(), 1.0)).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def to_pil(image: ImageLike) -> Image.Image:
    """PIL image, (H, W, 3) uint8 array or (3, H, W) uint8 tensor -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensors must be (3, H, W), got {tuple(image.shape)}")
        image = image.permute(1, 2, 0).cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if arr.dtype.kind == "f" and arr.max() <= 1.0:
            arr = (arr * 255.0).round()
        arr = arr.clip(0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image arrays must be (H, W, 3), got {arr.shape}")
    return Image.fromarray(arr, mode="RGB")


def pil_to_float(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> (3, H, W) float32 in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def resize_center_crop(img: Image.Image, size: int) -> torch.Tensor:
    """Shorter side -> ``size`` (bicubic), centre crop to ``size x size``: (3, size, size) in [0, 1]."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return pil_to_float(img.crop((left, top, left + size, top + size)))


def inference_size(hw: Tuple[int, int], size: int, patch: int) -> Tuple[int, int]:
    """Shorter side -> ``size``, both sides rounded to a multiple of ``patch`` (at least one patch)."""
    h, w = hw
    scale = size / min(h, w)
    return (max(patch, round(h * scale / patch) * patch), max(patch, round(w * scale / patch) * patch))


def resize_for_inference(img: Image.Image, size: int, patch: int) -> torch.Tensor:
    """(3, h', w') float in [0, 1] with the shorter side ~``size`` and sides multiples of ``patch``."""
    h, w = inference_size((img.size[1], img.size[0]), size, patch)
    return pil_to_float(img.resize((w, h), Image.Resampling.BICUBIC))


Box = Tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, right/bottom exclusive


def _starts(length: int, side: int, step: int) -> List[int]:
    """Evenly spaced starts from 0 to ``length - side`` (both edges flush), about ``step`` apart
    (the nearest whole number of steps) and never more than ``side`` apart (no pixel uncovered)."""
    if length <= side:
        return [0]
    span = length - side
    gaps = max(1, round(span / step), math.ceil(span / side))
    return [round(i * span / gaps) for i in range(gaps + 1)]


def window_boxes(hw: Tuple[int, int], fraction: float, stride: float) -> List[Box]:
    """Square sliding windows over an (H, W) image, row-major.

    The side is ``fraction`` of the shorter side (at least 1 px); along each axis the first and
    last windows are flush with the edges and the starts between are evenly spaced about
    ``stride`` x side px apart (never more than a side apart), so every pixel is covered.
    ``fraction`` 1 gives windows of side min(H, W) along the longer side.
    """
    h, w = hw
    if not (0 < fraction <= 1) or not (0 < stride <= 1):
        raise ValueError(f"window fraction and stride must be in (0, 1], got {fraction}, {stride}")
    side = max(1, round(fraction * min(h, w)))
    step = max(1, round(stride * side))
    return [(x, y, x + side, y + side) for y in _starts(h, side, step) for x in _starts(w, side, step)]


def scale_box(box: Box, src_hw: Tuple[int, int], dst_hw: Tuple[int, int]) -> Box:
    """``box`` in an (H, W) image mapped onto a (H', W') grid of the same image (at least 1 px)."""
    (sh, sw), (dh, dw) = src_hw, dst_hw
    x0, y0, x1, y1 = box
    nx0, ny0 = min(dw - 1, round(x0 * dw / sw)), min(dh - 1, round(y0 * dh / sh))
    return nx0, ny0, max(nx0 + 1, round(x1 * dw / sw)), max(ny0 + 1, round(y1 * dh / sh))


def snap_to_patch(size: int, patch: int) -> int:
    """``size`` rounded to a multiple of ``patch`` (at least one patch)."""
    return max(patch, round(size / patch) * patch)


def resize_window(img: Image.Image, box: Box, size: int, patch: int) -> torch.Tensor:
    """The ``box`` of ``img`` resized (bicubic) to ``size`` px square, snapped to a multiple of
    ``patch``: (3, s, s) in [0, 1], exactly as an archive image of that size is encoded."""
    return resize_center_crop(img.crop(box), snap_to_patch(size, patch))
