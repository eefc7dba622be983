"""Data for train_gpt.py: FineWeb shards from the challenge hub, shards made from local text,
an offline demo corpus, and shard checks (`python -m tools.data --help` lists the commands).
Each shard folder written holds a manifest.json naming its tokenizer by sha256."""
from __future__ import annotations

import argparse
import ast
import hashlib
import io
import itertools
import json
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import sentencepiece as spm

# The shard format without torch: the data tools run before any PyTorch is installed.
from tools._files import (HEADER_INTS, SHARD_MAGIC as MAGIC, SHARD_VERSION as VERSION,
                          ShardError as DataError, read_shard, shard_bytes, write_atomic)

MAX_VOCAB = 1 << 16  # tokens are stored as uint16
SHARD_TOKENS, VAL_DOCS, TRAIN_VOCAB = 10**8, 50_000, 1024
# The published fineweb_1024_bpe.model's trainer settings (byte_fallback on would spend 256 of
# its 1024 pieces); one thread and every sentence in input order make the bytes repeatable.
TOKENIZER_SETTINGS = dict(
    model_type="bpe", character_coverage=0.999, split_digits=True,
    normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, hard_vocab_limit=False,
    byte_fallback=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
    num_threads=1, input_sentence_size=0, shuffle_input_sentence=False)
FORMAT = {"magic": MAGIC, "version": VERSION, "header_int32": HEADER_INTS,
          "token_dtype": "uint16 little-endian", "bos_before_each_document": True}

HUB_REPO, HUB_ROOT = "willdepueoai/parameter-golf", "datasets"  # the export's folder in the repo
# The challenge's own downloader reads these to point at another export.
REPO_ENV, ROOT_ENV = "MATCHED_FINEWEB_REPO_ID", "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"
HUB_DOWNLOAD: Callable[..., str] | None = None  # tests' stand-in for hf_hub_download

DEMO_SEED, DEMO_VOCAB, DEMO_VAL_TOKENS = 1337, 1024, 80_000
DEMO_MAX_BYTES = 4_000_000  # bounds the build time whatever the Python version
# Test suites are mostly code; site-packages is not part of CPython.
DEMO_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def _check_path(path: Path, expected: str, *, output: bool = True) -> None:
    """Refuse a missing input or an output path that cannot be made, before any work."""
    if expected == "a folder" and path.exists() and not path.is_dir():
        raise DataError(f"{path}: exists and is not a folder")
    if expected != "a folder" and path.is_dir():
        raise DataError(f"{path}: is a folder; expected {expected}")
    if not output and not path.exists():
        raise DataError(f"{path}: no such file")
    ancestor = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not ancestor.is_dir():
        raise DataError(f"{path}: {ancestor} is a file, not a folder")


def write_shard(path: str | os.PathLike, tokens) -> None:
    """Write tokens (ids 0..65535) as a shard file, atomically."""
    path, tokens = Path(path), np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= MAX_VOCAB):
        raise DataError(f"{path}: token ids must lie in 0..{MAX_VOCAB - 1}, "
                        f"got {tokens.min()}..{tokens.max()}")
    write_atomic(path, shard_bytes(tokens))


def verify_shard(path: str | os.PathLike, vocab_size: int | None = None) -> tuple[int, int]:
    """Check a shard whole; return (token count, largest id, -1 when empty)."""
    tokens = read_shard(path)
    top = int(tokens.max()) if tokens.size else -1
    if vocab_size is not None and top >= vocab_size:
        pos = int(np.argmax(tokens >= vocab_size))
        raise DataError(f"{path}: token id {tokens[pos]} at position {pos} is outside "
                        f"the vocabulary of {vocab_size}")
    return tokens.size, top


def load_tokenizer(path: Path):
    """The SentencePiece model at path, checked for what shards need."""
    _check_path(path, "a SentencePiece .model file", output=False)
    try:
        sp = spm.SentencePieceProcessor(model_proto=path.read_bytes())
    except (OSError, RuntimeError) as e:
        raise DataError(f"{path}: not a usable SentencePiece model ({e})") from None
    if sp.vocab_size() > MAX_VOCAB:
        raise DataError(f"{path}: {sp.vocab_size()} pieces do not fit uint16 shards")
    if sp.bos_id() < 0:
        raise DataError(f"{path}: the tokenizer has no BOS piece")
    return sp


