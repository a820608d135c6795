"""The admin tab: the project's numbers at a glance, refreshed on their own, and disabling a labeler.

Filled when the page opens and every ``REFRESH_S`` seconds after (a timer that only admins' pages
run), or on *Refresh*: a summary with warnings, votes over time as a chart (inline SVG), one row per labeler
with out-of-range numbers marked, agreement per labeler pair. *Disable and re-queue* blocks the
chosen labeler, ends their sessions and returns their comparisons to the pool
(:mod:`feedback_ui.requeue`). Everything shown is text in tables or escaped Markdown.
"""

from __future__ import annotations

import html
from datetime import datetime

import gradio as gr

from feedback_ui.http_policy import EVENT_OPTIONS
from feedback_ui.requeue import disable_and_requeue
from feedback_ui.stats import NOT_ENOUGH, agreement_text, collect_stats, shown

REFRESH_S = 10.0
WARN = "⚠"
LABELER_HEADERS = ["labeler", "role", "status", "done", "voided", "skipped", "open", "median s/item", "picked A",
                   "gold", "gold acc.", "agreement", "check"]  # fmt: skip
PAIR_HEADERS = ["labeler", "labeler", "shared items", "Cohen's kappa", "check"]


def _md(text: str) -> str:
    """Escape Markdown in user-given text (account names allow '_', '.', '@', '-')."""
    return "".join(f"\\{ch}" if ch in "\\`*_{}[]()#+-.!|<>~" else ch for ch in str(text))


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def summary_markdown(stats: dict) -> str:
    """Progress, agreement and the list of warnings, for people (no raw None)."""
    c, a = stats["counts"], stats["agreement"]
    share = c["comparisons_complete"] / c["comparisons"] if c["comparisons"] else None
    lines = [
        f"**{c['comparisons_complete']} of {c['comparisons']} comparisons complete ({_pct(share)})** · "
        f"{c['votes']} votes counted, {c['voided']} voided · {c['open']} open, {c['skipped']} skipped · "
        f"{c['gold_items']} gold items",
        "",
        _md(agreement_text(a)[0].upper() + agreement_text(a)[1:]) + ".",
    ]
    warnings = [f"{WARN} {_md(u['name'])}: {_md(flag)}" for u in stats["labelers"] for flag in u["flags"]]
    warnings += [f"{WARN} {_md(' & '.join(p['labelers']))}: {_md(flag)}" for p in a["pairwise"] for flag in p["flags"]]
    lines += ["", *(f"- {w}" for w in warnings)] if warnings else ["", "No labeler out of range."]
    return "\n".join(lines)


def labeler_rows(stats: dict) -> list[list]:
    rows = []
    for u in stats["labelers"]:
        rows.append([
            u["name"], u["role"], "disabled" if u["disabled"] else "active", u["done"], u["voided"], u["skipped"],
            u["open"], shown(u["median_seconds"]), _pct(u["side_a_rate"]), u["gold_items"], _pct(u["gold_accuracy"]),
            _pct(u["agreement"]), "; ".join(f"{WARN} {f}" for f in u["flags"]) or "ok",
        ])  # fmt: skip
    return rows


def pair_rows(stats: dict) -> list[list]:
    return [[*p["labelers"], p["items"], shown(p["cohen_kappa"], NOT_ENOUGH),
             "; ".join(f"{WARN} {f}" for f in p["flags"]) or "ok"] for p in stats["agreement"]["pairwise"]]  # fmt: skip


