"""Data for train_gpt.py: FineWeb shards from the challenge hub, shards made
from local text, an offline demo corpus, and shard checks.

    python -m tools.data download [--variant sp1024] [--train-shards 80] [--root .]
    python -m tools.data shards INPUT... --out DIR (--tokenizer MODEL | --train-tokenizer ...)
    python -m tools.data demo [--root .]
    python -m tools.data verify DIR [--vocab-size N]

Shard file: 256 little-endian int32 (magic, version, token count N, zeros),
then N little-endian uint16 tokens; every document starts with BOS (id 1).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import sentencepiece as spm

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_VOCAB = 1 << 16  # tokens are stored as uint16

SHARD_TOKENS = 10**8
VAL_DOCS = 50_000

# The challenge tokenizer's trainer settings, as stored in the published
# fineweb_1024_bpe.model. byte_fallback is off there (the model has no byte
# pieces): turning it on would spend 256 of the 1024 pieces on bytes.
TOKENIZER_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.999,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    hard_vocab_limit=False,
    byte_fallback=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
)
# One thread and every sentence in input order make the model bytes repeatable.
DETERMINISTIC_TRAINING = dict(num_threads=1, input_sentence_size=0, shuffle_input_sentence=False)

HUB_REPO = "willdepueoai/parameter-golf"
HUB_PREFIX = "datasets"  # the hub repo keeps everything under this folder
# Tests put a stand-in here; it is called like huggingface_hub.hf_hub_download.
HUB_DOWNLOAD: Callable[..., str] | None = None

DEMO_SEED = 1337
DEMO_VOCAB = 1024
DEMO_VAL_TOKENS = 80_000
DEMO_MAX_BYTES = 4_000_000  # bounds the build time whatever the Python version
# Test suites are mostly code; site-packages is not part of CPython.
DEMO_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


class DataError(Exception):
    """A file or input is unusable; the message names it and says what is wrong."""


# ---------------------------------------------------------------- shard files

@contextlib.contextmanager
def _atomic_file(path: Path):
    """Write beside the target, then rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shard(path: str | os.PathLike, tokens) -> None:
    """Write tokens (ids 0..65535) as a shard file, atomically."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise DataError(f"{path}: tokens must be one-dimensional, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= MAX_VOCAB):
        raise DataError(f"{path}: token ids must lie in 0..{MAX_VOCAB - 1}, "
                        f"got {tokens.min()}..{tokens.max()}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, tokens.size
    with _atomic_file(path) as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def read_shard_header(path: str | os.PathLike) -> int:
    """Check magic, version and file size; return the token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: truncated header ({len(raw)} of {HEADER_BYTES} bytes)")
    magic, version, count = (int(x) for x in np.frombuffer(raw, dtype="<i4", count=3))
    if magic != MAGIC:
        raise DataError(f"{path}: bad magic {magic} (expected {MAGIC})")
    if version != VERSION:
        raise DataError(f"{path}: unsupported version {version} (expected {VERSION})")
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        state = "truncated" if size < expected else "wrong size"
        raise DataError(f"{path}: {state}: {size} bytes, but the header's {count} tokens "
                        f"need {expected}")
    return count


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """The checked shard's tokens as a uint16 array."""
    count = read_shard_header(path)
    return np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES)


def verify_shard(path: str | os.PathLike, vocab_size: int | None = None) -> tuple[int, int]:
    """Check a shard whole; return (token count, largest id, -1 when empty)."""
    tokens = read_shard(path)
    top = int(tokens.max()) if tokens.size else -1
    if vocab_size is not None and top >= vocab_size:
        pos = int(np.argmax(tokens >= vocab_size))
        raise DataError(f"{path}: token id {tokens[pos]} at position {pos} is outside "
                        f"the vocabulary of {vocab_size}")
    return tokens.size, top


# ---------------------------------------------------------------- tokenizer