def train_tokenizer(documents: Iterable[str], vocab_size: int, out: Path, *,
                    save: bool = True) -> tuple[bytes, spm.SentencePieceProcessor]:
    """(model bytes, processor) of BPE with the challenge settings, saved unless save is off."""
    lines = (line for doc in documents for line in doc.splitlines() if line.strip())
    model = io.BytesIO()
    try:  # model_writer keeps input and output paths out of the stored trainer spec
        spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model,
                                       vocab_size=vocab_size, minloglevel=2, **TOKENIZER_SETTINGS)
    except RuntimeError as e:
        raise DataError(f"{out}: tokenizer training failed ({e})") from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    if sp.vocab_size() != vocab_size:  # hard_vocab_limit off: a small corpus gives fewer pieces
        raise DataError(f"{out}: the text only supports {sp.vocab_size()} pieces, "
                        f"not {vocab_size}; give more text or a smaller --vocab-size")
    if save:
        write_atomic(out, model.getvalue())
    return model.getvalue(), sp


def encode_documents(sp, documents: Iterable[str], batch: int = 256) -> Iterator[np.ndarray]:
    """Each document as BOS + its ids, the way the challenge encoded FineWeb."""
    docs = iter(documents)
    while chunk := [doc for _, doc in zip(range(batch), docs)]:
        for ids in sp.encode(chunk, add_bos=False, add_eos=False):
            yield np.array([sp.bos_id(), *ids], dtype=np.uint16)


def _save_manifest(folder: Path, extra: dict, model: Path, splits: dict) -> None:
    """folder/manifest.json: train_gpt.py checks TOKENIZER_PATH against its tokenizer sha256."""
    tokenizer = {"file": model.name, "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
                 "vocab_size": spm.SentencePieceProcessor(model_file=str(model)).vocab_size()}
    manifest = {"format": FORMAT, **extra, "tokenizer": tokenizer, "splits": splits}
    write_atomic(folder / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())


def _write_split(docs: Iterable[np.ndarray], stage: Path, split: str, shard_tokens: int) -> dict:
    """The split's manifest entry; its tokens in shards of exactly shard_tokens (the last may be
    shorter): a document may run on into the next shard."""
    entry = {"documents": 0, "tokens": 0, "shards": 0, "files": []}
    pending, held = [], 0
    for doc in itertools.chain(docs, [None]):
        if doc is not None:
            pending.append(doc)
            held += doc.size
            entry["documents"] += 1
            entry["tokens"] += doc.size
        while held >= shard_tokens or (doc is None and held):
            stream = np.concatenate(pending)
            entry["files"].append(f"fineweb_{split}_{entry['shards']:06d}.bin")
            entry["shards"] += 1
            write_shard(stage / entry["files"][-1], stream[:shard_tokens])
            pending = [stream[shard_tokens:]]
            held = pending[0].size
    return entry


def write_dataset(token_docs: Iterable[np.ndarray], out_dir: Path, *, val_docs: int,
                  shard_tokens: int, tokenizer: Path, model: bytes | None = None) -> None:
    """The first val_docs documents as val shards, the rest as train shards, and manifest.json,
    moved in only once complete (stale shards go); model, when given, is saved to tokenizer."""
    # In the nearest existing folder (moving in is a rename): a failure leaves nothing behind.
    beside = next(p for p in out_dir.parents if p.exists())
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=beside) as scratch:
        stage, docs = Path(scratch), iter(token_docs)
        splits = {"val": _write_split(itertools.islice(docs, val_docs), stage, "val", shard_tokens)}
        splits["train"] = _write_split(docs, stage, "train", shard_tokens)
        total = sum(entry["documents"] for entry in splits.values())
        for split, entry in splits.items():
            if not entry["documents"]:
                raise DataError(f"{out_dir}: no {split} documents ({total} documents in all, "
                                f"the first {val_docs} for val)")
        if model is not None:
            tokenizer.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(tokenizer, model)
            print(f"wrote the trained tokenizer {tokenizer}")
        _save_manifest(stage, {"shard_tokens": shard_tokens}, tokenizer, splits)
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(out_dir.glob("fineweb_*_*.bin")):
            if not (stage / path.name).exists():
                path.unlink()
                print(f"removed stale {path}")
        for path in sorted(stage.iterdir()):  # the shards, then manifest.json
            os.replace(path, out_dir / path.name)
            print(f"wrote {out_dir / path.name}")


