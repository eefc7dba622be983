"""The packed script's format (what `python -m tools.pack` writes), made and read without torch.

A packed file is two lines: a loader that base85-decodes and decompresses the source into
PACKED_SOURCE (raw LZMA2 or brotli), then an exec of it. Its bytes are what the run's `Code size`
counts; the log's head records PACKED_SOURCE. tools/pack.py holds the same format (tools do not
import each other); tests/test_submission.py checks that both make the same bytes.
"""

from __future__ import annotations

import base64
import lzma
import re

import brotli

LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
LOADERS = {
    "lzma": 'import lzma as L,base64 as B;PACKED_SOURCE=L.decompress(B.b85decode("{}"),'
            'L.FORMAT_RAW,filters=[{{"id":L.FILTER_LZMA2}}]).decode()',
    "brotli": 'import brotli as L,base64 as B;PACKED_SOURCE=L.decompress(B.b85decode("{}"))'
              '.decode()',
}
EXEC_LINE = 'exec(compile(PACKED_SOURCE,__file__,"exec"))'
_PAYLOAD = re.compile(
    r'^import (?P<codec>lzma|brotli) as L,base64 as B;[^"]*b85decode\("(?P<b85>[^"]*)"\)'
)


def _compress(codec: str, source: bytes) -> bytes:
    if codec == "lzma":
        return lzma.compress(source, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    return brotli.compress(source, quality=11)


def _decompress(codec: str, blob: bytes) -> bytes:
    if codec == "lzma":
        return lzma.decompress(blob, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    return brotli.decompress(blob)


def packed_file(source: str, codec: str) -> str:
    """The packed file's text (ASCII) holding `source`, with one codec."""
    b85 = base64.b85encode(_compress(codec, source.encode("utf-8"))).decode("ascii")
    return LOADERS[codec].format(b85) + "\n" + EXEC_LINE + "\n"


def packed_files(source: str) -> dict[str, str]:
    return {codec: packed_file(source, codec) for codec in LOADERS}


def unpacked(text: str) -> tuple[str, str] | None:
    """(codec, source) of a packed file; None when `text` is not exactly a packed file (the
    loader and exec lines as tools.pack writes them, around any payload), so that a file that
    does anything else is never taken for one. Nothing is executed."""
    found = _PAYLOAD.match(text)
    if not found:
        return None
    codec, b85 = found["codec"], found["b85"]
    if text != LOADERS[codec].format(b85) + "\n" + EXEC_LINE + "\n":
        return None
    try:
        return codec, _decompress(codec, base64.b85decode(b85)).decode("utf-8")
    except (ValueError, lzma.LZMAError, brotli.error, UnicodeDecodeError):
        return None