def load_tokenizer(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    path = Path(path)
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise DataError(f"{path}: not a usable SentencePiece model ({e})") from None
    if sp.vocab_size() > MAX_VOCAB:
        raise DataError(f"{path}: {sp.vocab_size()} pieces do not fit uint16 shards")
    if sp.bos_id() < 0:
        raise DataError(f"{path}: the tokenizer has no BOS piece")
    return sp


def train_tokenizer(sentences: Iterable[str], vocab_size: int, out: Path) -> spm.SentencePieceProcessor:
    """Train a BPE model with the challenge settings and save it atomically."""
    errors = []

    def guarded():
        try:
            yield from sentences
        except DataError as e:
            errors.append(e)
            raise

    model = io.BytesIO()
    try:
        # model_writer keeps input and output paths out of the stored trainer spec.
        spm.SentencePieceTrainer.train(
            sentence_iterator=guarded(), model_writer=model, vocab_size=vocab_size,
            minloglevel=2, **TOKENIZER_SETTINGS, **DETERMINISTIC_TRAINING)
    except RuntimeError as e:
        # SentencePiece turns an error raised while reading input into a RuntimeError.
        raise (errors[0] if errors else DataError(f"{out}: tokenizer training failed ({e})")) from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    # hard_vocab_limit off lets a small corpus end up with fewer pieces.
    if sp.vocab_size() != vocab_size:
        raise DataError(f"{out}: the text only supports {sp.vocab_size()} pieces, "
                        f"not {vocab_size}; give more text or a smaller --vocab-size")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_file(out) as f:
        f.write(model.getvalue())
    return sp


def _sentences(documents: Iterable[str]) -> Iterator[str]:
    """SentencePiece trains on lines."""
    for doc in documents:
        yield from (line for line in doc.splitlines() if line.strip())


def encode_documents(sp: spm.SentencePieceProcessor, documents: Iterable[str],
                     batch: int = 256) -> Iterator[np.ndarray]:
    """Each document as BOS + its ids, the way the challenge encoded FineWeb."""
    docs = iter(documents)
    while chunk := [doc for _, doc in zip(range(batch), docs)]:
        for ids in sp.encode(chunk, add_bos=False, add_eos=False):
            tokens = np.array([sp.bos_id(), *ids], dtype=np.int64)
            if tokens.max() >= sp.vocab_size():
                raise DataError(f"tokenizer produced id {tokens.max()} outside its "
                                f"{sp.vocab_size()} pieces")
            yield tokens.astype(np.uint16)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- datasets

class _SplitWriter:
    """Cuts one split's token stream into shards of exactly shard_tokens
    (the last may be shorter); a document may run on into the next shard."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.files: list[str] = []
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_tokens += tokens.size
        self.documents += 1
        self.tokens += tokens.size
        while self.pending_tokens >= self.shard_tokens:
            stream = np.concatenate(self.pending)
            self._write(stream[:self.shard_tokens])
            self.pending = [stream[self.shard_tokens:]]
            self.pending_tokens = self.pending[0].size

    def close(self) -> None:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_tokens = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        name = f"fineweb_{self.split}_{len(self.files):06d}.bin"
        write_shard(self.out_dir / name, tokens)
        self.files.append(name)
        print(f"wrote {self.out_dir / name}: {tokens.size:,} tokens")

    def summary(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens,
                "shards": len(self.files), "files": self.files}


def write_dataset(token_docs: Iterable[np.ndarray], out_dir: Path, *, val_docs: int,
                  shard_tokens: int, tokenizer: Path) -> dict:
    """The first val_docs documents go to val shards, the rest to train
    shards; manifest.json records what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {split: _SplitWriter(out_dir, split, shard_tokens) for split in ("val", "train")}
    for i, tokens in enumerate(token_docs):
        writers["val" if i < val_docs else "train"].add(tokens)
    for writer in writers.values():
        writer.close()
    total = sum(w.documents for w in writers.values())
    for split, writer in writers.items():
        if not writer.documents:
            raise DataError(f"{out_dir}: no {split} documents ({total} documents in all, "
                            f"the first {val_docs} for val)")
    _remove_stale_shards(out_dir, {name for w in writers.values() for name in w.files})
    manifest = {
        "format": {"magic": MAGIC, "version": VERSION, "header_int32": HEADER_INTS,
                   "token_dtype": "uint16 little-endian", "bos_before_each_document": True},
        "shard_tokens": shard_tokens,
        "tokenizer": {"file": tokenizer.name, "sha256": _sha256(tokenizer),
                      "vocab_size": load_tokenizer(tokenizer).vocab_size()},
        "splits": {split: writer.summary() for split, writer in writers.items()},
    }
    with _atomic_file(out_dir / "manifest.json") as f:
        f.write((json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def _remove_stale_shards(out_dir: Path, keep: set[str]) -> None:
    """Shards left by an earlier, longer build would otherwise join the new data."""
    for path in sorted(out_dir.glob("fineweb_*_*.bin")):
        if path.name not in keep:
            path.unlink()
            print(f"removed stale {path}")


def read_documents(paths: Iterable[Path]) -> Iterator[str]:
    """A .txt file is one document; a .jsonl file has one per line, in its
    "text" field (blank lines skipped)."""
    for path in paths:
        try:
            if path.suffix == ".txt":
                yield path.read_text(encoding="utf-8")
            else:
                yield from _jsonl_documents(path)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _jsonl_documents(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{path}:{number}: no "text" string field')
            yield record["text"]


def build_shards(inputs: list[Path], out_dir: Path, *, tokenizer: Path | None,
                 train_vocab: int | None, tokenizer_out: Path | None,
                 val_docs: int, shard_tokens: int) -> dict:
    """Shards from .txt/.jsonl inputs, with a given or a freshly trained tokenizer."""
    for path in inputs:
        if path.suffix not in (".txt", ".jsonl"):
            raise DataError(f"{path}: unsupported input (expected .txt or .jsonl)")
        if not path.is_file():
            raise DataError(f"{path}: no such file")
    if tokenizer is None:
        train_tokenizer(_sentences(read_documents(inputs)), train_vocab, tokenizer_out)
        tokenizer = tokenizer_out
        print(f"trained {tokenizer} ({train_vocab} pieces)")
    sp = load_tokenizer(tokenizer)
    token_docs = encode_documents(sp, read_documents(inputs))
    return write_dataset(token_docs, out_dir, val_docs=val_docs, shard_tokens=shard_tokens,
                         tokenizer=tokenizer)


# ---------------------------------------------------------------- demo corpus

def demo_documents() -> list[str]:
    """English prose every CPython ships: the pydoc topics, then per stdlib
    module its docstrings and comment blocks; shuffled with a fixed seed so
    that the val split mixes both kinds."""
    from pydoc_data.topics import topics
    docs = [topics[key] for key in sorted(topics)]
    size = sum(len(doc) for doc in docs)
    for doc in _stdlib_documents():
        if size >= DEMO_MAX_BYTES:
            break
        docs.append(doc)
        size += len(doc)
    random.Random(DEMO_SEED).shuffle(docs)
    return docs


def _stdlib_documents() -> Iterator[str]:
    for folder, dirs, files in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = sorted(d for d in dirs if d not in DEMO_SKIP_DIRS)  # walk order = sorted
        for name in sorted(f for f in files if f.endswith(".py")):
            doc = _module_prose(Path(folder, name))
            if doc:
                yield doc


def _module_prose(path: Path) -> str:
    """Docstrings and full-line comment blocks, in source order."""
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd escapes in old modules are not our concern
            tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return ""
    parts = []
    in_strings = set()  # a '#' line inside a string literal is not a comment
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text:
                parts.append((node.body[0].lineno, text))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            in_strings.update(range(node.lineno, node.end_lineno + 1))
    parts += _comment_blocks(source, in_strings)
    return "\n\n".join(text for _, text in sorted(parts))


_COMMENT = re.compile(r"[ \t]*#+[ \t]?(.*)")


def _comment_blocks(source: str, skip_lines: set[int]) -> list[tuple[int, str]]:
    """Runs of comment lines with words in them, as (first line, text)."""
    blocks, lines, start = [], [], 0
    for number, line in enumerate(source.splitlines(), 1):
        match = None if number in skip_lines else _COMMENT.fullmatch(line)
        text = match.group(1).rstrip() if match else ""
        # Shebang and coding lines, rules and bare '#' lines are not prose.
        if any(c.isalpha() for c in text) and not text.startswith("!") and "-*-" not in text:
            start = start or number
            lines.append(text)
        elif lines:
            blocks.append((start, "\n".join(lines)))
            lines, start = [], 0
    if lines:
        blocks.append((start, "\n".join(lines)))
    return blocks


def build_demo(root: Path) -> dict:
    data = root / "data"
    docs = demo_documents()
    print(f"demo corpus: {len(docs)} documents, {sum(len(d.encode()) for d in docs):,} bytes")
    model = data / "tokenizers" / f"demo_{DEMO_VOCAB}_bpe.model"
    sp = train_tokenizer(_sentences(docs), DEMO_VOCAB, model)
    print(f"trained {model} ({DEMO_VOCAB} pieces)")
    token_docs = list(encode_documents(sp, docs))
    # Val: the first documents up to DEMO_VAL_TOKENS, enough for a CPU eval.
    val_tokens = np.cumsum([t.size for t in token_docs])
    val_docs = int(np.searchsorted(val_tokens, DEMO_VAL_TOKENS)) + 1
    out = data / "datasets" / f"demo_sp{DEMO_VOCAB}"
    manifest = write_dataset(token_docs, out, val_docs=val_docs, shard_tokens=SHARD_TOKENS,
                             tokenizer=model)
    print(f"to train on it: DATA_PATH={out} TOKENIZER_PATH={model} python train_gpt.py")
    return manifest


# ---------------------------------------------------------------- download

def _hub_download() -> Callable[..., str]:
    if HUB_DOWNLOAD is not None:
        return HUB_DOWNLOAD
    from huggingface_hub import hf_hub_download  # only this command needs it
    return hf_hub_download


def _fetch(remote: str, dest: Path, check: Callable[[Path], object]) -> str:
    """Bring HUB_PREFIX/remote to dest unless a complete copy is there;
    returns what happened."""
    state = "downloaded"
    if dest.exists():
        try:
            check(dest)
            return "present"
        except DataError as e:
            print(f"replacing incomplete file: {e}")
            state = "replaced"
    dest.parent.mkdir(parents=True, exist_ok=True)
    # The hub writes into a scratch folder beside dest; only a checked file moves.
    scratch = dest.with_name(f".{dest.name}.download.tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        try:
            got = _hub_download()(repo_id=HUB_REPO, filename=f"{HUB_PREFIX}/{remote}",
                                  repo_type="dataset", local_dir=str(scratch))
        except OSError as e:
            # huggingface_hub's connection, not-found and HTTP errors are all OSErrors.
            raise DataError(f"could not download {HUB_PREFIX}/{remote} from the Hugging Face "
                            f"hub dataset {HUB_REPO}: {e}") from None
        try:
            check(Path(got))
        except DataError as e:
            raise DataError(f"downloaded {HUB_PREFIX}/{remote} is unusable: {e}") from None
        os.replace(got, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return state


def _check_json(path: Path) -> None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from None


def _hub_plan(manifest: dict, variant: str, train_shards: int,
              val_shards: int | None) -> list[str]:
    """The files to fetch, as paths under HUB_PREFIX.

    The manifest's layout is not documented. We assume what the challenge's
    own downloader reads: "datasets" entries with "name" (fineweb10B_<variant>),
    "tokenizer_name" and "stats" {"files_train", "files_val"}, and
    "tokenizers" entries with "name" and "model_path". Whatever is missing
    falls back to the naming convention and the command-line counts (one val
    shard unless --val-shards says otherwise)."""
    dataset_dir = f"fineweb10B_{variant}"
    dataset = _named_entry(manifest, "datasets", dataset_dir)
    stats = dataset.get("stats") if isinstance(dataset.get("stats"), dict) else {}
    available = stats.get("files_train")
    if isinstance(available, int) and train_shards > available:
        raise DataError(f"{variant}: the hub has {available} training shards, "
                        f"{train_shards} were asked for")
    if val_shards is None:
        val_shards = stats.get("files_val") if isinstance(stats.get("files_val"), int) else 1
    tokenizer = _named_entry(manifest, "tokenizers", dataset.get("tokenizer_name"))
    model = tokenizer.get("model_path") or f"fineweb_{variant[2:]}_bpe.model"
    return ([f"datasets/{dataset_dir}/fineweb_val_{i:06d}.bin" for i in range(val_shards)]
            + [f"datasets/{dataset_dir}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
            # Only the file name is trusted, so the model lands in data/tokenizers.
            + [f"tokenizers/{Path(str(model)).name}"])


def _named_entry(manifest: dict, section: str, name) -> dict:
    entries = manifest.get(section) if isinstance(manifest, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    return {}


def download(root: Path, variant: str, train_shards: int, val_shards: int | None) -> None:
    data = root / "data"
    state = _fetch("manifest.json", data / "manifest.json", _check_json)
    print(f"manifest.json: {(data / 'manifest.json').stat().st_size:,} bytes ({state})")
    manifest = json.loads((data / "manifest.json").read_text(encoding="utf-8"))
    plan = _hub_plan(manifest, variant, train_shards, val_shards)
    for i, remote in enumerate(plan, 1):
        dest = data / remote
        check = load_tokenizer if remote.endswith(".model") else read_shard_header
        state = _fetch(remote, dest, check)
        print(f"[{i}/{len(plan)}] {dest.name}: {dest.stat().st_size:,} bytes ({state})")


# ---------------------------------------------------------------- verify

def verify_dir(folder: Path, vocab_size: int | None) -> dict[str, int]:
    """Check every .bin shard in folder; return token totals per split."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    paths = sorted(folder.glob("*.bin"))
    if not paths:
        raise DataError(f"{folder}: no .bin shards")
    totals: dict[str, int] = {}
    for path in paths:
        count, top = verify_shard(path, vocab_size)
        split = next((s for s in ("train", "val") if path.name.startswith(f"fineweb_{s}_")), "other")
        totals[split] = totals.get(split, 0) + count
        print(f"{path.name}: {count:,} tokens, max id {top}")
    for split, count in totals.items():
        print(f"total {split}: {count:,} tokens")
    return totals


# ---------------------------------------------------------------- command line

def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value
    return parse


def _variant(text: str) -> str:
    if not re.fullmatch(r"sp\d+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a SentencePiece variant like sp1024")
    return text


def _run_download(args) -> None:
    download(args.root, args.variant, args.train_shards, args.val_shards)


def _run_shards(args) -> None:
    if args.train_tokenizer and args.tokenizer_out is None:
        args.parser.error("--train-tokenizer needs --tokenizer-out")
    build_shards(args.inputs, args.out, tokenizer=args.tokenizer,
                 train_vocab=args.vocab_size if args.train_tokenizer else None,
                 tokenizer_out=args.tokenizer_out, val_docs=args.val_docs,
                 shard_tokens=args.shard_tokens)


def _run_demo(args) -> None:
    build_demo(args.root)


def _run_verify(args) -> None:
    verify_dir(args.dir, args.vocab_size)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("download", help="fetch the challenge shards and tokenizer from the hub",
                            description="Fetch the whole val split, the first N train shards and the "
                            f"tokenizer of hub dataset {HUB_REPO} into ROOT/data. Complete files "
                            "are kept; partial or corrupt ones are fetched again.")
    p.add_argument("--variant", type=_variant, default="sp1024", help="tokenizer variant (default sp1024)")
    p.add_argument("--train-shards", type=_count(0), default=80, help="train shards to fetch (default 80)")
    p.add_argument("--val-shards", type=_count(1), default=None,
                   help="val shards to fetch (default: the manifest's count, else 1)")
    p.add_argument("--root", type=Path, default=Path("."), help="folder that holds data/ (default .)")
    p.set_defaults(run=_run_download)

    p = commands.add_parser("shards", help="tokenize .txt/.jsonl documents into shards",
                            description="Tokenize documents into shards: a .txt file is one "
                            "document, a .jsonl file one per line (its \"text\" field). Each "
                            "document is BOS + ids without a dummy prefix; the first --val-docs "
                            "documents form the val split. Writes DIR/manifest.json.")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help=".txt or .jsonl file")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", type=Path, metavar="MODEL", help="SentencePiece model to use")
    source.add_argument("--train-tokenizer", action="store_true",
                        help="train a BPE tokenizer on the inputs with the challenge settings")
    p.add_argument("--vocab-size", type=_count(5), default=1024, help="pieces when training (default 1024)")
    p.add_argument("--tokenizer-out", type=Path, metavar="PATH", help="where the trained model goes")
    p.add_argument("--val-docs", type=_count(0), default=VAL_DOCS, help=f"val documents (default {VAL_DOCS})")
    p.add_argument("--shard-tokens", type=_count(1), default=SHARD_TOKENS,
                   help=f"tokens per shard (default {SHARD_TOKENS})")
    p.set_defaults(run=_run_shards, parser=p)

    p = commands.add_parser("demo", help="build the offline demo corpus, tokenizer and shards",
                            description="Build a small corpus from the prose shipped with CPython "
                            "(pydoc topics, stdlib docstrings and comments), train a "
                            f"{DEMO_VOCAB}-piece tokenizer on it and write its shards under "
                            "ROOT/data. Needs no network; repeat builds are byte-identical.")
    p.add_argument("--root", type=Path, default=Path("."), help="folder that holds data/ (default .)")
    p.set_defaults(run=_run_demo)

    p = commands.add_parser("verify", help="check every shard in a folder",
                            description="Check magic, version and size of every .bin shard in "
                            "DIR (and ids below --vocab-size) and print token counts.")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--vocab-size", type=_count(1), default=None, help="reject ids at or above this")
    p.set_defaults(run=_run_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