def read_documents(paths: Iterable[Path]) -> Iterator[str]:
    """A .txt file is one document; a .jsonl file one per line, in its "text" field."""
    for path in paths:
        try:
            if path.suffix == ".txt":
                yield path.read_text(encoding="utf-8")
                continue
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
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def build_shards(args) -> None:
    """The shards command: .txt/.jsonl inputs tokenized with a given or a freshly trained model."""
    if args.train_tokenizer and args.tokenizer_out is None:
        args.parser.error("--train-tokenizer needs --tokenizer-out PATH, where the trained "
                          "model is saved (the shards' manifest refers to it)")
    for option, value in (("--tokenizer-out", args.tokenizer_out),
                          ("--vocab-size", args.vocab_size)):
        if args.tokenizer and value is not None:
            args.parser.error(f"{option} applies to --train-tokenizer, not to --tokenizer")
    for path in args.inputs:
        if path.suffix not in (".txt", ".jsonl"):
            raise DataError(f"{path}: unsupported input (expected .txt or .jsonl)")
        _check_path(path, "a .txt or .jsonl file", output=False)
    _check_path(args.out, "a folder")
    model, docs, tokenizer = None, read_documents(args.inputs), args.tokenizer or args.tokenizer_out
    if args.train_tokenizer:
        _check_path(tokenizer, "a file path")
        docs = list(docs)  # read once: the trainer holds every sentence anyway
        model, sp = train_tokenizer(docs, args.vocab_size or TRAIN_VOCAB, tokenizer, save=False)
    else:
        sp = load_tokenizer(tokenizer)
    write_dataset(encode_documents(sp, docs), args.out, val_docs=args.val_docs,
                  shard_tokens=args.shard_tokens, tokenizer=tokenizer, model=model)


def demo_documents() -> list[str]:
    """English prose every CPython ships: the pydoc topics, then stdlib docstrings and comment
    blocks, shuffled with a fixed seed so that the val split mixes both kinds."""
    from pydoc_data.topics import topics
    docs = [topics[key] for key in sorted(topics)]
    for folder, dirs, files in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = sorted(d for d in dirs if d not in DEMO_SKIP_DIRS)  # walk order = sorted
        for name in sorted(f for f in files if f.endswith(".py")):
            if sum(map(len, docs)) < DEMO_MAX_BYTES and (doc := _module_prose(Path(folder, name))):
                docs.append(doc)
    random.Random(DEMO_SEED).shuffle(docs)
    return docs


def _module_prose(path: Path) -> str:
    """Docstrings and runs of full-line comments with words in them, in source order."""
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings(action="ignore"):  # odd escapes in old modules
            tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return ""
    parts, in_strings = [], set()  # a '#' line inside a string literal is not a comment
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if text := ast.get_docstring(node):
                parts.append((node.body[0].lineno, text))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            in_strings.update(range(node.lineno, node.end_lineno + 1))
    lines, start = [], 0
    for number, line in enumerate(source.splitlines() + [""], 1):
        match = None if number in in_strings else re.fullmatch(r"[ \t]*#+[ \t]?(.*)", line)
        text = match.group(1).rstrip() if match else ""
        # Shebang and coding lines, rules and bare '#' lines are not prose.
        if any(c.isalpha() for c in text) and not text.startswith("!") and "-*-" not in text:
            start = start or number
            lines.append(text)
        elif lines:
            parts.append((start, "\n".join(lines)))
            lines, start = [], 0
    return "\n\n".join(text for _, text in sorted(parts))


