"""Render an executed notebook into a self-contained HTML report in the fixed D8 page order.

1. header (what it reproduces, run id, params file, git commit, environment, hardware, date, wall time),
2. the "paper vs reproduced" table (from ``metrics.json``, stored there by ``compare_to_paper``),
3. the notebook's own outputs (input cells hidden; ``remove-cell``/``remove-input``/``remove-output`` tags honoured),
4. provenance last (params file, resolved config, environment watermark).

Sections 1–2 replace the header that ``start_run`` displayed (right after the title cell) and 4 replaces the output
of ``provenance()`` (the last cell); the "paper vs reproduced" output of ``compare_to_paper`` is dropped from its
cell because section 2 shows it. Outputs are found by their ``metadata.blip2.role`` mark. The page loads nothing
from the network (no require.js, MathJax or mermaid): reports open offline and in headless browsers without
console errors.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

# lab template minus every CDN script (require.js, MathJax, mermaid, widgets)
_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{#- a PNG keeps the alt text and smallest font size that blip2lib.viz.show recorded (the lab template drops both) -#}
{% block data_png scoped %}
{%- set alt = output | get_metadata('alt', 'image/png') -%}
{%- set px = output | get_metadata('min_font_px', 'image/png') -%}
{%- set width = output | get_metadata('width', 'image/png') -%}
<div class="jp-RenderedImage jp-OutputArea-output {{ extra_class }}">
<img src="data:image/png;base64,{{ output.data['image/png'] | escape_html }}"
{%- if alt is not none %} alt="{{ alt | escape_html }}"{% endif %}
{%- if px is not none %} data-min-font-px="{{ px | escape_html }}"{% endif %}
{%- if width is not none %} width="{{ width | escape_html }}"{% endif %}>
</div>
{% endblock data_png %}
{% block extra_css %}<style>.blip2-section th,.blip2-section td{text-align:left !important}
.blip2-section pre{font-family:ui-monospace,Menlo,Consolas,monospace}
.v-match,.v-met{color:#17692b}.v-differs,.v-missed{color:#b00020}.v-failed{color:#b00020;font-weight:bold}</style>
{% endblock extra_css %}
"""
ROLES = ("header", "paper-table", "provenance")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _kv_table(pairs: list[tuple[str, object]]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in pairs)
    return f"<table>{rows}</table>"


def _title(nb) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            m = re.search(r"^#+\s*(.+)$", cell.source, flags=re.M)
            if m:
                return m.group(1).strip()
    return ""


def _paper_table(rows: list[dict]) -> str:
    if not rows:
        return "<p>No paper targets for this run.</p>"
    cols = ["metric", "target", "reproduced", "paper / goal", "delta", "tolerance", "baseline", "verdict"]
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = ""
    for r in rows:
        cells = "".join(f"<td>{'' if r.get(c) is None else html.escape(str(r.get(c)))}</td>" for c in cols[:-1])
        verdict = html.escape(str(r.get("verdict", "")))
        body += f'<tr>{cells}<td class="v-{verdict.replace(" ", "-")}">{verdict}</td></tr>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def sections(run_dir: Path, context: dict, title: str = "") -> tuple[str, str]:
    """The top (header + paper table) and bottom (provenance) HTML of a report.

    Args:
        run_dir: the run folder (``env.json``, ``metrics.json``, ``config.resolved.yaml`` are read if present).
        context: the runner's facts: ``run_id``, ``params_file``, ``params_text``, ``status``, ``wall_time_s``,
            ``finished``.
        title: what the notebook reproduces (its first Markdown heading).

    Returns:
        ``(top, bottom)`` HTML fragments.
    """
    env = _read_json(run_dir / "env.json")
    if not env:  # the kernel failed before start_run: describe the runner's own environment
        from .run import environment

        env = environment()
    metrics = _read_json(run_dir / "metrics.json")
    status = context.get("status", "ok")
    versions = ", ".join(f"{k} {env.get(k)}" for k in ("python", "torch", "transformers", "timm") if env.get(k))
    header = _kv_table([("reproduces", title or context.get("run_id", "")), ("run id", context.get("run_id", "")),
                        ("params file", context.get("params_file", "")), ("git commit", env.get("git_commit", "")),
                        ("environment", versions), ("hardware", env.get("device", "")),
                        ("finished", context.get("finished", "")),
                        ("wall time", f"{float(context.get('wall_time_s', 0.0)):.1f} s"),
                        ("status", status)])  # fmt: skip
    banner = '<p class="v-failed">This run FAILED: the error is shown below.</p>' if status != "ok" else ""
    top = (f'<section class="blip2-section" id="run-header">{banner}{header}</section>'
           f'<section class="blip2-section" id="paper-vs-reproduced"><h3>Paper vs reproduced</h3>'
           f"{_paper_table(metrics.get('comparison', []))}</section>")  # fmt: skip
    cfg_path = run_dir / "config.resolved.yaml"
    cfg = cfg_path.read_text() if cfg_path.exists() else ""
    bottom = (f'<section class="blip2-section" id="provenance-details">'
              f"<h4>params file {html.escape(context.get('params_file', ''))}</h4>"
              f"<pre>{html.escape(context.get('params_text', ''))}</pre>"
              f"<h4>resolved config</h4><pre>{html.escape(cfg)}</pre>"
              f"<h4>environment</h4>{_kv_table(sorted(env.items()))}</section>")  # fmt: skip
    return top, bottom


