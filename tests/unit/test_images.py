"""Every Pillow mode a PNG or JPEG can open in decodes to the 8-bit gray the model was trained on: a generated
image per mode, saved for real and decoded by images.decode (which predict and serve both use)."""

import io

import numpy as np
import pytest
from PIL import Image

from softmax_mlops.serving.images import ImageError, decode, to_gray

# gray levels 0..254 (255 is kept free for a transparent palette index), two dark rows of background
REFERENCE = np.minimum(np.arange(28 * 28).reshape(28, 28) * 7 % 256, 254).astype(np.uint8)
REFERENCE[:2] = 0
GRAY_PALETTE = [level for i in range(256) for level in (i, i, i)]


def saved(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def gray16(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array.astype(np.uint16) * 257)  # 16-bit gray: 0..65535


def with_alpha(mode: str) -> Image.Image:
    """The reference with its background transparent, and a bright colour hidden under the transparency."""
    hidden = np.where(REFERENCE == 0, 200, REFERENCE).astype(np.uint8)
    alpha = np.where(REFERENCE == 0, 0, 255).astype(np.uint8)
    gray_alpha = Image.merge("LA", [Image.fromarray(hidden), Image.fromarray(alpha)])
    return gray_alpha.convert(mode)


def palette(pixels: np.ndarray) -> Image.Image:
    image = Image.fromarray(pixels).convert("P")  # an L image becomes P with its own gray levels
    image.putpalette(GRAY_PALETTE)
    return image


def palette_alpha() -> Image.Image:
    hidden, alpha = with_alpha("LA").split()
    raw = np.stack([np.asarray(hidden), np.asarray(alpha)], axis=-1)
    image = Image.frombytes("PA", (28, 28), raw.tobytes())
    image.putpalette(GRAY_PALETTE)
    return image


def with_transparent_palette_index() -> Image.Image:
    image = palette(np.where(REFERENCE == 0, 255, REFERENCE).astype(np.uint8))
    image.info["transparency"] = 255
    return image


MODES = {
    "L": lambda: Image.fromarray(REFERENCE),
    "RGB": lambda: Image.fromarray(REFERENCE).convert("RGB"),
    "P (palette)": lambda: palette(REFERENCE),
    "I;16 (16-bit gray)": lambda: gray16(REFERENCE),
    "LA (gray + alpha)": lambda: with_alpha("LA"),
    "RGBA": lambda: with_alpha("RGBA"),
    "P with a transparent index": with_transparent_palette_index,
}


@pytest.mark.parametrize("make", MODES.values(), ids=MODES.keys())
def test_png_modes_decode_to_the_8_bit_reference(make):
    image = make()
    data = saved(image, "PNG", **({"transparency": image.info["transparency"]} if "transparency" in image.info else {}))
    decoded = decode(data)
    assert decoded.dtype == np.uint8 and decoded.shape == (28, 28)
    assert np.abs(decoded.astype(int) - REFERENCE).max() <= 1, f"{image.mode} decodes off the reference"


def test_32_bit_gray_with_16_bit_values_is_scaled():
    """Pillow versions before 10.1 (and some encoders) open 16-bit gray PNGs as mode I, which PNG cannot save:
    the decoder's mapping is checked on the in-memory image."""
    assert np.array_equal(to_gray(gray16(REFERENCE).convert("I")), REFERENCE)


def test_palette_with_alpha_is_composited_over_black():
    """PA is what Pillow makes of some palette images in memory; PNG cannot hold it, so check the mapping."""
    assert np.abs(to_gray(palette_alpha()).astype(int) - REFERENCE).max() <= 1


def test_bilevel_png_decodes_to_black_and_white():
    decoded = decode(saved(Image.fromarray(REFERENCE).convert("1")))
    assert set(np.unique(decoded)) <= {0, 255}


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_jpeg_modes_decode_close_to_the_reference(mode):
    decoded = decode(saved(Image.fromarray(REFERENCE).convert(mode), "JPEG", quality=100))
    assert np.abs(decoded.astype(int) - REFERENCE).mean() < 3, mode  # JPEG is lossy


def test_16_bit_gray_is_scaled_not_clipped():
    """Pillow's own convert("L") clips 16-bit values to 255: the whole image came out white."""
    naive = np.asarray(gray16(REFERENCE).convert("L"))
    assert (naive == 255).mean() > 0.9
    assert np.array_equal(decode(saved(gray16(REFERENCE))), REFERENCE)


def test_over_the_pixel_limit_is_refused_from_the_header():
    with pytest.raises(ImageError, match="over the limit"):
        decode(saved(Image.new("L", (5000, 5000))), max_pixels=1_000_000)


def test_other_formats_are_refused():
    with pytest.raises(ImageError, match="not a readable PNG or JPEG"):
        decode(saved(Image.fromarray(REFERENCE), "BMP"))