def build_demo(root: Path) -> None:
    model = root / "data" / "tokenizers" / f"demo_{DEMO_VOCAB}_bpe.model"
    out = root / "data" / "datasets" / f"demo_sp{DEMO_VOCAB}"
    docs = demo_documents()
    print(f"demo corpus: {len(docs)} documents, {sum(len(d.encode()) for d in docs):,} bytes")
    model_bytes, sp = train_tokenizer(docs, DEMO_VOCAB, model, save=False)
    token_docs = list(encode_documents(sp, docs))
    # Val: the first documents up to DEMO_VAL_TOKENS, enough for a CPU eval.
    val_docs = int(np.searchsorted(np.cumsum([t.size for t in token_docs]), DEMO_VAL_TOKENS)) + 1
    write_dataset(token_docs, out, val_docs=val_docs, shard_tokens=SHARD_TOKENS, tokenizer=model,
                  model=model_bytes)
    # Without the preset train_gpt.py would build the 27M-parameter record model.
    print(f"to train on it (from the repository root): PRESET=demo DATA_PATH={out} "
          f"TOKENIZER_PATH={model} python train_gpt.py")


def _fetch(hub: tuple[str, str], remote: str, dest: Path) -> str:
    """Bring remote to dest (by rename) unless a whole copy is there: its size and what happened."""
    check = {".bin": read_shard, ".model": load_tokenizer, ".json": _check_json}.get(
        dest.suffix, Path.stat)
    if dest.exists():
        try:
            check(dest)
            return f"{dest.stat().st_size:,} bytes (present)"
        except DataError as e:
            print(f"replacing incomplete file: {e}")
    state = "replaced" if dest.exists() else "downloaded"
    # A failed attempt leaves the hub's partial file in scratch for the next to resume from
    # (huggingface_hub resumes unless force_download; versions 1.18 and later restart instead).
    scratch, name = dest.with_name(f".{dest.name}.download"), hub[1] + remote
    if (fetch := HUB_DOWNLOAD) is None:
        from huggingface_hub import hf_hub_download as fetch  # only this command needs it
    try:
        got = fetch(repo_id=hub[0], filename=name, repo_type="dataset", local_dir=str(scratch))
    except Exception as e:  # connection, HTTP and not-found errors have no common base
        raise DataError(f"could not download {name} from the Hugging Face hub dataset "
                        f"{hub[0]}: {e}") from None
    try:
        check(Path(got))
        os.replace(got, dest)
    except DataError as e:
        raise DataError(f"downloaded {name} is unusable: {e}") from None
    finally:  # whole, good or bad: the hub would hand a bad file back again unchanged
        shutil.rmtree(scratch, ignore_errors=True)
    return f"{dest.stat().st_size:,} bytes ({state})"


