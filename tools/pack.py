"""Pack train_gpt.py into a self-extracting submission file.

The source is compressed with raw LZMA2 and with brotli, the smaller is base85-encoded, and a
two-line loader decompresses it and executes it in the packed file's own globals. So the script
run from the packed file sees `__file__` = the packed file, whose bytes are what `Code size`
counts, and finds the unpacked source in PACKED_SOURCE, which its log header records.

    python -m tools.pack train_gpt.py records/x/train_gpt.py
    python -m tools.pack --minify train_gpt.py OUT.py   # needs python-minifier

--minify first strips docstrings and comments and shortens local names with python-minifier
(when installed), after checking that the result defines the same top-level names and dataclass
fields; the log header then shows the minified source.
"""

from __future__ import annotations

import argparse
import ast
import base64
import lzma
import sys
from pathlib import Path

import brotli

from tools._common import import_train_gpt

SIZE_GOAL = 20_000  # bytes: what the packed file should stay under
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
# The decoder's default LZMA2 dictionary (8 MiB) exceeds any source, so it need not be spelt out.
LOADERS = {
    "lzma": 'import lzma as L,base64 as B;PACKED_SOURCE=L.decompress(B.b85decode("{}"),L.FORMAT_RAW,'
            'filters=[{{"id":L.FILTER_LZMA2}}]).decode()',
    "brotli": 'import brotli as L,base64 as B;PACKED_SOURCE=L.decompress(B.b85decode("{}")).decode()',
}
EXEC_LINE = 'exec(compile(PACKED_SOURCE,__file__,"exec"))'


class PackError(Exception):
    """A refusal, printed as one line."""


def compressed(source: bytes) -> dict[str, bytes]:
    return {"lzma": lzma.compress(source, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS),
            "brotli": brotli.compress(source, quality=11)}


def packed_files(source: str) -> dict[str, str]:
    """The packed file's text (ASCII) with each codec."""
    return {codec: LOADERS[codec].format(base64.b85encode(blob).decode("ascii")) + "\n" + EXEC_LINE + "\n"
            for codec, blob in compressed(source.encode("utf-8")).items()}


def pack(source: str) -> tuple[str, str, dict[str, int]]:
    """The smaller packed file, its codec and each codec's packed size in bytes."""
    files = packed_files(source)
    codec = min(files, key=lambda c: len(files[c]))
    check_unpacks(files[codec], source)
    return files[codec], codec, {c: len(text) for c, text in files.items()}


def check_unpacks(text: str, source: str) -> None:
    """Runs the loader's first line as the packed file will and compares what it yields."""
    namespace = {}
    exec(text.splitlines()[0], namespace)
    if namespace.get("PACKED_SOURCE") != source:
        raise PackError("the packed file does not decompress to the source (codec mismatch)")


def minify(source: str, path: str) -> str:
    try:
        import python_minifier
    except ImportError:
        raise PackError("--minify needs python-minifier (pip install python-minifier); "
                        "without --minify the source is packed as it is") from None
    # Hoisted literals would add module names and rewrite annotations (None -> a variable); off, the
    # result also compresses smaller. Docstrings go: nothing in train_gpt.py reads __doc__.
    out = python_minifier.minify(source, rename_globals=False, hoist_literals=False, remove_literal_statements=True)
    if interface(ast.parse(out)) != interface(ast.parse(source)):
        raise PackError(f"{path}: python-minifier changed the top-level names or dataclass fields; "
                        "pack without --minify")
    return out


def interface(tree: ast.Module) -> dict:
    """What other code reaches by name: top-level definitions and each class's annotated fields
    (train_gpt.py parses its environment variables by its dataclass annotations)."""
    names, fields = set(), {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        if isinstance(node, ast.ClassDef):
            fields[node.name] = [(s.target.id, ast.unparse(s.annotation)) for s in node.body
                                 if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
    return {"names": names, "fields": fields}


def read_source(path: Path) -> str:
    try:
        source = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PackError(f"{path}: file not found; expected the train_gpt.py to pack") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PackError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    try:
        compile(source, str(path), "exec")
    except SyntaxError as e:
        raise PackError(f"{path}: not valid Python (line {e.lineno}: {e.msg})") from None
    return source


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tools.pack", description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="the script to pack (train_gpt.py)")
    p.add_argument("out", type=Path, help="the packed file to write")
    p.add_argument("--minify", action="store_true", help="minify with python-minifier before compressing")
    return p.parse_args(argv)


def main(argv=None, out=None) -> int:
    a = parse_args(argv)
    out = sys.stdout if out is None else out
    try:
        if a.out.resolve() == a.source.resolve():
            raise PackError(f"{a.out}: the output would overwrite the source; expected another path")
        if not a.out.parent.is_dir():
            raise PackError(f"{a.out.parent}: no such directory for the packed file")
        source = read_source(a.source)
        packed_source = minify(source, str(a.source)) if a.minify else source
        text, codec, sizes = pack(packed_source)
        import_train_gpt().write_atomic(a.out, text.encode("ascii"))
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plain = len(source.encode("utf-8"))
    print(f"source: {plain:,} bytes ({a.source})", file=out)
    if a.minify:
        print(f"minified: {len(packed_source.encode('utf-8')):,} bytes (python-minifier)", file=out)
    for name, size in sizes.items():
        print(f"packed with {name}: {size:,} bytes{'  <- chosen' if name == codec else ''}", file=out)
    size = sizes[codec]
    verdict = "within" if size <= SIZE_GOAL else "over"
    print(f"wrote {a.out}: {size:,} bytes, {100 * size / plain:.1f}% of the source, {verdict} the "
          f"{SIZE_GOAL:,}-byte goal; saves {plain - size:,} bytes for the model", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
