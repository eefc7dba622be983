"""The packed script's format, defined once: `python -m tools.pack` writes it, tools.submission
re-makes and reads it; neither needs torch, and reading executes nothing.

A packed file is a latin-1 Python file: a coding line; a loader that decompresses the source
(raw LZMA2 or brotli) from one string literal whose characters, encoded as latin-1, are the
compressed bytes; then it runs that source as a module of its own whose `__file__` is the
packed file (whose bytes are what the run's `Code size` counts) and calls its `main(source)`,
which logs the full source at the head of the run's log.
"""

from __future__ import annotations

import ast
import lzma
import re
from functools import partial

import brotli

# Every byte is one latin-1 character.
CODING_LINE = b"# -*- coding: latin-1 -*-\n"
RAW_LZMA2 = dict(format=lzma.FORMAT_RAW,
                 filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
# codec: (compress, decompress, the loader's code before and after the literal); the loader's
# decoder ignores the preset, and its default dictionary (8 MiB) exceeds any source.
CODECS = {
    "lzma": (partial(lzma.compress, **RAW_LZMA2), partial(lzma.decompress, **RAW_LZMA2),
             b"import lzma as L,sys,types\ns=L.decompress(",
             b'.encode("latin-1"),L.FORMAT_RAW,filters=[{"id":L.FILTER_LZMA2}]).decode()\n'),
    "brotli": (partial(brotli.compress, quality=11), brotli.decompress,
               b"import brotli as L,sys,types\ns=L.decompress(", b'.encode("latin-1")).decode()\n'),
}
# A module of its own, registered in sys.modules under a name that is not "__main__": the
# script's `if __name__ == "__main__"` stays quiet, and dataclasses (which look the class's
# module up there) and torch.compile see an ordinary module.
MODULE_NAME = "train_gpt_packed"
EXEC_LINE = (f'm=types.ModuleType("{MODULE_NAME}");m.__file__=__file__;sys.modules[m.__name__]=m;'
             f'exec(compile(s,__file__,"exec"),m.__dict__)\n').encode("ascii")
MAIN_LINE = b"m.main(s)\n"

# In a triple-quoted literal a raw newline is itself; a backslash would start an escape, a CR
# would become a newline when Python reads the file, NUL is refused in source, and a quote
# must not meet two more (or the closing ones). NUL is written \0, or \x00 before an octal
# digit (which a bare \0 would take into its value).
ESCAPES = {b"\\": b"\\\\", b"\r": b"\\r", b"\x00": b"\\0", b'"': b'\\"'}
NEEDS_ESCAPE = re.compile(rb'[\\\r]|\x00(?![0-7])|"(?="|\Z)')


def compressed(source: bytes) -> dict[str, bytes]:
    return {codec: compress(source) for codec, (compress, *_) in CODECS.items()}


def literal(blob: bytes) -> bytes:
    """A Python string literal (in a latin-1 file) whose characters are the bytes of `blob`."""
    body = NEEDS_ESCAPE.sub(lambda m: ESCAPES[m.group()], blob).replace(b"\x00", b"\\x00")
    return b'"""' + body + b'"""'


def packed_files(source: str) -> dict[str, bytes]:
    """The packed file's bytes with each codec."""
    blobs = compressed(source.encode("utf-8"))
    return {codec: CODING_LINE + head + literal(blobs[codec]) + tail + EXEC_LINE + MAIN_LINE
            for codec, (_, _, head, tail) in CODECS.items()}


def unpacked(data: bytes) -> tuple[str, str] | None:
    """(codec, source) of a packed file; None when `data` is not exactly a file this format
    writes (so a file that does anything else is never taken for one). The literal is read by
    ast.literal_eval: nothing is executed."""
    for codec, (_, decompress, head, tail) in CODECS.items():
        prefix, suffix = CODING_LINE + head, tail + EXEC_LINE + MAIN_LINE
        if data.startswith(prefix) and data.endswith(suffix):
            try:
                body = data[len(prefix):len(data) - len(suffix)].decode("latin-1")
                source = decompress(ast.literal_eval(body).encode("latin-1")).decode()
            except Exception:  # not a literal of compressed UTF-8: not a packed file
                return None
            return (codec, source) if packed_files(source)[codec] == data else None
    return None
