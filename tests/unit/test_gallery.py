"""docs/gallery's script: screenshots of a variant's reports at a stated width, and a README it writes itself."""

import base64
import json
import shutil

import nbformat
import numpy as np
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from blip2lib import viz
from blip2lib.workbook.gallery import Shot, main, make_gallery
from blip2lib.workbook.report import render_html


def test_missing_reports_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["--reports", str(tmp_path / "reports"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "index.html" in err and "make demo" in err
    assert not (tmp_path / "out").exists()


def _report(folder, name, title, tall=False):
    """A tiny report rendered by the runner's renderer: a title, a table, a gallery figure under its own cell."""
    png, meta = viz.png_output(viz.image_gallery([np.full((8, 8, 3), 0.2)] * 4, ["what colour? → red"] * 4))
    figure = new_output("display_data", data={"image/png": base64.b64encode(png).decode()},
                        metadata={"image/png": meta})  # fmt: skip
    table = new_output("display_data", data={"text/html": "<table><tr><th>measured</th><td>1.0</td></tr></table>"})
    cells = [new_markdown_cell(f"# {title}"), new_code_cell("", outputs=[table])]
    if tall:
        cells.append(new_markdown_cell("\n\n".join(f"paragraph {i}" for i in range(60))))
    cells += [new_markdown_cell("## Answers"), new_code_cell("", outputs=[figure])]
    cells[-2]["id"] = "gallery-md"
    nbformat.write(new_notebook(cells=cells), folder / f"{name}.ipynb")
    return render_html(folder / f"{name}.ipynb", folder / f"{name}.html")


@pytest.mark.browser
def test_gallery_writes_pngs_of_the_stated_width_and_lists_them(tmp_path):
    reports = tmp_path / "reports" / "smoke"
    reports.mkdir(parents=True)
    _report(reports, "10_a", "10 · Stage one", tall=True)
    (reports / "index.html").write_text('<html><body><h1>smoke</h1><a href="10_a.html">10_a</a></body></html>')
    (tmp_path / "runs" / "10_a" / "smoke").mkdir(parents=True)
    (tmp_path / "runs" / "10_a" / "smoke" / "env.json").write_text(json.dumps({"git_commit": "abc1234"}))
    shots = (Shot("index", "index.html", "", "the index"), Shot("top", "10_a.html", "", "a report"),
             Shot("answers", "10_a.html", "cell-id=gallery-md", "its gallery"))  # fmt: skip
    out = tmp_path / "gallery"
    files = make_gallery(tmp_path / "reports", out, "smoke", shots, command="the-command", width=640, max_height=500)
    assert [f.name for f in files] == ["index.png", "top.png", "answers.png", "README.md"]
    from PIL import Image

    sizes = {f.name: Image.open(f).size for f in files[:3]}
    assert {w for w, _ in sizes.values()} == {640}
    assert sizes["top.png"][1] == 500  # the tall report is cut at max_height
    assert sizes["index.png"][1] < 200  # a short page: the blank window below it is trimmed
    assert sizes["answers.png"][1] < 500 and Image.open(out / "answers.png").tobytes() != Image.open(
        out / "top.png").crop((0, 0, 640, sizes["answers.png"][1])).tobytes()  # fmt: skip
    readme = (out / "README.md").read_text()
    for name, shows in (("index.png", "the index"), ("top.png", "a report"), ("answers.png", "its gallery")):
        assert f"| [{name}]({name}) | {shows} |" in readme and f"![{shows}]({name})" in readme
    assert "`reports/smoke/10_a.html#cell-id=gallery-md`" in readme and "at commit abc1234" in readme
    assert "`the-command` at commit " in readme and "640 px wide" in readme and "at most 500 px" in readme
    (out / "mine.png").write_bytes(b"a user's own file")  # not written by the gallery: never deleted
    make_gallery(tmp_path / "reports", out, "smoke", shots[:2], command="again", width=640, max_height=500)
    # no unlisted leftover of ours, and the user's file is untouched
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "index.png", "mine.png", "top.png"]
    assert (out / "mine.png").read_bytes() == b"a user's own file"


@pytest.mark.browser
def test_gallery_names_a_missing_anchor(tmp_path):
    reports = tmp_path / "reports" / "smoke"
    reports.mkdir(parents=True)
    shutil.copy(_report(reports, "10_a", "10 · Stage one"), reports / "index.html")
    with pytest.raises(RuntimeError, match="no element with id 'cell-id=nope' in .*10_a.html"):
        make_gallery(tmp_path / "reports", tmp_path / "out", "smoke", (Shot("x", "10_a.html", "cell-id=nope", "x"),))
