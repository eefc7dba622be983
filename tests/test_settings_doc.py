"""docs/settings.md's tables are generated from train_gpt.py's setting declarations
(tools.settings_doc): they must be what the declarations give today, list every setting once,
and show defaults that, set explicitly, change nothing."""

import dataclasses
import re

import pytest

import train_gpt as tg
from tools import settings_doc

PAGE = settings_doc.PAGE


def rows(text: str, cells: int) -> list[list[str]]:
    """The page's table rows of `cells` cells whose first cell is a `VARIABLE`."""
    out = []
    for line in text.splitlines():
        parts = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(parts) == cells and re.fullmatch(r"`[A-Z0-9_]+`", parts[0]):
            out.append([p.strip("`") if i < 2 else p for i, p in enumerate(parts)])
    return out


def test_the_page_is_what_the_declarations_give():
    assert PAGE.read_text(encoding="utf-8") == settings_doc.render(), (
        "docs/settings.md is stale: run `python -m tools.settings_doc`")


def test_every_setting_appears_once_with_a_default_that_changes_nothing():
    table = rows(PAGE.read_text(encoding="utf-8"), 4)
    names = [r[0] for r in table]
    assert sorted(names) == sorted(tg.Config.variables())
    assert len(names) == len(set(names))

    def normal(cfg):  # RUN_ID unset or empty draws a random uuid
        return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_id=""))

    base = normal(tg.Config.from_env({}))
    for name, default, _, _ in table:
        value = "" if default == "(empty)" else default
        assert normal(tg.Config.from_env({name: value})) == base, (name, default)


def test_declarations_reach_the_page():
    """Trailing comments (also on a declaration's second line), the field's own rule and the
    checks between settings, with the settings an f-string reads named."""
    by_name = {r[0]: r for r in rows(PAGE.read_text(encoding="utf-8"), 4)}
    assert by_name["CPU_THREADS"][2:] == ["a count >= 0",
                                          "per process, CPU runs only; 0: torch's default"]
    assert by_name["RUN_ID"][3] == "empty: a random uuid"
    assert by_name["NUM_HEADS"][2] == ("a positive integer; a divisor of MODEL_DIM; a value that "
                                       "leaves an even head dimension")
    assert by_name["TTT_FREEZE_BLOCKS"][2] == "a count >= 0; in [0, NUM_LAYERS]"
    assert by_name["QAT_ENABLED"][2] == "a boolean: 1/0, true/false, yes/no, on/off"
    assert by_name["ADAM_EPS"][1] == "1e-08" and by_name["TIE_EMBEDDINGS"][1] == "1"
    removed = {r[0]: r[1] for r in rows(PAGE.read_text(encoding="utf-8"), 3)}
    assert removed == {name: "unset" if default is None else default
                       for name, (default, _) in tg.REMOVED_SETTINGS.items()}


def test_check_exits_1_on_a_stale_page_and_leaves_it(tmp_path, capsys):
    page = tmp_path / "settings.md"
    page.write_text("old\n")
    assert settings_doc.main(["--check", "--out", str(page)]) == 1
    assert page.read_text() == "old\n" and "stale" in capsys.readouterr().err
    assert settings_doc.main(["--out", str(page)]) == 0
    assert settings_doc.main(["--check", "--out", str(page)]) == 0
    assert page.read_text(encoding="utf-8") == PAGE.read_text(encoding="utf-8")


def test_the_prose_is_kept_and_a_page_without_markers_is_refused(tmp_path, monkeypatch):
    """The generator rewrites only what lies between its markers."""
    page = tmp_path / "settings.md"
    text = PAGE.read_text(encoding="utf-8")
    page.write_text(text.replace("## Notes on some settings", "## Notes, edited by hand")
                    .replace("| `SEED` |", "| `SEED_EDITED` |"), encoding="utf-8")
    monkeypatch.setattr(settings_doc, "PAGE", page)
    assert settings_doc.render() == text.replace("## Notes on some settings",
                                                 "## Notes, edited by hand")
    page.write_text(text.replace("<!-- end removed -->", ""), encoding="utf-8")
    with pytest.raises(SystemExit, match="no markers for removed"):
        settings_doc.render()
