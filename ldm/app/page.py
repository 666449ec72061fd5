"""The page's HTML: the form made from `ldm.app.form`'s fields, with the stylesheet and script inlined.

Everything the page needs is in this one document (ldm/app/static/page.css and page.js are pasted
in, the icon is an empty data: URL), so a browser requests nothing but the page, the form's JSON
calls and the generated images, all from the server itself. Fonts are the system's.
"""
from __future__ import annotations

from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from ldm.app.form import FormField

if TYPE_CHECKING:
    from ldm.app.server import App

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_PROMPT = "a red chair"
GROUPS_HELP = ("the UNet's self-attention layers in which every image also attends to the other images: a "
               "path (down, mid, up), a path at one level (up.32) or a level on every path (32); none "
               "ticked: no sharing. With sharing the page also makes the same seeds without it.")
PER_IMAGE_HELP = "one prompt per line, one image each (a little story); the images count follows the lines"


def field_id(field: FormField) -> str:
    return "field-" + field.flag.lstrip("-")


def render_field(field: FormField) -> str:
    """One labelled input with its flag and its one-line explanation."""
    ident = field_id(field)
    attrs = f'id="{ident}" data-flag="{escape(field.flag)}"'
    if field.kind == "checkbox":
        control = f'<input type="checkbox" {attrs}>'
    elif field.kind == "reference":
        control = (f'<input type="file" {attrs} accept="image/png,image/jpeg" multiple>'
                   '<span class="chosen" id="references-chosen"></span>')
    elif field.kind == "select":
        options = "".join(f'<option value="{escape(c)}"{" selected" if c == field.value else ""}>{escape(c)}</option>'
                          for c in field.choices)
        control = f'<select {attrs}><option value="">(default)</option>{options}</select>'
    else:
        control = f'<input type="text" {attrs} value="{escape(field.value)}" autocomplete="off">'
    return (f'<div class="field"><label for="{ident}">{escape(field.label)} <code>{escape(field.flag)}</code>'
            f'</label>{control}<small>{escape(field.help)}</small></div>')


def render_groups(groups: list[str]) -> str:
    boxes = "".join(f'<label class="group"><input type="checkbox" name="groups" value="{escape(g)}" '
                    f'id="group-{escape(g)}"{" checked" if g == "all" else ""}> {escape(g)}</label>' for g in groups)
    return (f'<div class="field"><span class="label">layer groups <code>--shared-attn</code></span>'
            f'<div class="groups">{boxes}</div><small>{escape(GROUPS_HELP)}</small></div>')


def render_page(app: "App") -> str:
    source = app.model.source
    model = escape(f"{source.get('config', 'model')} + {source.get('ckpt', '')}")
    basic = "".join(render_field(f) for f in app.basic)
    sharing = "".join(render_field(f) for f in app.sharing)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Consistent sets: shared self-attention</title>
<link rel="icon" href="data:,"><meta name="viewport" content="width=device-width, initial-scale=1">
<style>{(STATIC / "page.css").read_text(encoding="utf-8")}</style></head>
<body><header><h1>Consistent sets</h1><p>Batch-shared self-attention on <code>{model}</code>, running on
this machine only.</p></header>
<form id="form"><section><h2>Prompt</h2>
<textarea id="prompt" rows="3">{DEFAULT_PROMPT}</textarea>
<label class="check"><input type="checkbox" id="per-image"> {escape(PER_IMAGE_HELP)}</label>
<div class="fields">{basic}</div></section>
<section><h2>Shared self-attention</h2>{render_groups(app.groups)}<div class="fields">{sharing}</div></section>
<div class="run"><button type="submit" id="generate">Generate</button>
<button type="button" id="cancel" hidden>Cancel</button>
<progress id="progress" value="0" max="1"></progress> <span id="progress-text"></span></div>
<p id="error" role="alert" hidden></p></form>
<section id="result" hidden><h2>Without and with sharing</h2><table id="grid"></table>
<p>Click an image to download it (PNG with its settings); <a id="grid-link" download>download the grid</a>.</p>
<h3>The same with the command line</h3><pre id="command"></pre><h3>Settings</h3><pre id="settings"></pre></section>
<script>{(STATIC / "page.js").read_text(encoding="utf-8")}</script></body></html>
"""