def timeline_svg(timeline: list[dict], width: int = 640, height: int = 180) -> str:
    """Votes over time as an inline SVG (no script, numbers and times only): bars for the votes in each
    bucket, a line for the running total, first/last time and the total as labels. Shown through a
    sanitised Markdown (Gradio's HTML and plot components evaluate script, which the page's CSP forbids)."""
    if not timeline:
        return '<p id="admin-chart-empty">No votes yet.</p>'
    left, right, top, bottom = 8, 8, 22, 22
    w, h = width - left - right, height - top - bottom
    n, total, most = len(timeline), timeline[-1]["total"], max(r["votes"] for r in timeline)
    step = w / n
    bars, points = [], []
    for i, r in enumerate(timeline):
        bar = h * r["votes"] / most if most else 0
        bars.append(f'<rect x="{left + i * step + step * 0.1:.1f}" y="{top + h - bar:.1f}" '
                    f'width="{step * 0.8:.1f}" height="{bar:.1f}" fill="#fdba74"/>')  # fmt: skip
        points.append(f"{left + (i + 0.5) * step:.1f},{top + h - h * r['total'] / total:.1f}")
    first, last = (html.escape(timeline[k]["time"].replace("T", " ")) for k in (0, -1))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
        f'<text x="{left}" y="14" font-size="12" fill="#374151">{total} votes counted (line: running total; '
        f"bars: votes per {_bucket_words(timeline)})</text>"
        + "".join(bars)
        + f'<polyline points="{" ".join(points)}" fill="none" stroke="#ea580c" stroke-width="2"/>'
        f'<text x="{left}" y="{height - 6}" font-size="11" fill="#6b7280">{first} UTC</text>'
        f'<text x="{width - right}" y="{height - 6}" font-size="11" fill="#6b7280" text-anchor="end">{last} UTC</text>'
        "</svg>"
    )


def _bucket_words(timeline: list[dict]) -> str:
    if len(timeline) < 2:
        return "time bucket"
    a, b = (datetime.fromisoformat(timeline[k]["time"]) for k in (0, 1))
    minutes = int((b - a).total_seconds() // 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h" if minutes < 1440 else f"{minutes // 1440} d"


def can_disable(stats: dict) -> list[str]:
    return [u["name"] for u in stats["labelers"] if u["role"] == "labeler" and not u["disabled"]]


def build_admin_tab(store, require_admin, api):
    """Components and events of the admin tab; call inside its ``gr.Tab``. ``require_admin(request)`` raises
    for anyone but an admin; ``api(fn, *args)`` calls ``fn`` with errors made short messages. Returns ``(opened, outputs)`` for the page's load event: ``opened(is_admin)``
    gives the numbers and starts the timer for admins, and changes nothing for everyone else."""
    refresh = gr.Button("Refresh", elem_id="btn-admin", size="sm")
    summary = gr.Markdown(elem_id="admin-summary")
    chart = gr.Markdown(elem_id="admin-chart", sanitize_html=True)
    table = gr.Dataframe(headers=LABELER_HEADERS, interactive=False, elem_id="admin-table", wrap=True)
    pairs = gr.Dataframe(headers=PAIR_HEADERS, interactive=False, elem_id="admin-pairs", label="Agreement per pair")
    with gr.Row():
        who = gr.Dropdown([], label="Labeler", elem_id="admin-who", scale=2)
        disable = gr.Button("Disable and re-queue their votes", variant="stop", elem_id="btn-disable", scale=1)
    done = gr.Markdown(elem_id="admin-done")
    timer = gr.Timer(REFRESH_S, active=False)
    numbers = [summary, chart, table, pairs, who]

    def view(stats: dict, keep_choice=None) -> list:
        names = can_disable(stats)
        return [summary_markdown(stats), timeline_svg(stats["timeline"]), labeler_rows(stats), pair_rows(stats),
                gr.update(choices=names, value=keep_choice if keep_choice in names else None)]  # fmt: skip

    def on_refresh(choice, request: gr.Request):
        require_admin(request)
        return view(api(collect_stats, store), choice)

    def opened(is_admin: bool) -> list:
        if not is_admin:
            return [gr.update() for _ in numbers] + [gr.Timer(active=False)]
        return [*view(collect_stats(store)), gr.Timer(active=True)]

    def on_disable(choice, request: gr.Request):
        require_admin(request)
        if not choice:
            return [gr.update() for _ in numbers] + ["Choose a labeler first."]
        result = api(disable_and_requeue, store, choice)
        said = (f"**{_md(choice)} disabled**: {result['sessions_ended']} session(s) ended, "
                f"{result['votes_voided']} vote(s) voided (kept, no longer counted), "
                f"{result['comparisons_requeued']} comparison(s) back in the pool.")  # fmt: skip
        return [*view(api(collect_stats, store)), said]

    refresh.click(on_refresh, [who], numbers, **EVENT_OPTIONS)
    timer.tick(on_refresh, [who], numbers, show_progress="hidden", **EVENT_OPTIONS)
    disable.click(on_disable, [who], [*numbers, done], **EVENT_OPTIONS)
    return opened, [*numbers, timer]
