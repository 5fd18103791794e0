"""The rendered reports open cleanly in a real browser (headless Chromium, no extra Python packages).

How Chromium is driven: one ``chromium --headless --dump-dom`` process per page, with ``--enable-logging=stderr
--v=0`` so every console message (errors, uncaught exceptions) appears on stderr as an ``INFO:CONSOLE`` line. Each
page is copied next to itself with a tiny inline script appended that, on ``load``, writes each ``<img>``'s
``naturalWidth`` and rendered ``clientWidth`` into ``data-nw`` / ``data-cw`` attributes and sets ``document.title``;
``--virtual-time-budget`` lets the load finish before the DOM is dumped. The window is 800 px wide (a report beside
another window on a laptop). A page fails on any console message, any image with ``naturalWidth`` 0, any
script/stylesheet/image URL that is neither ``data:`` nor an existing local file, any broken local link, and any
image without its own alternative text or whose smallest text renders under ``LEGIBLE_PX`` CSS pixels: the figure
records its smallest font in PNG pixels (``data-min-font-px``), and the browser shows it at ``clientWidth /
naturalWidth`` of that.
"""

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from blip2lib.workbook.runner import variant_params

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--window-size=800,900", "--dump-dom"]  # fmt: skip
PROBE = (
    "<script>window.addEventListener('load',()=>{document.querySelectorAll('img').forEach(i=>{"
    "i.setAttribute('data-nw',String(i.naturalWidth));i.setAttribute('data-cw',String(i.clientWidth));});"
    "document.title='probed:'+document.title;});</script>"
)
LEGIBLE_PX = 11  # smallest text a reader should have to read, in CSS pixels
NO_ALT = "No description has been provided for this image"  # what nbconvert writes where a figure had no alt text


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.resources, self.images, self.title = [], [], [], ""
        self.figures: list[dict] = []  # every <img>'s attributes
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag in ("img", "script") and a.get("src"):
            self.resources.append(a["src"])
        if tag == "link" and a.get("href"):
            self.resources.append(a["href"])
        if tag == "img":
            self.images.append(a.get("data-nw"))
            self.figures.append(a)
        self._in_title = tag == "title"

    def handle_data(self, data):
        if self._in_title:
            self.title += data

    def handle_endtag(self, tag):
        self._in_title = False


def _local(url: str, page: Path) -> Path | None:
    """The file a relative or file:// URL points to (None for data:, in-page anchors and web links)."""
    u = urlparse(url)
    if u.scheme in ("data", "http", "https", "mailto") or url.startswith("#"):
        return None
    return Path(unquote(u.path)) if u.scheme == "file" else (page.parent / unquote(u.path)).resolve()


def _load(page: Path, profile: Path) -> tuple[_Refs, list[str]]:
    probe = page.with_name(f".probe-{page.name}")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    try:
        proc = subprocess.run(["chromium", *FLAGS, f"--user-data-dir={profile}", probe.as_uri()],
                              capture_output=True, text=True, timeout=90)  # fmt: skip
    finally:
        probe.unlink()
    assert proc.returncode == 0, f"chromium failed on {page.name}: {proc.stderr[-2000:]}"
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]
    refs = _Refs()
    refs.feed(proc.stdout)
    return refs, console


def _check(page: Path, profile: Path) -> list[Path]:
    refs, console = _load(page, profile)
    assert refs.title.startswith("probed:"), f"{page.name}: the load event never fired (title {refs.title!r})"
    assert not console, f"{page.name}: console messages: {console}"
    assert all(nw not in (None, "0") for nw in refs.images), f"{page.name}: images not loaded: {refs.images}"
    for i, fig in enumerate(refs.figures):
        assert fig.get("alt") and fig["alt"] != NO_ALT, f"{page.name}: image {i} has no alternative text"
        assert fig.get("data-min-font-px"), f"{page.name}: image {i} does not say its smallest font size"
        shown = int(fig["data-cw"]) / int(fig["data-nw"]) * float(fig["data-min-font-px"])
        assert shown >= LEGIBLE_PX, (
            f"{page.name}: image {i} is illegible: its smallest text is {fig['data-min-font-px']} px in a "
            f"{fig['data-nw']} px wide PNG shown {fig['data-cw']} px wide = {shown:.1f} CSS px < {LEGIBLE_PX}"
        )
    for url in refs.resources:
        assert not re.match(r"https?:", url), f"{page.name}: loads {url} from the network"
        target = _local(url, page)
        assert target is None or target.exists(), f"{page.name}: missing resource {url}"
    linked = []
    for url in refs.links:
        target = _local(url, page)
        if target is not None:
            assert target.exists(), f"{page.name}: broken link {url}"
            linked.append(target)
    return linked


