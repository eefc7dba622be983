"""Pack train_gpt.py into a self-extracting submission file.

The source is compressed with raw LZMA2 and with brotli, and the smaller stream is embedded as
it is in a latin-1 source file: one string literal in which only the bytes Python cannot hold
there are escaped (about 2% over the compressed size; base85 added 25%). The loader decodes
the literal back to those bytes, decompresses the source, executes it as a fresh module whose
`__file__` is the packed file (whose bytes are what `Code size` counts) and calls its
`main(source)`, which logs the full source in the header.

    python -m tools.pack train_gpt.py records/x/train_gpt.py
    python -m tools.pack --minify train_gpt.py OUT.py   # needs python-minifier

--minify first strips docstrings and comments and shortens local names with python-minifier
(when installed), after checking that the result defines the same top-level names and dataclass
fields; the log header then shows the minified source.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

from tools._files import write_atomic
from tools._packed import EXEC_LINE, MAIN_LINE, packed_files

SIZE_GOAL = 20_000  # bytes: what the packed file should stay under
SIZE_LIMIT = 35_000  # bytes: the most the project's rules allow for the packed script


class PackError(Exception):
    """A refusal, printed as one line."""


def pack(source: str) -> tuple[bytes, str, dict[str, int]]:
    """The smaller packed file, its codec and each codec's packed size in bytes."""
    files = packed_files(source)
    codec = min(files, key=lambda c: len(files[c]))
    check_unpacks(files[codec], source)
    return files[codec], codec, {c: len(data) for c, data in files.items()}


def unpacked(data: bytes, path: str = "<packed>") -> str:
    """The source a packed file decompresses, by running its loader's first lines (the literal
    read by Python's own tokenizer, as when the file runs) without executing the script."""
    loader = data[: len(data) - len(EXEC_LINE) - len(MAIN_LINE)]
    if not data.endswith(EXEC_LINE + MAIN_LINE):
        raise PackError(f"{path}: not a file written by tools.pack (its last lines differ)")
    namespace = {"__file__": path, "__name__": "tools.pack.check"}
    exec(compile(loader, path, "exec"), namespace)
    return namespace["s"]


def check_unpacks(data: bytes, source: str) -> None:
    if unpacked(data) != source:
        raise PackError("the packed file does not decompress to the source (codec mismatch)")


def minify(source: str, path: str) -> str:
    try:
        import python_minifier
    except ImportError:
        raise PackError(
            "--minify needs python-minifier (pip install python-minifier); "
            "without --minify the source is packed as it is"
        ) from None
    # Hoisted literals would add module names and rewrite annotations (None -> a variable); off,
    # the result also compresses smaller. Docstrings go: nothing in train_gpt.py reads __doc__.
    out = python_minifier.minify(
        source, rename_globals=False, hoist_literals=False, remove_literal_statements=True
    )
    if interface(ast.parse(out)) != interface(ast.parse(source)):
        raise PackError(
            f"{path}: python-minifier changed the top-level names or dataclass fields; "
            "pack without --minify"
        )
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
            fields[node.name] = [
                (s.target.id, ast.unparse(s.annotation))
                for s in node.body
                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
            ]
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
    p.add_argument(
        "--minify", action="store_true", help="minify with python-minifier before compressing"
    )
    return p.parse_args(argv)


def report(out, a, source: str, packed_source: str, codec: str, sizes: dict[str, int]) -> None:
    plain = len(source.encode("utf-8"))
    print(f"source: {plain:,} bytes ({a.source})", file=out)
    if a.minify:
        print(f"minified: {len(packed_source.encode('utf-8')):,} bytes (python-minifier)", file=out)
    for name, size in sizes.items():
        print(
            f"packed with {name}: {size:,} bytes{'  <- chosen' if name == codec else ''}", file=out
        )
    size = sizes[codec]
    verdict = "within" if size <= SIZE_GOAL else "over"
    print(
        f"wrote {a.out}: {size:,} bytes, {100 * size / plain:.1f}% of the source, {verdict} the "
        f"{SIZE_GOAL:,}-byte goal; saves {plain - size:,} bytes for the model",
        file=out,
    )
    if size > SIZE_LIMIT:
        print(
            f"WARNING: {size:,} bytes is over the {SIZE_LIMIT:,}-byte limit for the packed "
            f"script (try --minify)",
            file=out,
        )


def main(argv=None, out=None) -> int:
    a = parse_args(argv)
    out = sys.stdout if out is None else out
    try:
        if a.out.resolve() == a.source.resolve():
            raise PackError(
                f"{a.out}: the output would overwrite the source; expected another path"
            )
        if not a.out.parent.is_dir():
            raise PackError(f"{a.out.parent}: no such directory for the packed file")
        source = read_source(a.source)
        packed_source = minify(source, str(a.source)) if a.minify else source
        data, codec, sizes = pack(packed_source)
        write_atomic(a.out, data)
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(out, a, source, packed_source, codec, sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
