"""docs/settings.md, generated from the settings' declarations in train_gpt.py so that it cannot
drift: each setting's default, accepted values (its `expect` and the checks' `need(...)` calls)
and meaning (its declaration's comment), in the page's prose (tools/settings_page.md).

    python -m tools.settings_doc            # writes docs/settings.md
    python -m tools.settings_doc --check    # exit 1 when docs/settings.md is stale
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import re
import string
import sys
import tokenize
from dataclasses import fields, is_dataclass
from functools import reduce
from itertools import takewhile
from pathlib import Path

from tools._common import REPO_ROOT, import_train_gpt
from tools._files import write_atomic
from tools.runlog import env_value

PAGE = REPO_ROOT / "docs" / "settings.md"
TEMPLATE = Path(__file__).with_name("settings_page.md")  # the prose; $sections etc. generated
# What train_gpt.parse_value accepts for a field whose declaration states nothing more.
BY_TYPE = {"bool": "a boolean: 1/0, true/false, yes/no, on/off", "int": "an integer",
           "float": "a finite number", "str": "any text"}


def section_paths(config, prefix: str = "") -> dict[type, str]:
    """Each section class -> its place in a Config ("run", "eval.slot", ...)."""
    paths = {}
    for f in fields(config):
        section = getattr(config, f.name)
        if is_dataclass(section):
            paths[type(section)] = prefix + f.name
            paths |= section_paths(section, f"{prefix}{f.name}.")
    return paths


def declarations(cls) -> tuple[dict[str, str], dict[str, list[str]]]:
    """From the class's own source, wherever it sits: field -> the comments on its declaration's
    lines, and variable -> the expectations of the `need(ok, NAME, value, expected)` calls in
    its check()."""
    source = inspect.getsource(cls)
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokens
                if t.type == tokenize.COMMENT}
    meanings, rules = {}, {}
    for stmt in ast.parse(source).body[0].body:
        if isinstance(stmt, ast.AnnAssign):
            lines = range(stmt.lineno, stmt.end_lineno + 1)
            meanings[stmt.target.id] = " ".join(comments[i] for i in lines if i in comments)
        elif isinstance(stmt, ast.FunctionDef) and stmt.name == "check":
            for call in ast.walk(stmt):
                if (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "need"
                        and isinstance(call.args[1], ast.Constant)):
                    rules.setdefault(call.args[1].value, []).append(expected(call.args[3], cls))
    return meanings, rules


def expected(node: ast.expr, owner: type) -> str:
    """An expectation as the page shows it: an f-string's fields become the settings they read
    (`NUM_LAYERS={self.model.num_layers}` -> NUM_LAYERS; a property or a local: its name)."""
    text = ""
    for part in node.values if isinstance(node, ast.JoinedStr) else [node]:
        if isinstance(part, ast.Constant):
            text += part.value
        else:
            path = ast.unparse(part.value).split(".")  # self.model.num_layers, or a local
            section = reduce(getattr, path[1:-1], owner())
            text += {f.name: env for env, f in section.settings().items()}.get(path[-1], path[-1])
    return re.sub(r"\b(\w+)=\1\b", r"\1", text)


def table(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table, `|` in a cell escaped."""
    return "\n".join([f"| {' | '.join(head)} |", "|---" * len(head) + "|",
                      *("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
                        for row in rows)])


def settings_tables(tg) -> str:
    found = [declarations(cls) for cls in (*tg.Config.SECTIONS, tg.Config)]  # (meanings, rules)
    paths, lines = section_paths(tg.Config()), []
    for section, (meaning, _) in zip(tg.Config.SECTIONS, found):
        rows = [[f"`{name}`", f"`{'(empty)' if f.default == '' else env_value(f.default)}`",
                 "; ".join([f.metadata["expect"] or BY_TYPE[f.type],
                            *(e for _, rules in found for e in rules.get(name, []))]),
                 meaning[f.name]] for name, f in section.settings().items()]
        prefix = section.PREFIX and f"; variables `{section.PREFIX}*`"
        lines += [f"## {paths[section]} (`{section.__name__}`{prefix})", "",
                  table(["variable", "default", "accepted", "meaning"], rows), ""]
    return "\n".join(lines)


def preset_lines() -> str:
    lines = []
    for path in sorted((REPO_ROOT / "presets").glob("*.env")):
        text = path.read_text(encoding="utf-8").splitlines()
        intro = [line.lstrip("#").strip() for line in takewhile(lambda x: x[:1] == "#", text)]
        names = [line.split("=", 1)[0] for line in text if "=" in line and line[0] != "#"]
        lines += [f"- [`{path.stem}`](../presets/{path.name}): {' '.join(intro)}",
                  f"  Sets {', '.join(f'`{n}`' for n in names)}."]
    return "\n".join(lines)


def render() -> str:
    tg = import_train_gpt()
    removed = [[f"`{name}`", "unset" if default is None else f"`{default}`", why]
               for name, (default, why) in tg.REMOVED_SETTINGS.items()]
    return string.Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        sections=settings_tables(tg), presets=preset_lines(),
        removed=table(["variable", "accepted value", "why it was removed"], removed))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.settings_doc",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    p.add_argument("--out", type=Path, default=PAGE, help="the page (default docs/settings.md)")
    args, text = p.parse_args(argv), render()
    if not args.check:
        write_atomic(args.out, text.encode("utf-8"))
        print(f"wrote {args.out}")
    elif args.out.is_file() and args.out.read_text(encoding="utf-8") == text:
        print(f"{args.out} is up to date")
    else:
        print(f"{args.out} is stale: run `python -m tools.settings_doc`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
