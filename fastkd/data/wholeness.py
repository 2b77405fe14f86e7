"""Is this the whole encoded image? Its structure checked from its bytes, no pixel decoded.

Why: DALI (nvidia-dali 2.4) crashes the whole process on some truncated files (a race in its
prefetch threads: no error to catch), and decodes others without a word when the view's crop
lies before the cut (a baseline JPEG, an uncompressed TIFF) where PIL refuses them. So both view
loaders ask ``incomplete`` about every file's bytes before a decoder sees them: a cut or damaged
file never reaches DALI, and both backends refuse (or skip) the same files for the same reason.
What the structure cannot show (damaged compressed data in a whole file) is the decoders' to find.

The format is told by the bytes' signature, as the decoders tell it (not by the file's name):

- PNG: every chunk lies in the file with a matching CRC, IHDR first, up to IEND.
- JPEG: the marker segments up to the first scan lie in the file (an EXIF thumbnail's end marker
  is inside one), then scans and the segments between them up to the end-of-image marker (FF D9),
  which entropy-coded data cannot hold: a 0xFF there is stuffed as FF 00, restarts are FF D0-D7.
- BMP, binary PBM/PGM/PPM: the file holds the pixels its header describes.
- WebP: the file holds the size its RIFF header states.
- TIFF: the first directory (the image both decoders read) and its strips or tiles lie in the file.
- anything else (ASCII PNM among it): not checked here.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Callable

import numpy as np

Check = Callable[[memoryview], "str | None"]

_PNG = b"\x89PNG\r\n\x1a\n"
# A JPEG marker in or after entropy-coded data: FF, then neither a stuffed zero, TEM (01), a
# restart (D0-D7) nor a fill byte (FF; a run of fill bytes matches at its last FF).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\x01\xd0-\xd7\xff]")
_JPEG_EOI, _JPEG_SOS = 0xD9, 0xDA
_PNM_NUMBER = re.compile(rb"(?:\s|#[^\r\n]*[\r\n])*(\d+)")  # whitespace and comments, a number
_PNM = {b"P4": ("PBM", 0), b"P5": ("PGM", 1), b"P6": ("PPM", 3)}  # 0 channels: a bit a pixel
_TIFF_SIZES = {3: 2, 4: 4, 5: 8, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
_TIFF_INTEGERS = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8: offsets and byte counts
_TIFF_PARTS = ((273, 279, "strip"), (324, 325, "tile"))  # (offsets tag, byte counts tag, what)


def incomplete(data: bytes) -> str | None:
    """Why ``data`` is not a whole encoded image (``truncated ...`` or ``damaged ...``), or None:
    whole, or a format not checked here (the decoders then judge it)."""
    check = _check_of(bytes(data[:12]))
    if check is None:
        return None
    try:
        return check(memoryview(data))
    except (struct.error, ValueError, OverflowError, IndexError) as error:  # absurd header fields
        return f"damaged {check.__name__.strip('_').upper()}: its header cannot be read ({error})"


def _check_of(head: bytes) -> Check | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp
    return next((check for sign, check in _SIGNATURES if head.startswith(sign)), None)


def _png(data: memoryview) -> str | None:
    pos, size = len(_PNG), len(data)
    while pos + 12 <= size:
        length, kind = struct.unpack_from(">I4s", data, pos)
        name, end = kind.decode("latin-1"), pos + 12 + length
        if end > size:
            return (
                f"truncated PNG: its {name!r} chunk at byte {pos} needs {12 + length} bytes, "
                f"the file ends {size - pos} bytes after its start"
            )
        if zlib.crc32(data[pos + 4 : end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            return f"damaged PNG: its {name!r} chunk at byte {pos} fails its CRC check"
        if pos == len(_PNG) and kind != b"IHDR":
            return f"damaged PNG: its first chunk is {name!r}, not 'IHDR'"
        if kind == b"IEND":
            return None
        pos = end
    return f"truncated PNG: the file ends at byte {size}, before its IEND chunk"


def _jpeg(data: memoryview) -> str | None:
    pos, size, scans, in_scan = 2, len(data), 0, False
    no_end = f"truncated JPEG: the file ends at byte {size} without its end-of-image marker (FF D9)"
    while True:
        if in_scan:  # entropy-coded data up to the next marker
            found = _JPEG_MARKER.search(data, pos)
            if found is None:
                return no_end
            pos = found.start()
        else:
            if pos >= size:
                return no_end
            if data[pos] != 0xFF:
                return f"damaged JPEG: byte {pos} should start a marker (FF), it is {data[pos]:02X}"
            while pos + 1 < size and data[pos + 1] == 0xFF:  # fill bytes before a marker
                pos += 1
            if pos + 1 >= size:
                return no_end
        marker = data[pos + 1]
        if 0x02 <= marker < 0xC0:  # reserved: damaged entropy-coded data, or no marker at all
            return f"damaged JPEG: FF {marker:02X} at byte {pos} is no marker"
        if marker == _JPEG_EOI:
            return None if scans else f"damaged JPEG: it ends (FF D9 at byte {pos}) before a scan"
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length follows
            pos += 2
            continue
        if pos + 4 > size:
            return f"truncated JPEG: the file ends at byte {size}, inside the marker at byte {pos}"
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2:
            return f"damaged JPEG: its segment FF {marker:02X} at byte {pos} has length {length}"
        if pos + 2 + length > size:
            return (
                f"truncated JPEG: its segment FF {marker:02X} at byte {pos} needs {2 + length} "
                f"bytes, the file ends {size - pos} bytes after its start"
            )
        pos += 2 + length
        in_scan = marker == _JPEG_SOS
        scans += in_scan


def _bmp(data: memoryview) -> str | None:
    if len(data) < 26:
        return _short("BMP", len(data))
    offset, header = struct.unpack_from("<II", data, 10)  # the pixels' offset, info header size
    if header == 12:  # OS/2 1.x: 16-bit width and height, never compressed
        width, height, bits = struct.unpack_from("<HH2xH", data, 18)
        compression, stored = 0, 0
    elif len(data) < 38:
        return _short("BMP", len(data))
    else:
        width, height, bits, compression, stored = struct.unpack_from("<ii2xHII", data, 18)
        if header < 40:  # OS/2 2.x's short header ends before the compression: none
            compression = stored = 0
    if compression in (0, 3, 6):  # RGB, BITFIELDS, ALPHABITFIELDS: rows padded to 4 bytes
        stored = (abs(width) * bits + 31) // 32 * 4 * abs(height)
    return _need("BMP", len(data), offset + stored)  # RLE, JPEG or PNG pixels: their stated size


def _pnm(data: memoryview) -> str | None:
    name, channels = _PNM[bytes(data[:2])]
    pos, numbers = 2, []
    for _ in range(2 if channels == 0 else 3):  # width, height (, maxval)
        found = _PNM_NUMBER.match(data, pos)
        if found is None:
            return _short(name, len(data))
        numbers.append(int(found.group(1)))
        pos = found.end()
    width, height, *maxval = numbers
    row = (width + 7) // 8 if channels == 0 else width * channels * (2 if maxval[0] > 255 else 1)
    return _need(name, len(data), pos + 1 + row * height)  # one whitespace byte ends the header


def _webp(data: memoryview) -> str | None:
    return _need("WebP", len(data), 8 + struct.unpack_from("<I", data, 4)[0])


def _tiff(data: memoryview) -> str | None:
    size, order = len(data), "<" if data[:2] == b"II" else ">"
    big = data[2] == 43 or data[3] == 43  # BigTIFF: 8-byte offsets and counts
    offset, count, entry_size = ("Q", "Q", 20) if big else ("I", "H", 12)
    if size < (16 if big else 8):
        return _short("TIFF", size)
    (directory,) = struct.unpack_from(order + offset, data, 8 if big else 4)
    first = directory + struct.calcsize(count)
    if first > size:
        return f"truncated TIFF: its first directory (at byte {directory}) lies past the file's end"
    (entries,) = struct.unpack_from(order + count, data, directory)
    if first + entries * entry_size + struct.calcsize(offset) > size:  # + the next's offset
        return f"truncated TIFF: the file ends at byte {size}, inside its first directory"
    values: dict[int, np.ndarray] = {}  # object arrays of Python ints: no overflow
    for entry in range(first, first + entries * entry_size, entry_size):
        tag, kind, number = struct.unpack_from(order + "HH" + offset, data, entry)
        at = entry + 4 + struct.calcsize(offset)  # the values, or where they lie
        length = number * _TIFF_SIZES.get(kind, 1)
        if length > struct.calcsize(offset):
            (at,) = struct.unpack_from(order + offset, data, at)
        if at + length > size:
            return f"truncated TIFF: the values of its tag {tag} end past the file's end"
        if kind in _TIFF_INTEGERS and any(tag in part[:2] for part in _TIFF_PARTS):
            dtype = np.dtype(_TIFF_INTEGERS[kind]).newbyteorder(order)
            values[tag] = np.frombuffer(data, dtype, number, at).astype(object)  # exact ints
    for offsets, counts, what in _TIFF_PARTS:  # strips or tiles: each in the file
        if offsets in values and counts in values:
            n = min(len(values[offsets]), len(values[counts]))
            pairs = zip(values[offsets][:n], values[counts][:n], strict=True)
            ends = [int(start) + int(length) for start, length in pairs]
            if n and max(ends) > size:
                last = ends.index(max(ends))
                return _need(f"TIFF ({what} {last})", size, ends[last])
    return None


def _need(name: str, size: int, end: int) -> str | None:
    """None when the file holds the ``end`` bytes its header describes, else why not."""
    if size >= end:
        return None
    return f"truncated {name}: the file has {size} bytes, its header describes {end}"


def _short(name: str, size: int) -> str:
    return f"truncated {name}: the file ends at byte {size}, inside its header"


_SIGNATURES: tuple[tuple[bytes, Check], ...] = (
    (_PNG, _png),
    (b"\xff\xd8", _jpeg),
    (b"BM", _bmp),
    *((magic, _pnm) for magic in _PNM),
    *((magic, _tiff) for magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")),
)
