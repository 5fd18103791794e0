"""Screenshots of rendered reports for ``docs/gallery/``: what a report looks like before anyone runs ``make demo``.

Each shot opens one page of ``reports/<variant>/`` in headless Chromium (``--screenshot``, a fixed window width, one
CSS pixel per PNG pixel), optionally starting at a cell (``cell-id=...``, the id nbconvert gives every cell: a copy
of the page hides everything before it, since headless screenshots ignore a ``#fragment`` scroll). It keeps at most
``--max-height`` pixels, trims the blank page below the content and stores a 256-colour palette PNG (text and flat
colours survive; a 1280 × 1200 shot stays well under 300 kB). ``README.md`` beside the PNGs is written by this
script too: what each PNG shows, the commit of the runs the reports came from, and the command that made the
screenshots. Usage::

    make demo                                         # the toy reports under reports/toy/
    python -m blip2lib.workbook.gallery               # → docs/gallery/*.png + docs/gallery/README.md
    python -m blip2lib.workbook.gallery --variant smoke --reports /tmp/tree/reports --out /tmp/gallery
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .run import REPO_ROOT, git_commit

WIDTH = 1280  # CSS px = PNG px: a laptop screen; the index's table needs it (at 800 px it is cut after 'rehearsal')
MAX_HEIGHT = 1200  # PNG px: the top of a page (header, paper table, first figures); keeps each file small


@dataclass(frozen=True)
class Shot:
    """One screenshot: ``page`` (a file under ``reports/<variant>/``) scrolled to ``anchor`` (a cell's id or '')."""

    name: str  # the PNG's stem in the output folder
    page: str
    anchor: str
    shows: str  # one line for the README


SHOTS = (  # the default gallery; --shots picks others by name from SHOTS + EXTRA_SHOTS
    Shot("index", "index.html", "", "the index of a variant: one row per notebook, its status, verdicts and report"),
    Shot("20_stage2_pretrain", "20_stage2_pretrain.html", "",
         "a training report (stage 2, OPT and T5): run header, paper-vs-reproduced table, training summary"),
    Shot("20_stage2_pretrain_curves", "20_stage2_pretrain.html", "cell-id=curves-md",
         "the same report further down: loss curves and validation metrics against step"),
    Shot("41_zeroshot_vqa", "41_zeroshot_vqa.html", "", "an evaluation report (zero-shot VQA): header and targets"),
    Shot("41_zeroshot_vqa_answers", "41_zeroshot_vqa.html", "cell-id=gallery-md",
         "the same report further down: each model's answers to the first questions (the VQA gallery)"),
)  # fmt: skip
EXTRA_SHOTS = (
    Shot("10_stage1_pretrain", "10_stage1_pretrain.html", "", "the stage-1 training report: header and targets"),
    Shot("01_toy_world_scenes", "01_toy_world.html", "cell-id=gallery-md",
         "the toy world's first test scenes with their captions and one question each"),
    Shot("43_vqa_finetuned_answers", "43_vqa_finetuned.html", "cell-id=gallery-md",
         "fine-tuned VQA: each model's answers to the first questions"),
)  # fmt: skip


# hides every element before the anchor: its earlier siblings, and theirs at each level up to <body>
_FROM_ANCHOR = """<script>(()=>{for(let e=document.getElementById(ANCHOR);e&&e!==document.body;e=e.parentElement)
{for(let s=e.previousElementSibling;s;s=s.previousElementSibling){s.style.display='none';}}})();</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    raise FileNotFoundError("no chromium / chromium-browser / google-chrome on PATH: the gallery needs a browser")


def screenshot(page: Path, out: Path, anchor: str = "", width: int = WIDTH, max_height: int = MAX_HEIGHT) -> Path:
    """Save the top ``max_height`` pixels of ``page`` (from ``anchor``) as an optimised palette PNG ``width`` wide.

    Args:
        page: an HTML file.
        out: the PNG to write.
        anchor: an element id to scroll to first ('' for the top of the page).
        width: window width in CSS pixels (the PNG is exactly this wide).
        max_height: the most rows kept; blank rows at the bottom (a short page) are trimmed.

    Returns:
        ``out``.

    Raises:
        FileNotFoundError: ``page`` or the browser is missing.
        RuntimeError: ``anchor`` is not in the page, or Chromium failed or wrote no screenshot.
    """
    from PIL import Image, ImageChops

    page = Path(page).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"no report {page}: run `make demo` (or the notebook) first")
    url = page.as_uri()
    with tempfile.TemporaryDirectory() as tmp:
        if anchor:  # reports are self-contained (data: images, inline styles): a copy elsewhere renders the same
            text = page.read_text()
            if f'id="{anchor}"' not in text:
                raise RuntimeError(f"no element with id {anchor!r} in {page} (a renamed notebook cell?)")
            copy = Path(tmp) / page.name
            copy.write_text(text.replace("</body>", _FROM_ANCHOR.replace("ANCHOR", json.dumps(anchor))
                                                     + "</body>"))  # fmt: skip
            url = copy.as_uri()
        raw = Path(tmp) / "shot.png"
        cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--force-device-scale-factor=1", f"--user-data-dir={Path(tmp) / 'profile'}",
               f"--window-size={width},{max_height}", "--virtual-time-budget=5000", f"--screenshot={raw}",
               url]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 or not raw.exists():
            raise RuntimeError(f"chromium could not screenshot {page}: {proc.stderr[-1000:]}")
        img = Image.open(raw).convert("RGB")
    # a short page leaves the window's white below it: keep down to the last non-white row, plus a margin
    box = ImageChops.difference(img, Image.new("RGB", img.size, "white")).getbbox()
    bottom = min(img.height, (box[3] + 16) if box else img.height)
    img = img.crop((0, 0, img.width, bottom))
    out.parent.mkdir(parents=True, exist_ok=True)
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    return out


def _demo_commits(runs: Path, variant: str, pages: set[str]) -> list[str]:
    """The git commits recorded by the runs behind ``pages`` (``runs/<notebook>/<variant>/env.json``)."""
    commits = []
    for stem in sorted(pages):
        env = runs / stem / variant / "env.json"
        if env.exists():
            commits.append(json.loads(env.read_text()).get("git_commit", "unknown"))
    return sorted(set(commits))


def write_readme(out: Path, rows: list[tuple[Shot, Path]], variant: str, command: str, report_commits: list[str],
                 commit: str, width: int = WIDTH, max_height: int = MAX_HEIGHT) -> Path:  # fmt: skip
    """``out/README.md``: each PNG, what it shows, where it came from and how to make it again."""
    made_by = "`make demo`" if variant == "toy" else f"`python -m blip2lib.workbook run-all {variant}`"
    lines = [
        "# Gallery: what a report looks like",
        "",
        f"Screenshots of the `{variant}` reports of {made_by}, taken in headless Chromium {width} px wide",
        f"(the top of each page, at most {max_height} px). This file and the PNGs are written by",
        "`python -m blip2lib.workbook.gallery`; do not edit them by hand.",
        "",
        f"- reports: {made_by} at commit {', '.join(report_commits) or 'unknown'} (the runs' `env.json`)",
        f"- screenshots: `{command}` at commit {commit}",
        "",
        "| file | shows | page |",
        "|---|---|---|",
    ]
    for shot, png in rows:
        src = f"reports/{variant}/{shot.page}" + (f"#{shot.anchor}" if shot.anchor else "")
        lines.append(f"| [{png.name}]({png.name}) | {shot.shows} | `{src}` |")
    lines += ["", *[f"![{shot.shows}]({png.name})" for shot, png in rows], ""]
    readme = out / "README.md"
    readme.write_text("\n".join(lines))
    return readme


def _listed_pngs(readme: Path) -> set[str]:
    """The PNG file names a gallery README written by :func:`write_readme` lists (none if there is no README)."""
    if not readme.is_file():
        return set()
    return set(re.findall(r"^\| \[([^\]/\\]+\.png)\]\(", readme.read_text(), flags=re.MULTILINE))


def make_gallery(reports: Path, out: Path, variant: str = "toy", shots: tuple[Shot, ...] = SHOTS,
                 runs: Path | None = None, command: str = "", width: int = WIDTH,
                 max_height: int = MAX_HEIGHT) -> list[Path]:  # fmt: skip
    """Screenshot every shot of ``reports/<variant>/`` into ``out`` and write ``out/README.md``.

    Args:
        reports: the reports root (``reports/``), holding ``<variant>/index.html`` and the reports.
        out: the gallery folder (e.g. ``docs/gallery``); PNGs its previous README listed that are no longer shots are
            removed (other files are left alone).
        variant: which variant's reports.
        shots: what to take.
        runs: the runs root (``runs/``), for the commits the reports came from; default ``reports``' sibling.
        command: the command line recorded in the README.
        width: window and PNG width in pixels.
        max_height: the most rows of each PNG.

    Returns:
        The PNGs and the README, in order.
    """
    folder = Path(reports) / variant
    missing = [s.page for s in shots if not (folder / s.page).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: no {', '.join(sorted(set(missing)))}: run `make demo` first")
    out = Path(out)
    made_before = _listed_pngs(out / "README.md")  # what an earlier run of this command wrote here
    rows = [(s, screenshot(folder / s.page, out / f"{s.name}.png", s.anchor, width, max_height)) for s in shots]
    # a shot dropped from the list must not linger unlisted; any other PNG in the folder is not ours to delete
    for name in sorted(made_before - {png.name for _, png in rows}):
        (out / name).unlink(missing_ok=True)
    runs = Path(runs) if runs is not None else Path(reports).parent / "runs"
    stems = {Path(s.page).stem for s in shots if s.page != "index.html"}
    commits = _demo_commits(runs, variant, stems)
    readme = write_readme(out, rows, variant, command, commits, git_commit(REPO_ROOT), width, max_height)
    return [png for _, png in rows] + [readme]


def main(argv: list[str] | None = None) -> int:
    """Command line: exit 0 with the files written, 2 with one line when reports or the browser are missing."""
    ap = argparse.ArgumentParser(prog="python -m blip2lib.workbook.gallery", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--variant", default="toy", help="whose reports (default: toy, what `make demo` renders)")
    ap.add_argument("--reports", type=Path, default=REPO_ROOT / "reports", help="reports root (default: reports/)")
    ap.add_argument("--runs", type=Path, default=None, help="runs root, for the reports' commits (default: runs/)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "gallery", help="default: docs/gallery/")
    ap.add_argument("--width", type=int, default=WIDTH, help=f"PNG width in pixels (default {WIDTH})")
    ap.add_argument("--max-height", type=int, default=MAX_HEIGHT, help=f"most rows per PNG (default {MAX_HEIGHT})")
    known = {s.name: s for s in SHOTS + EXTRA_SHOTS}
    ap.add_argument("--shots", nargs="+", choices=sorted(known), default=[s.name for s in SHOTS], metavar="NAME",
                    help=f"which screenshots, in order (default: {' '.join(s.name for s in SHOTS)}; "
                         f"known: {', '.join(sorted(known))})")  # fmt: skip
    args = ap.parse_args(argv)
    command = shlex.join(["python", "-m", "blip2lib.workbook.gallery", *(sys.argv[1:] if argv is None else argv)])
    try:
        files = make_gallery(args.reports, args.out, args.variant, tuple(known[n] for n in args.shots), runs=args.runs,
                             command=command, width=args.width, max_height=args.max_height)  # fmt: skip
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in files:
        print(f"{f} ({f.stat().st_size / 1024:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
