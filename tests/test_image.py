import io

import numpy as np
import pytest
from PIL import Image

from reco.errors import ImageDecodeError
from reco.image import decode_image, inference_size, resize_center_crop, resize_for_inference


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_decodes_common_modes_to_rgb():
    rgb = Image.fromarray(np.full((10, 12, 3), 100, np.uint8))
    assert decode_image(_encode(rgb, "JPEG")).mode == "RGB"
    assert decode_image(_encode(rgb.convert("L"), "PNG")).mode == "RGB"
    cmyk = decode_image(_encode(rgb.convert("CMYK"), "JPEG"))
    assert cmyk.mode == "RGB" and cmyk.size == (12, 10)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    out = decode_image(_encode(rgba, "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white background
    assert decode_image(_encode(rgb.convert("P"), "GIF")).mode == "RGB"
    i16 = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    assert decode_image(_encode(i16, "PNG")).mode == "RGB"
    assert decode_image(_encode(Image.new("RGB", (1, 1)), "PNG")).size == (1, 1)


@pytest.mark.parametrize(
    "data, why",
    [
        (b"", "empty"),
        (b"not an image at all", "not an image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 20, "not an image|cannot decode"),
    ],
)
def test_bad_bytes_raise_clear_errors(data, why):
    with pytest.raises(ImageDecodeError, match=why):
        decode_image(data, source="x.jpg")


def test_text_file_is_named_and_called_not_an_image():
    """Issue #8/12: the reason read ``cannot identify image file <_io.BytesIO object at 0x...>``."""
    with pytest.raises(ImageDecodeError) as info:
        decode_image(b"just some notes\n", source="/data/notes.jpg")
    msg = str(info.value)
    assert msg.startswith("/data/notes.jpg: not an image") and "BytesIO" not in msg and "0x" not in msg


def test_truncated_jpeg_is_an_error_naming_the_source():
    data = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    with pytest.raises(ImageDecodeError, match="cut.jpg"):
        decode_image(data[: len(data) // 2], source="cut.jpg")


def test_oversized_image_is_refused():
    data = _encode(Image.new("L", (200, 200)), "PNG")
    with pytest.raises(ImageDecodeError, match="limit|large"):
        decode_image(data, max_pixels=1000)


def test_resizes():
    img = Image.new("RGB", (300, 200))
    assert resize_center_crop(img, 224).shape == (3, 224, 224)
    assert inference_size((200, 300), 320, 14) == (322, 476)
    assert resize_for_inference(img, 320, 16).shape == (3, 320, 480)
    assert resize_center_crop(Image.new("RGB", (3, 2)), 32).shape == (3, 32, 32)