def _check_json(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: not a JSON object")
    return manifest


def _named(manifest: dict, section: str, name) -> dict | None:
    return next((e for e in manifest.get(section, []) if e.get("name") == name), None)


def _hub_plan(manifest: dict, where: str, args) -> dict[str, list[str]]:
    """The files per "val", "train", "tokenizer", read as the challenge's downloader does."""
    name = f"fineweb10B_{args.variant}"
    dataset = _named(manifest, "datasets", name) or {}
    counts = {split: dataset.get("stats", {}).get(f"files_{split}") for split in ("train", "val")}
    missing = [f"stats.files_{k}" for k, v in counts.items() if not isinstance(v, int)]
    tokenizer = _named(manifest, "tokenizers", dataset.get("tokenizer_name")) or {}
    files = [tokenizer[key] for key in ("model_path", "vocab_path", "path") if tokenizer.get(key)]
    outside = [repr(f) for f in files if f.startswith("/") or ".." in f.split("/")]
    listed = [e.get("name") for e in manifest.get("datasets", [])] or "none"
    for failed, problem in [
            (not dataset, f"no dataset {name!r} (it lists {listed}); check --variant and "
                          "--remote-root"),
            (missing, f"dataset {name!r} has no shard counts ({' and '.join(missing)} missing)"),
            (not tokenizer, f"no tokenizer {dataset.get('tokenizer_name')!r} (named by dataset "
                            f"{name!r})"),
            (not files, f"tokenizer {tokenizer.get('name')!r} lists no files (model_path, "
                        "vocab_path or path)"),
            (outside, f"tokenizer file {', '.join(outside)} is not a path inside the export")]:
        if failed:
            raise DataError(f"{where}: {problem}")
    asked = {"train": args.train_shards, "val": args.val_shards or counts["val"]}
    for split, kind in (("train", "training"), ("val", "val")):
        if asked[split] > counts[split]:
            raise DataError(f"{args.variant}: the hub has {counts[split]} {kind} shards, "
                            f"{asked[split]} were asked for")
    return {split: [f"datasets/{name}/fineweb_{split}_{i:06d}.bin" for i in range(asked[split])]
            for split in ("val", "train")} | {"tokenizer": files}


def download(args) -> None:
    """The files the hub manifest lists, into ROOT/data, then the shard folder's manifest.json."""
    prefix = args.remote_root.strip("/")
    hub = (args.repo_id, f"{prefix}/" if prefix else "")  # the hub's file names start with hub[1]
    data = args.root / "data"
    local = data / "manifest.json"
    print(f"manifest.json: {_fetch(hub, 'manifest.json', local)}")
    where = f"{local} (hub dataset {hub[0]}, {hub[1]}manifest.json)"
    plan = _hub_plan(_check_json(local), where, args)
    fetched = [(remote, data / remote) for remote in plan["val"] + plan["train"]]
    fetched += [(remote, data / "tokenizers" / Path(remote).name) for remote in plan["tokenizer"]]
    for i, (remote, dest) in enumerate(fetched, 1):
        print(f"[{i}/{len(fetched)}] {dest.name}: {_fetch(hub, remote, dest)}")
    model = next((dest for _, dest in fetched if dest.suffix == ".model"), None)
    if model is not None:
        folder = data / "datasets" / f"fineweb10B_{args.variant}"
        splits = {split: {"shards": len(plan[split]), "files": [Path(f).name for f in plan[split]],
                          "tokens": sum(read_shard(data / f).size for f in plan[split])}
                  for split in ("val", "train")}
        _save_manifest(folder, {"source": f"hub dataset {hub[0]}, {hub[1]}"}, model, splits)
        print(f"wrote {folder / 'manifest.json'} (tokenizer {model.name})")


def _listing(folder: Path) -> tuple[Path | None, int | None, dict, set[str]]:
    """(manifest, vocabulary size, shards per split, splits that may hold a prefix): the folder's
    manifest.json, or for the challenge script's data/datasets/NAME data/manifest.json's NAME."""
    own, hub = folder / "manifest.json", folder.parent.parent / "manifest.json"
    try:
        if own.is_file():
            manifest = _check_json(own)
            counts = {split: e.get("shards") for split, e in manifest.get("splits", {}).items()}
            return own, manifest.get("tokenizer", {}).get("vocab_size"), counts, set()
        if folder.parent.name == "datasets" and hub.is_file():
            if (entry := _named(_check_json(hub), "datasets", folder.name)) is not None:
                stats = entry.get("stats", {})
                counts = {split: stats.get(f"files_{split}") for split in ("val", "train")}
                return hub, entry.get("vocab_size"), counts, {"train"}
    except (AttributeError, TypeError) as e:  # a list or number where a table belongs
        raise DataError(f"{folder}: malformed manifest.json ({e})") from None
    return None, None, {}, set()


def verify_dir(folder: Path, vocab_size: int | None) -> dict[str, int]:
    """Check every shard, the numbering and the manifest's counts; token totals per split.
    train_gpt.py reads whatever fineweb_<split>_*.bin it finds: a missing shard would go
    unnoticed (in val, a val_bpb on part of the data), an empty split made it wait forever."""
    if not folder.is_dir():
        raise DataError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    source, listed_vocab, listed, prefixes = _listing(folder)
    if vocab_size is None and listed_vocab is not None:
        vocab_size = listed_vocab
        print(f"vocabulary: {vocab_size} pieces (from {source})")
    elif vocab_size is None:
        print("vocabulary: unknown (no --vocab-size, no manifest): token ids are not checked")
    problems, totals = [], {}
    counts = {"val": {}, "train": {}}  # per split, shard number -> tokens (None: unreadable)
    for path in sorted(folder.glob("*.bin")):
        named = re.fullmatch(r"fineweb_(train|val)_(\d{6})\.bin", path.name)
        split, count = named.group(1) if named else "other", None
        try:
            count, top = verify_shard(path, vocab_size)
            totals[split] = totals.get(split, 0) + count
            print(f"{path.name}: {count:,} tokens, max id {top}")
        except DataError as e:
            problems.append(str(e))
        if named:
            counts[split][int(named.group(2))] = count
    for split, present in counts.items():
        found, expected = len(present), listed.get(split)
        gaps = sorted(set(range(max(present, default=0))) - set(present))
        names = ", ".join(f"fineweb_{split}_{i:06d}.bin" for i in gaps[:5])
        more = f" and {len(gaps) - 5} more" if len(gaps) > 5 else ""
        checks = [
            (not present, f"no fineweb_{split}_*.bin shards"),
            (gaps, f"{names}{more} missing (shards are numbered from 000000 without gaps)"),
            (present and expected is not None and
             (found > expected or found < expected and split not in prefixes),
             f"{found} {split} shards, but {source} lists {expected}"),
            (present and not any(present.values()) and None not in present.values(),
             f"the {split} split holds 0 tokens ({found} shard{'s' * (found > 1)}, all empty)")]
        problems += [f"{folder}: {problem}" for failed, problem in checks if failed]
    for split, count in totals.items():
        print(f"total {split}: {count:,} tokens")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        raise DataError(f"{folder}: {len(problems)} problem{'s' * (len(problems) > 1)} "
                        "(listed above)")
    return totals


def _at_least(minimum: int) -> Callable[[str], int]:
    def count(text: str) -> int:
        if int(text) < minimum:  # argparse reports a ValueError as an invalid count
            raise argparse.ArgumentTypeError(f"{text} is below {minimum}")
        return int(text)
    return count


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    root = argparse.ArgumentParser(add_help=False)
    root.add_argument("--root", type=Path, default=Path("."), help="folder that holds data/")

    def command(name: str, run, text: str, *parents) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=text.split(":")[0], description=text, parents=parents,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(run=run, parser=p)
        return p

    p = command("download", download, "fetch from the hub: all val shards, the first N train "
                "shards, the tokenizer (whole files are kept, a failed download resumes)", root)
    p.add_argument("--variant", default="sp1024", help="tokenizer variant")
    p.add_argument("--train-shards", type=_at_least(0), default=80, help="train shards to fetch")
    p.add_argument("--val-shards", type=_at_least(1), help="val shards (None: all; fewer give "
                   "another val_bpb)")
    p.add_argument("--repo-id", default=os.environ.get(REPO_ENV, HUB_REPO), metavar="OWNER/NAME",
                   help=f"hub dataset (${REPO_ENV} sets the default)")
    p.add_argument("--remote-root", default=os.environ.get(ROOT_ENV, HUB_ROOT), metavar="FOLDER",
                   help=f"the export's folder in the dataset (${ROOT_ENV} sets the default)")
    p = command("shards", build_shards, "tokenize .txt files (one document each) and .jsonl files "
                "(one per line, its \"text\"): the first --val-docs form the val split")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help=".txt or .jsonl file")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", type=Path, metavar="MODEL", help="SentencePiece model")
    source.add_argument("--train-tokenizer", action="store_true",
                        help="train a BPE tokenizer on the inputs with the challenge settings; "
                        "needs --tokenizer-out")
    p.add_argument("--vocab-size", type=_at_least(5), help=f"pieces to train (None: {TRAIN_VOCAB})")
    p.add_argument("--tokenizer-out", type=Path, metavar="PATH",
                   help="where the trained model is saved (required with --train-tokenizer)")
    p.add_argument("--val-docs", type=_at_least(0), default=VAL_DOCS, help="val documents")
    p.add_argument("--shard-tokens", type=_at_least(1), default=SHARD_TOKENS,
                   help="tokens per shard")
    command("demo", lambda a: build_demo(a.root), "build the offline demo corpus under ROOT/data: "
            f"CPython's own prose, a {DEMO_VOCAB}-piece tokenizer, byte-identical every time", root)
    p = command("verify", lambda a: verify_dir(a.dir, a.vocab_size), "check a shard folder: each "
                "shard, both splits without gaps, the counts its manifest lists")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--vocab-size", type=_at_least(1), help="reject ids from this on (None: the "
                   "manifest's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except (DataError, OSError) as e:  # one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
