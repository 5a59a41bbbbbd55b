"""Every figure in the README's tables comes from a stored result.

Each table is preceded by a comment naming where its numbers come from:
`<!-- figures: benchmarks/results/a.json [more files] -->` (the script that writes them is named
in the text beside the table), or `<!-- prose -->` for a table whose numbers are not
measurements (years, defaults, sizes). Every number in a figures table's body, outside
backticks, must appear in one of its files at the precision shown: 0.973 matches 0.97312,
1.28M matches 1281234, 3.2 % matches 0.032 or 3.2.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARK = re.compile(r"<!--\s*(figures:(?P<files>[^>]*)|prose)\s*-->")
NUMBER = re.compile(r"(?<![\w.@-])(\d+(?:\.\d+)?)[kMG]?(?!\w)")  # not R@1, BLEU-4, v2
SCALES = (1.0, 100.0, 1e-3, 1e-6, 1e-9)  # as stored; a fraction shown as %; k, M, G


def tables(text: str) -> list[tuple[int, str | None, list[str]]]:
    """(line number, the comment above it or None, body rows) of every Markdown table."""
    lines, found, i = text.splitlines(), [], 0
    while i < len(lines):
        if not lines[i].startswith("|"):
            i += 1
            continue
        end = i
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        above = next((line for line in reversed(lines[:i]) if line.strip()), "")
        found.append((i + 1, above if MARK.search(above) else None, lines[i + 2 : end]))
        i = end
    return found


def numbers_in_rows(rows: list[str]) -> list[str]:
    """The numbers of a table body as shown, leaving out code (`--frames 4`)."""
    return [n for row in rows for n in NUMBER.findall(re.sub(r"`[^`]*`", "", row))]


def stored_numbers(path: Path) -> list[float]:
    """Every number in a result file: JSON values and numbers inside its strings, or any
    number in a text file."""
    text = path.read_text()
    if path.suffix != ".json":
        return [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", text)]
    values: list[float] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, bool):
            return
        elif isinstance(node, (int, float)):
            values.append(float(node))
        elif isinstance(node, str):
            values.extend(float(n) for n in re.findall(r"\d+(?:\.\d+)?", node))

    walk(json.loads(text))
    return values


def shown(number: str, stored: list[float]) -> bool:
    decimals = len(number.partition(".")[2])
    return any(f"{value * scale:.{decimals}f}" == number for value in stored for scale in SCALES)


TABLES = tables(README.read_text())


def test_every_table_says_where_its_numbers_come_from():
    unmarked = [line for line, mark, rows in TABLES if mark is None and numbers_in_rows(rows)]
    assert not unmarked, f"README tables with numbers and no figures/prose comment: {unmarked}"


@pytest.mark.parametrize(
    "line, mark, rows",
    [t for t in TABLES if t[1] and "figures:" in t[1]],
    ids=[f"line {t[0]}" for t in TABLES if t[1] and "figures:" in t[1]],
)
def test_every_figure_is_in_its_result_file(line, mark, rows):
    files = MARK.search(mark)["files"].split()
    assert files, f"README line {line}: the comment names no file"
    stored: list[float] = []
    for name in files:
        path = ROOT / name
        assert path.is_file(), f"README line {line}: {name} does not exist"
        stored += stored_numbers(path)
    missing = [n for n in numbers_in_rows(rows) if not shown(n, stored)]
    assert not missing, f"README line {line}: {missing} appear in none of {files}"


def test_the_check_catches_a_figure_that_is_not_stored(tmp_path):
    result = tmp_path / "r.json"
    result.write_text(json.dumps({"accuracy": 0.97312, "params": 1281234, "s": "0.5 ± 0.01"}))
    stored = stored_numbers(result)
    assert shown("0.973", stored) and shown("1.28", stored) and shown("0.01", stored)
    assert not shown("0.974", stored) and not shown("0.98", stored)
    text = "<!-- figures: r.json -->\n| a | b |\n|---|---|\n| x `--n 4` | 0.973 |\n"
    text += "\n| c |\n|---|\n| 7 |\n"
    (line, mark, rows), (_, unmarked, other) = tables(text)
    assert line == 2 and "figures:" in mark and numbers_in_rows(rows) == ["0.973"]
    assert unmarked is None and numbers_in_rows(other) == ["7"]
