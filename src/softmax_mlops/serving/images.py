"""PNG and JPEG files as the model sees images: 8-bit grayscale, 28x28, dark background.

Shared by the batch CLI and the HTTP service, so both decode a file the same way. Pillow's plain
``convert("L")`` is wrong for several modes a PNG or JPEG can open in, and the model then answers 200 OK with
wrong classes: 16-bit grayscale (``I;16``/``I``) is clipped to white instead of scaled, and transparent pixels
keep whatever colour they hide. Here every mode maps to the 8-bit gray the model was trained on:
- 16-bit gray is scaled by 255/65535;
- alpha (``LA``, ``PA``, ``RGBA``, a palette or gray with a transparent colour) is composited over black, the
  Fashion-MNIST background;
- CMYK goes through RGB, palettes through their colours, 1-bit to 0/255.

Only PNG and JPEG are opened (Pillow would otherwise try every format it knows, EPS through Ghostscript
among them), and an image whose header declares more than ``max_pixels`` is refused before it is decoded.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import first_line

FORMATS = ("PNG", "JPEG")
SIZE = (28, 28)


class ImageError(ValueError):
    """Not a readable PNG/JPEG; the message says why."""


class ImageTooLarge(ImageError):
    """The header declares more pixels than allowed; nothing was decoded."""


def to_gray(image) -> np.ndarray:  # noqa: ANN001 - a PIL.Image.Image; PIL is imported lazily
    """Any Pillow mode a PNG or JPEG opens in -> uint8 grayscale at the image's own size."""
    from PIL import Image

    mode = image.mode
    if mode.startswith("I") or mode == "F":  # 16-bit PNG gray: I;16, I;16B or I (values 0..65535)
        values = np.asarray(image, dtype=np.float64)
        return np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    if mode == "CMYK":
        image = image.convert("RGB")
    if image.mode in ("LA", "PA", "RGBA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return np.asarray(image.convert("L"), dtype=np.uint8)


def decode(source: bytes | Path | BinaryIO, max_pixels: int | None = None) -> np.ndarray:
    """A PNG/JPEG file (bytes, path or file object) -> uint8 [28, 28]. Raises ImageError."""
    from PIL import Image, UnidentifiedImageError

    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(fp, formats=FORMATS) as image:
            width, height = image.size  # from the header: nothing is decoded yet
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(f"image of {width}x{height} pixels is over the limit of {max_pixels} pixels")
            gray = Image.fromarray(to_gray(image), "L")
            return np.asarray(gray.resize(SIZE, Image.Resampling.BILINEAR), dtype=np.uint8)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = first_line(exc)
        raise ImageError(f"not a readable PNG or JPEG image ({reason})") from None
