"""PNG, refused when damaged: every chunk's CRC and the image data's own zlib check.

Pillow checks the CRC of the chunks before the image data but not of the image data itself
(IDAT), nor the Adler-32 at the end of its zlib stream, and stops reading as soon as it has
every row: a file with a flipped bit in its pixels decoded to a different image and got a
score. The PNG specification has readers check both (https://www.w3.org/TR/png-3/#5CRC-algorithm,
RFC 1950), so they are checked here first.
"""

from __future__ import annotations

import zlib

import numpy as np

from pneumonia._decode.base import ColourTally, CorruptImageError, check_decode_bytes, reduction
from pneumonia._decode.pillow import gray_reduced, image_bytes, open_image, pillow_errors

#: Samples a pixel has, by IHDR colour type (gray, RGB, palette, gray + alpha, RGBA).
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
#: Adam7 interlacing: (x0, y0, dx, dy) of each of the seven passes.
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)
#: Compressed image data is checked this many bytes at a time, each inflating to at most
#: ``_INFLATE_STEP`` bytes that are counted and dropped: the check holds no image.
_FEED_STEP = 1 << 16
_INFLATE_STEP = 1 << 20


def _chunk_name(kind: bytes) -> str:
    return kind.decode("ascii") if kind.isalpha() else repr(kind)


def check_chunks(data: bytes) -> tuple[bytes | None, list[tuple[int, int]]]:
    """Check the CRC of every chunk up to IEND (reading no image data twice: CRCs only).

    Returns:
        The first IHDR chunk's data (None if there is none: Pillow refuses that file), and
        the (start, end) offsets of every IDAT chunk's data.

    Raises:
        CorruptImageError: a chunk's CRC does not match, or the file ends before IEND.
    """
    view = memoryview(data)
    ihdr: bytes | None = None
    idat: list[tuple[int, int]] = []
    pos = 8  # after the signature
    while True:
        if pos + 8 > len(data):
            raise CorruptImageError(
                f"the PNG is truncated: it ends at byte {len(data):,}, before its IEND chunk; "
                "send the whole file"
            )
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = bytes(data[pos + 4 : pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            raise CorruptImageError(
                f"the PNG is truncated: it ends inside its {_chunk_name(kind)} chunk "
                f"(at byte {pos:,}), before its IEND chunk; send the whole file"
            )
        if zlib.crc32(view[pos + 4 : end]) != int.from_bytes(data[end : end + 4], "big"):
            raise CorruptImageError(
                f"the PNG is damaged: the CRC of its {_chunk_name(kind)} chunk (at byte {pos:,}) "
                "does not match its contents; send an undamaged copy"
            )
        if kind == b"IHDR" and ihdr is None:
            ihdr = bytes(view[pos + 8 : end])
        elif kind == b"IDAT":
            idat.append((pos + 8, end))
        elif kind == b"IEND":
            return ihdr, idat
        pos = end + 4


def _raw_size(ihdr: bytes) -> int | None:
    """Bytes the image data inflates to, by the header (rows of samples, each after a filter
    byte, per interlace pass); None for a header Pillow will refuse anyway."""
    if len(ihdr) != 13 or ihdr[9] not in _CHANNELS or ihdr[12] not in (0, 1):
        return None
    width, height = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
    bits = ihdr[8] * _CHANNELS[ihdr[9]]
    if ihdr[12] == 0:
        passes = [(width, height)]
    else:
        passes = [(-(-(width - x0) // dx), -(-(height - y0) // dy)) for x0, y0, dx, dy in _ADAM7]
    return sum(h * (1 + (w * bits + 7) // 8) for w, h in passes if w > 0 and h > 0)


def check_image_data(data: bytes, idat: list[tuple[int, int]], expected: int) -> None:
    """Inflate the image data, keeping none of it, and check its zlib stream's Adler-32 and
    that it holds exactly the ``expected`` bytes the header asks for.

    Call after the header's size has passed the memory budget: ``expected`` also bounds the
    time this takes (it stops as soon as the data inflates to more).

    Raises:
        CorruptImageError: naming the check that failed.
    """
    view = memoryview(data)
    inflater = zlib.decompressobj()
    total = 0
    try:
        for start, end in idat:
            for pos in range(start, end, _FEED_STEP):
                pending: bytes | memoryview = view[pos : min(end, pos + _FEED_STEP)]
                while pending and not inflater.eof:
                    total += len(inflater.decompress(pending, _INFLATE_STEP))
                    if total > expected:
                        raise CorruptImageError(
                            "the PNG is damaged: its image data inflates to more than the "
                            f"{expected:,} bytes its header's size and depth need"
                        )
                    pending = inflater.unconsumed_tail
    except zlib.error as exc:
        if "incorrect data check" in str(exc):
            raise CorruptImageError(
                "the PNG is damaged: the Adler-32 check of its compressed image data does not "
                "match; send an undamaged copy"
            ) from None
        raise CorruptImageError(
            f"the PNG is damaged: its image data is not a valid zlib stream ({exc})"
        ) from None
    if not inflater.eof:
        raise CorruptImageError(
            "the PNG is damaged or truncated: its compressed image data ends before its zlib "
            "stream does"
        )
    if total < expected:
        raise CorruptImageError(
            f"the PNG is damaged: its image data inflates to {total:,} bytes, where its "
            f"header's size and depth need {expected:,}"
        )


def decode(data: bytes, draft_size: int | None, tally: ColourTally | None = None) -> np.ndarray:
    """A PNG as float32 gray in [0, 1], reduced as ``pneumonia.preprocess`` describes; its
    colour counted into ``tally``.

    Raises:
        CorruptImageError: a CRC, the Adler-32 or the image data's length is wrong.
    """
    ihdr, idat = check_chunks(data)  # before anything trusts the header
    with pillow_errors("PNG"):
        img = open_image(data, "PNG")
        width, height, mode = *img.size, img.mode
        check_decode_bytes(
            image_bytes(img),
            f"{width}x{height} {mode} PNG",
            "downscale it, or save it as 8-bit grayscale PNG or baseline JPEG,",
        )
        expected = _raw_size(ihdr) if ihdr is not None else None
        if expected is not None:
            check_image_data(data, idat, expected)
        img.load()
        return gray_reduced(img, *reduction(width, height, draft_size), tally)
