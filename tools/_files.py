"""The atomic writer and the token shard without torch (train_gpt.py keeps twin copies)."""
import os
from pathlib import Path

import numpy as np

# A shard: 256 little-endian int32 (magic, version, token count, zeros), then uint16 tokens.
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4


class ShardError(Exception):
    """A shard (or, in tools.data, any input) that cannot be used; the message names it."""


def write_atomic(path, data: bytes) -> None:
    """Write beside the target, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def shard_bytes(tokens: np.ndarray) -> bytes:
    """The bytes of a shard holding `tokens` (ids already checked to fit uint16)."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    return header.tobytes() + np.asarray(tokens).astype("<u2").tobytes()


def read_shard(path) -> np.ndarray:
    """A shard's tokens (a read-only uint16 memory map), checked as train_gpt.load_data_shard."""
    path = Path(path)
    try:
        size = path.stat().st_size
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard ({e.strerror})") from None
    if header.size < HEADER_INTS:
        raise ShardError(f"{path}: truncated header ({size} bytes; a shard starts with a "
                         f"{HEADER_BYTES}-byte header)")
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"{path}: bad magic {header[0]}; expected {SHARD_MAGIC}")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported version {header[1]}; expected {SHARD_VERSION}")
    n = int(header[2])
    if n < 0 or size != HEADER_BYTES + 2 * n:
        raise ShardError(f"{path}: size {size} bytes does not match header token count {n} "
                         f"(expected {HEADER_BYTES + 2 * max(n, 0)} bytes)")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