def _html_cell(fragment: str):
    from nbformat.v4 import new_code_cell, new_output

    out = new_output("display_data", data={"text/html": fragment})
    return new_code_cell("", outputs=[out], metadata={"tags": ["remove-input"]})


def _place_sections(nb, top: str, bottom: str) -> None:
    """Put ``top`` where ``start_run`` showed its header and ``bottom`` where ``provenance()`` ran.

    The marked "paper vs reproduced" output is dropped (it is part of ``top``). Unmarked notebooks get ``top`` after
    their title cell and ``bottom`` at the end.
    """
    placed = {"header": False, "provenance": False}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for o in cell.get("outputs", []):
            role = o.get("metadata", {}).get("blip2", {}).get("role")
            if role in placed and not placed[role]:
                kept.append(_html_cell(top if role == "header" else bottom).outputs[0])
                placed[role] = True
            elif role not in ROLES:
                kept.append(o)
        cell.outputs = kept
    if not placed["header"]:
        first = 1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0
        nb.cells.insert(first, _html_cell(top))
    if not placed["provenance"]:
        nb.cells.append(_html_cell("<h2>Provenance</h2>" + bottom))


def drop_stderr(nb) -> int:
    """Remove every stderr stream output (library warnings, progress bars); returns how many.

    A report shows what the notebook says. What libraries print to stderr (tqdm bars and their "IProgress not
    found" warning, transformers' loading bars) stays in the executed notebook in the report's run folder; errors
    are ``error`` outputs, not streams, so a failed cell still shows its traceback.
    """
    dropped = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = cell.get("outputs", [])
        kept = [o for o in outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
        dropped += len(outputs) - len(kept)
        cell.outputs = kept
    return dropped


def render_html(executed: Path, out: Path, hide_input: bool = True, context: dict | None = None) -> Path:
    """Write the HTML report of an executed notebook.

    Args:
        executed: the executed notebook (papermill output).
        out: the HTML file to write.
        hide_input: hide every input cell (reports); ``False`` keeps code visible (failure pages).
        context: runner facts for the header and provenance (see :func:`sections`); ``None`` renders the notebook
            alone.

    Returns:
        ``out``.
    """
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    from traitlets.config import Config

    c = Config()
    c.TagRemovePreprocessor.remove_cell_tags = ("remove-cell",)
    c.TagRemovePreprocessor.remove_input_tags = ("remove-input",)
    c.TagRemovePreprocessor.remove_all_outputs_tags = ("remove-output",)
    c.TagRemovePreprocessor.enabled = True
    exporter = HTMLExporter(config=c, exclude_input=hide_input, exclude_input_prompt=True,
                            exclude_output_prompt=True, embed_images=True, template_file="blip2_report.html.j2",
                            extra_loaders=[jinja2.DictLoader({"blip2_report.html.j2": _TEMPLATE})])  # fmt: skip
    exporter.register_preprocessor(TagRemovePreprocessor(config=c), True)
    nb = nbformat.read(executed, as_version=4)
    if context is not None:
        hidden = drop_stderr(nb)
        top, bottom = sections(Path(executed).parent, context, _title(nb))
        if hidden:  # say where the hidden messages are, so nothing is lost from view silently
            bottom += (f'<p class="blip2-section">{hidden} stderr message(s) of libraries are not shown here; they are '
                       f"in {html.escape(Path(executed).name)} in the run folder.</p>")  # fmt: skip
        _place_sections(nb, top, bottom)
    if context is not None:
        nb.metadata["title"] = context.get("run_id", "")
    body, _ = exporter.from_notebook_node(nb)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(body)
    return out
