"""Pack train_gpt.py into a self-extracting submission file (format: tools/_packed.py) with the
smaller of its raw LZMA2 and brotli streams.

    python -m tools.pack [--minify] train_gpt.py records/x/train_gpt.py
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

from tools._files import write_atomic
from tools._packed import packed_files

SIZE_GOAL = 20_000  # bytes: what the packed file should stay under
SIZE_LIMIT = 35_000  # bytes: the most the project's rules allow for the packed script


class PackError(Exception):
    """A refusal, printed as one line."""


def pack(source: str) -> tuple[bytes, str, dict[str, int]]:
    """The smaller packed file, its codec and each codec's packed size in bytes."""
    files = packed_files(source)
    codec = min(files, key=lambda c: len(files[c]))
    return files[codec], codec, {c: len(data) for c, data in files.items()}


def minify(source: str, path: str) -> str:
    try:
        import python_minifier
    except ImportError:
        raise PackError("--minify needs python-minifier (pip install python-minifier); without "
                        "--minify the source is packed as it is") from None
    # Hoisted literals would add module names and rewrite annotations (None -> a variable); off,
    # the result also compresses smaller. Docstrings go: nothing in train_gpt.py reads __doc__.
    out = python_minifier.minify(source, rename_globals=False, hoist_literals=False,
                                 remove_literal_statements=True)
    if interface(ast.parse(out)) != interface(ast.parse(source)):
        raise PackError(f"{path}: python-minifier changed the top-level names or dataclass "
                        "fields; pack without --minify")
    return out


def interface(tree: ast.Module) -> dict:
    """What other code reaches by name: top-level definitions and each class's annotated fields
    (train_gpt.py parses its environment variables by its dataclass annotations)."""
    names, fields = set(), {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            names |= {n.id for n in ast.walk(node)
                      if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        if isinstance(node, ast.ClassDef):
            fields[node.name] = [(s.target.id, ast.unparse(s.annotation)) for s in node.body
                                 if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
    return {"names": names, "fields": fields}


def read_source(path: Path) -> str:
    """The script to pack: valid Python with a top-level main(source), which the packed file
    calls (any other file would pack, then fail when run)."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, str(path))
    except FileNotFoundError:
        raise PackError(f"{path}: file not found; expected the train_gpt.py to pack") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PackError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    except SyntaxError as e:
        raise PackError(f"{path}: not valid Python (line {e.lineno}: {e.msg})") from None
    if not any(isinstance(node, ast.FunctionDef) and node.name == "main" and node.args.args
               for node in tree.body):
        raise PackError(f"{path}: not this project's train_gpt.py (no top-level main(source), "
                        "which the packed file calls); expected the script to pack")
    return source


def main(argv=None, out=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.pack", description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="the script to pack (train_gpt.py)")
    p.add_argument("out", type=Path, help="the packed file to write")
    p.add_argument("--minify", action="store_true", help="python-minifier before compressing")
    a, out = p.parse_args(argv), sys.stdout if out is None else out
    try:
        if a.out.resolve() == a.source.resolve():
            raise PackError(f"{a.out}: would overwrite the source; expected another path")
        if not a.out.parent.is_dir():
            raise PackError(f"{a.out.parent}: no such directory for the packed file")
        source = read_source(a.source)
        packed_source = minify(source, str(a.source)) if a.minify else source
        data, codec, sizes = pack(packed_source)
        write_atomic(a.out, data)
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plain, size = len(source.encode("utf-8")), sizes[codec]
    lines = [f"source: {plain:,} bytes ({a.source})",
             *([f"minified: {len(packed_source.encode()):,} bytes (python-minifier)"] * a.minify),
             *(f"packed with {name}: {n:,} bytes{'  <- chosen' * (name == codec)}"
               for name, n in sizes.items()),
             f"wrote {a.out}: {size:,} bytes, {100 * size / plain:.1f}% of the source, "
             f"{'within' if size <= SIZE_GOAL else 'over'} the {SIZE_GOAL:,}-byte goal; "
             f"saves {plain - size:,} bytes for the model",
             *([f"WARNING: {size:,} bytes is over the {SIZE_LIMIT:,}-byte limit for the packed "
                "script (try --minify)"] * (size > SIZE_LIMIT))]
    print("\n".join(lines), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
