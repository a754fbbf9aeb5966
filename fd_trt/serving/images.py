"""Images that arrive over HTTP: base64 or multipart PNG/JPEG, decoded with size and pixel limits.

A client's image is untrusted input: it is refused before decoding when its bytes are over
``max_bytes``, when it is not PNG or JPEG (by its magic bytes, not its name), or when its header
declares more than ``max_pixels`` pixels (a decompression bomb never gets decoded). Masks follow
fd_trt's convention (white: repaint) or, for OpenAI's edits API, OpenAI's (transparent: repaint).

[`parse_multipart()`][fd_trt.serving.images.parse_multipart] reads a ``multipart/form-data`` body (as OpenAI's client sends image edits)
with the standard library, so that the server needs no extra dependency for it.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any

from fd_trt.errors import InputError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class ImageLimits:
    """What one uploaded image may be.

    Attributes:
        max_bytes: largest encoded image.
        max_pixels: most pixels (width x height) its header may declare.
    """

    max_bytes: int = 4 * 1024 * 1024
    max_pixels: int = 1024 * 1024


def image_format(data: bytes) -> str | None:
    """``"PNG"``, ``"JPEG"`` or ``None``, from the magic bytes."""
    if data.startswith(PNG_MAGIC):
        return "PNG"
    if data.startswith(JPEG_MAGIC):
        return "JPEG"
    return None


def b64_bytes(value: str, field: str, limits: ImageLimits) -> bytes:
    """The bytes of a base64 image field (a ``data:image/...;base64,`` prefix is allowed).

    Raises:
        InputError: for text that is not base64 or decodes to more than ``limits.max_bytes``.
    """
    if not isinstance(value, str):
        raise InputError(f"{field} must be a base64 string of a PNG or JPEG image")
    if value.startswith("data:"):
        head, _, value = value.partition(",")
        if ";base64" not in head:
            raise InputError(f"{field}: a data URL must be base64 (data:image/png;base64,...)")
    if len(value) > (limits.max_bytes * 4) // 3 + 8:
        raise InputError(f"{field} is over {limits.max_bytes} bytes; send a smaller image")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{field} is not valid base64") from None


def decode_image(data: bytes, field: str, limits: ImageLimits, mode: str = "RGB") -> Any:
    """A PIL image from PNG/JPEG bytes, checked against ``limits`` before its pixels are decoded.

    Raises:
        InputError: naming the field and what is wrong.
    """
    from PIL import Image

    if len(data) > limits.max_bytes:
        raise InputError(f"{field} has {len(data)} bytes; the limit is {limits.max_bytes}")
    fmt = image_format(data)
    if fmt is None:
        raise InputError(f"{field} is not a PNG or JPEG image")
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            w, h = img.size
            if w < 1 or h < 1 or w * h > limits.max_pixels:
                raise InputError(f"{field} is {w}x{h} pixels; the limit is {limits.max_pixels} pixels (width x height)")
            out = img.convert(mode) if mode != "keep" else img.copy()
            out.load()
            return out
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"{field} could not be decoded as {fmt} ({e.__class__.__name__})") from None


def openai_mask(mask: Any, image: Any) -> Any:
    """OpenAI's edit mask (transparent where the image is edited) as fd_trt's (white where repainted).

    A mask without an alpha channel is read as fd_trt's own (white: repaint).

    Raises:
        InputError: when the mask's size differs from the image's.
    """
    if tuple(mask.size) != tuple(image.size):
        raise InputError(
            f"the mask is {mask.size[0]}x{mask.size[1]} and the image {image.size[0]}x{image.size[1]}: "
            "they must be the same size"
        )
    if mask.mode in ("RGBA", "LA") or "transparency" in mask.info:
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a < 128 else 0).convert("L")
    return mask.convert("L")


def parse_size(value: Any, field: str = "size") -> tuple[int, int] | None:
    """OpenAI's ``size``, ``"WIDTHxHEIGHT"``, as ``(height, width)``; ``None``/``"auto"`` for the default.

    Raises:
        InputError: for anything else.
    """
    if value is None or value == "auto":
        return None
    if isinstance(value, str):
        parts = value.lower().split("x")
        if len(parts) == 2 and all(p.isdigit() and len(p) <= 5 for p in parts):
            w, h = int(parts[0]), int(parts[1])
            return h, w
    raise InputError(f"{field} must look like WIDTHxHEIGHT (e.g. 512x512) or 'auto', got {str(value)[:40]!r}")


@dataclass
class FormFile:
    """One file part of a multipart form."""

    filename: str
    content_type: str
    data: bytes


def parse_multipart(body: bytes, content_type: str, max_parts: int = 32) -> dict[str, list[Any]]:
    """The fields of a ``multipart/form-data`` body: name -> values (``str`` or [`FormFile`][fd_trt.serving.images.FormFile]).

    The body is already bounded by the server's body limit. A name like ``image[]`` is read as
    ``image``.

    Raises:
        InputError: a body that is not multipart/form-data with a boundary, or too many parts.
    """
    from email.parser import BytesParser
    from email.policy import HTTP

    if "multipart/form-data" not in content_type.lower() or "boundary=" not in content_type.lower():
        raise InputError("the body must be multipart/form-data with a boundary")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    try:
        msg = BytesParser(policy=HTTP).parsebytes(head + body)
    except Exception as e:  # noqa: BLE001 - the stdlib parser raises many types on garbage
        raise InputError(f"the multipart body could not be parsed ({e.__class__.__name__})") from None
    if not msg.is_multipart():
        raise InputError("the multipart body holds no parts")
    fields: dict[str, list[Any]] = {}
    parts = list(msg.iter_parts())
    if len(parts) > max_parts:
        raise InputError(f"the form has {len(parts)} parts; the limit is {max_parts}")
    for part in parts:
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            continue
        name = name[:-2] if name.endswith("[]") else name
        payload = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None or part.get_content_type() not in ("text/plain",):
            value: Any = FormFile(str(filename or name), part.get_content_type(), payload)
        else:
            value = payload.decode(part.get_content_charset() or "utf-8", "replace")
        fields.setdefault(name, []).append(value)
    return fields


__all__ = [
    "FormFile",
    "ImageLimits",
    "b64_bytes",
    "decode_image",
    "image_format",
    "openai_mask",
    "parse_multipart",
    "parse_size",
]
