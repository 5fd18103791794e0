"""docs/gallery: the README links it, its README lists every screenshot, and the screenshots stay small."""

import re
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
GALLERY = ROOT / "docs" / "gallery"


def test_readme_links_the_gallery_and_the_link_resolves():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### What a report looks like") :].split("\n## ", 1)[0]
    targets = re.findall(r"\]\(([^)#\s]+)\)", section)
    assert "docs/gallery/README.md" in targets
    for target in targets:
        assert (ROOT / target).is_file(), f"README 'What a report looks like' links {target}, which is not in the repo"


def test_every_screenshot_is_listed_and_every_listed_file_exists():
    readme = (GALLERY / "README.md").read_text()
    listed = set(re.findall(r"\]\(([^)\s]+\.png)\)", readme))
    on_disk = {p.name for p in GALLERY.glob("*.png")}
    assert on_disk and listed == on_disk, f"unlisted: {sorted(on_disk - listed)}, missing: {sorted(listed - on_disk)}"
    assert "python -m blip2lib.workbook.gallery" in readme and re.search(r"at commit [0-9a-f]{7}", readme)


def test_screenshots_have_the_stated_width_and_stay_small():
    readme = (GALLERY / "README.md").read_text()
    width = int(re.search(r"(\d+) px wide", readme).group(1))
    for png in sorted(GALLERY.glob("*.png")):
        assert png.stat().st_size <= 300_000, f"{png.name}: {png.stat().st_size} bytes (keep each under 300 kB)"
        with Image.open(png) as img:
            assert img.width == width, f"{png.name}: {img.width} px wide, the README says {width}"
