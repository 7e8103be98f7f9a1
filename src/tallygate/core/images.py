"""Image sizes from the first bytes of PNG, GIF, WebP and JPEG files, as requests embed them
(data URLs, base64 blocks), for the providers' image-token formulas. Pure."""

from __future__ import annotations

import base64
import binascii
import struct


def image_size_from_data_url(url: str) -> tuple[int, int] | None:
    if not url.startswith("data:") or ";base64," not in url[:100]:
        return None
    return image_size(b64_prefix(url.split(",", 1)[1]))


def b64_prefix(data: str, limit: int = 256 * 1024) -> bytes:
    """Enough of a base64 image to find its size (JPEG may put EXIF before its frame header)."""
    prefix = data[: limit - limit % 4]
    try:
        return base64.b64decode(prefix + "=" * (-len(prefix) % 4), validate=False)
    except (binascii.Error, ValueError):
        return b""


def image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG, GIF, WebP or JPEG header; None when unreadable, or when a
    side is 0 (no image a provider would bill as one)."""
    size = _header_size(data)
    return size if size is not None and min(size) > 0 else None


def _header_size(data: bytes) -> tuple[int, int] | None:
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            width, height = struct.unpack(">II", data[16:24])
            return width, height
        if data[:6] in (b"GIF87a", b"GIF89a"):
            width, height = struct.unpack("<HH", data[6:10])
            return width, height
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_size(data)
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
    except struct.error:
        return None
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return None