@pytest.mark.browser
@pytest.mark.notebook
@pytest.mark.timeout(1800)  # only the page loads when the smoke tests have filled the tree (they run first)
def test_index_and_every_linked_report_open_cleanly(smoke_tree, tmp_path):
    assert shutil.which("chromium")
    jobs = [smoke_tree(p) for p in variant_params("smoke")]
    index = smoke_tree.root / "reports" / "smoke" / "index.html"
    linked = _check(index, tmp_path / "profile")
    assert sorted(p.name for p in linked) == sorted(j.report.name for j in jobs), "index must link every report"
    for report in linked:
        _check(report, tmp_path / "profile")
        page = report.read_text()
        # a smoke run succeeds, so no output may be a stderr block (library noise is dropped; errors would show)
        assert 'data-mime-type="application/vnd.jupyter.stderr"' not in page, f"{report.name}: stderr block"
        assert "IProgress" not in page and "Kernel is running over TCP" not in page, report.name
        # a smoke run checks plumbing: no goal is ever "met" there, and the recorded numbers are shown as a table
        assert 'class="v-met"' not in page and 'class="v-missed"' not in page, f"{report.name}: a goal was judged"
        if report.name != "index.html":
            assert "<th" in page and ">measured<" in page, f"{report.name}: no results table"


@pytest.mark.browser
def test_the_checker_catches_broken_pages(tmp_path):
    """The checks above can fail: a console error, an image that does not load and a broken link are caught."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<html><head><title>t</title></head><body><img src="missing.png"><a href="gone.html">x</a>'
        "<script>console.error('boom')</script></body></html>"
    )
    refs, console = _load(page, tmp_path / "profile")
    assert any("boom" in ln for ln in console) and refs.images == ["0"]
    with pytest.raises(AssertionError, match="console messages"):
        _check(page, tmp_path / "profile")
    page.write_text('<html><head><title>t</title></head><body><a href="gone.html">x</a></body></html>')
    with pytest.raises(AssertionError, match="broken link gone.html"):
        _check(page, tmp_path / "profile")


def _figure_page(tmp_path: Path, figures: list, metadata: bool = True) -> Path:
    """A report (rendered by the runner's renderer) showing each figure as ``viz.show`` would (or bare PNGs)."""
    import base64

    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

    from blip2lib import viz
    from blip2lib.workbook.report import render_html

    outputs = []
    for fig in figures:
        png, meta = viz.png_output(fig)
        outputs.append(new_output("display_data", data={"image/png": base64.b64encode(png).decode()},
                                  metadata={"image/png": meta} if metadata else {}))  # fmt: skip
    nbformat.write(new_notebook(cells=[new_markdown_cell("# figures"), new_code_cell("", outputs=outputs)]),
                   tmp_path / "figures.ipynb")  # fmt: skip
    return render_html(tmp_path / "figures.ipynb", tmp_path / "figures.html")


def _old_gallery(images, captions):
    """The VQA gallery as reports drew it before: 4 tiles of 1.7 in at 80 dpi, 7 pt captions (7.8 px)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * 1.7, 2 * (1.7 + 0.7)), dpi=80, layout="constrained")
    for i, (img, cap) in enumerate(zip(images, captions)):
        ax = fig.add_subplot(2, 4, i + 1)
        ax.imshow(img)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(cap, fontsize=7)
        ax.set_title("opt", fontsize=8)
    fig.set_label("the old gallery")
    return fig


@pytest.mark.browser
def test_the_checker_catches_illegible_figures(tmp_path):
    """Today's VQA gallery passes at the 800 px window; the old one (7 pt captions) and a scaled-down figure fail."""
    import numpy as np
    from matplotlib.figure import Figure

    from blip2lib import viz

    images = [np.full((16, 16, 3), i / 8.0) for i in range(8)]
    captions = [f"what shape is object {i}? → circle" for i in range(8)]
    gallery = viz.image_gallery(images, captions, titles=["opt"] * 8)
    page = _figure_page(tmp_path, [gallery])
    _check(page, tmp_path / "profile")  # 12 px captions in a 704 px PNG, shown unscaled
    (fig,) = _load(page, tmp_path / "profile")[0].figures
    assert fig["data-min-font-px"] == "12.0" and fig["data-nw"] == fig["data-cw"] == "704"
    assert fig["alt"].startswith("8 images with their captions: opt: what shape is object 0? → circle;")
    with pytest.raises(AssertionError, match=r"image 0 is illegible: its smallest text is 7\.78 px .* = 7\.8 CSS px"):
        _check(_figure_page(tmp_path, [_old_gallery(images, captions)]), tmp_path / "profile")
    wide = Figure(figsize=(12, 2), dpi=80)  # 960 px: the browser scales it to the column (739 px at 800 px)
    wide.add_subplot().set_title("wide", fontsize=12 * 72 / 80)
    wide.axes[0].tick_params(labelsize=12 * 72 / 80)
    with pytest.raises(AssertionError, match=r"shown 7\d\d px wide = 9\.\d CSS px < 11"):
        _check(_figure_page(tmp_path, [wide]), tmp_path / "profile")
    with pytest.raises(AssertionError, match="image 0 has no alternative text"):
        _check(_figure_page(tmp_path, [gallery], metadata=False), tmp_path / "profile")
