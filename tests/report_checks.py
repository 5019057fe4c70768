"""What a report must hold, checked the same way on every real run that makes one (demo, left-out, SLURM)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path


def decode_png(path: Path) -> tuple[int, int, int]:
    """(width, height, distinct colours) of a PNG, decoded whole by Pillow (it fails on a damaged file)."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        colours = image.convert("RGB").getcolors(maxcolors=1 << 24)
        return image.width, image.height, len(colours or [])


class Tables(HTMLParser):
    """The page's tables as lists of rows of cell texts, its images' sources, and any script or link out."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.outside: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs.get("src") or "")
        if tag in ("script", "iframe", "object") or any(
            k in ("src", "href") and v and not v.startswith("data:") for k, v in attrs.items()
        ):
            self.outside.append(f"{tag} {attrs}")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self.tables and self.tables[-1]:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def check_report(run_dir: Path, rounds: list[int], facilities: list[str]) -> tuple[Tables, dict]:
    """The report of `run_dir` made by the CLI: valid PNGs with more than one colour, a self-contained
    page whose tables hold every round and facility; returns the parsed page and report.json."""
    from conftest import run_cli

    proc = run_cli("report", run_dir, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = run_dir / "report"
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {"global_loss.png", "facility_loss.png", "timeline.png", "bytes.png"}
    for png in pngs:
        width, height, colours = decode_png(png)
        assert width > 200 and height > 100 and colours > 3, (png.name, width, height, colours)
    page = Tables()
    page.feed((out / "index.html").read_text(encoding="utf-8"))
    assert page.outside == [], page.outside
    assert len(page.images) == len(pngs) and all(src.startswith("data:image/png;base64,") for src in page.images)
    by_header = {tuple(t[0]): t[1:] for t in page.tables if t}
    rounds_table = next(rows for head, rows in by_header.items() if head[:2] == ("round", "global held-out loss"))
    assert [r[0] for r in rounds_table if not r[0].endswith("(initial)")] == [str(n) for n in rounds]
    facility_table = next(rows for head, rows in by_header.items() if head[:3] == ("round", "facility", "status"))
    assert sorted((r[0], r[1]) for r in facility_table) == sorted((str(n), f) for n in rounds for f in facilities)
    time_table = next(rows for head, rows in by_header.items() if head[:3] == ("round", "where", "staging in"))
    assert {r[0] for r in time_table} == {str(n) for n in rounds}
    data = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in data["rounds"]] == rounds
    for r in data["rounds"]:
        for name, f in r["facilities"].items():
            if f["status"] == "merged":
                assert re.fullmatch(r"sha256:[0-9a-f]{64}", f["update_digest"] or ""), (name, f)
                assert f["bytes_up"] > 0 and f["bytes_down"] > 0 and f["phases"]["training"] > 0, (name, f)
    return page, data
