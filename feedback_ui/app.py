"""The Gradio labeling UI.

Every handler takes the user from the request session (``gr.Request.username``)
and works through :mod:`feedback_ui.tasks`; the Blocks hold no user data
(the current task token lives in per-session ``gr.State``). Prompts and
responses are shown in read-only textboxes, so HTML/JS in them is plain text.
The public API (for ``gradio_client``) is ``/next_task``, ``/vote``, ``/rank``,
``/skip``, ``/history`` and ``/admin_stats``; UI events are private. Every event is answered on its own
request, off Gradio's queue (:data:`feedback_ui.http_policy.EVENT_OPTIONS`).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Optional

import gradio as gr

from feedback_ui import tasks
from feedback_ui.assign import DEFAULT_ASSIGNMENT_TTL
from feedback_ui.config import MAX_RANK  # ranking slots in the UI
from feedback_ui.admin_view import build_admin_tab
from feedback_ui.http_policy import EVENT_OPTIONS
from feedback_ui.stats import collect_stats
from feedback_ui.store import Store
from rlhf.errors import UserError

PAIR_BUTTONS = [("A is better", "A", "btn-a"), ("B is better", "B", "btn-b"), ("Tie", "tie", "btn-tie"),
                ("Both bad", "both_bad", "btn-both-bad")]  # fmt: skip
STRENGTHS = ["slightly better", "much better"]


INTERNAL_ERROR = "Something went wrong on the server; nothing was saved. Try again, or tell your project admin."
log = logging.getLogger("feedback_ui")


def _api(fn, *args, **kwargs):
    """Call ``fn``; a UserError becomes a Gradio error (shown in the UI, raised by gradio_client).

    Anything else is logged with its traceback and shown as a short message without its details.
    """
    try:
        return fn(*args, **kwargs)
    except UserError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    except Exception:
        log.exception("%s failed", getattr(fn, "__name__", "a request"))
        raise gr.Error(INTERNAL_ERROR, print_exception=False) from None


def build_app(store: Store | str, gold_rate: Optional[float] = None, title: str = "Preference labeling",
              assignment_ttl: Optional[timedelta] = DEFAULT_ASSIGNMENT_TTL) -> gr.Blocks:  # fmt: skip
    """The labeling Blocks for ``store`` (a :class:`Store` or a database URL/path); an open task left
    unanswered for ``assignment_ttl`` (None: forever) goes back to the pool."""
    if isinstance(store, str):
        from feedback_ui.store import open_store

        store = open_store(store)
    rate = gold_rate  # None: the stored rate, read whenever a task is drawn
    ttl = {"assignment_ttl": assignment_ttl}

    # public API: plain values in, a task dict out

    def next_task(request: gr.Request) -> dict:
        """The caller's current task: token, kind (pair|rank), prompt, responses (display order), done, total."""
        return _api(tasks.serve, store, request.username, rate, **ttl)

    def vote(
        token: str, choice: str, strength: str = "", rationale: str = "", edit: str = "", request: gr.Request = None
    ) -> dict:
        """Answer a pair task: choice A, B, tie or both_bad; optional strength (slightly|much), rationale, edit."""
        return _api(
            tasks.answer, store, request.username, token, rate,
            choice=choice, strength=strength, rationale=rationale, edit=edit, **ttl,
        )  # fmt: skip

    def rank(token: str, positions: list[int], rationale: str = "", edit: str = "", request: gr.Request = None) -> dict:
        """Answer a ranking task: display positions (0-based) from best to worst."""
        positions = [int(p) for p in positions]
        name = request.username
        return _api(tasks.answer, store, name, token, rate, positions=positions, rationale=rationale, edit=edit,
                    **ttl)  # fmt: skip

    def skip(token: str, request: gr.Request = None) -> dict:
        """Skip the current task (it will not come back)."""
        return _api(tasks.skip, store, request.username, token, rate, **ttl)

    def history(request: gr.Request) -> list[list]:
        """The caller's own latest votes."""
        return _api(tasks.history, store, request.username)

    def require_admin(request: gr.Request) -> None:
        _api(tasks.current_user, store, request.username, role="admin")

    def admin_stats(request: gr.Request) -> dict:
        """Progress, per-labeler numbers and agreement (admins only)."""
        require_admin(request)
        return _api(collect_stats, store)

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        token = gr.State("")
        with gr.Tabs():
            with gr.Tab("Label"):
                progress = gr.Markdown(elem_id="progress")
                status = gr.Markdown(elem_id="status")
                prompt = gr.Textbox(label="Prompt", interactive=False, lines=2, max_lines=12, elem_id="prompt")
                with gr.Group(visible=False) as pair_box:
                    with gr.Row():
                        resp_a = gr.Textbox(label="A", interactive=False, lines=6, max_lines=30, elem_id="resp-a")
                        resp_b = gr.Textbox(label="B", interactive=False, lines=6, max_lines=30, elem_id="resp-b")
                    strength = gr.Radio(STRENGTHS, value=None, label="How much better? (optional)")
                    with gr.Row():
                        pair_buttons = [
                            gr.Button(text, elem_id=eid, variant="primary") for text, _, eid in PAIR_BUTTONS
                        ]
                with gr.Group(visible=False) as rank_box:
                    slots, slot_texts, slot_ranks = [], [], []
                    for i in range(MAX_RANK):
                        with gr.Row(visible=False) as slot:
                            slot_texts.append(gr.Textbox(label=f"Response {i + 1}", interactive=False, lines=4,
                                                         max_lines=20, scale=4, elem_id=f"rank-text-{i}"))  # fmt: skip
                            slot_ranks.append(gr.Radio([], label="Rank (1 = best)", scale=1, elem_id=f"rank-{i}"))
                        slots.append(slot)
                    rank_button = gr.Button("Submit ranking", variant="primary", elem_id="btn-rank")
                rationale = gr.Textbox(label="Rationale (optional)", lines=1, elem_id="rationale")
                edit = gr.Textbox(label="Improved version of the better answer (optional)", lines=3, elem_id="edit")
                skip_button = gr.Button("Skip", elem_id="btn-skip")
                gr.Markdown("Keys: **1** A is better, **2** B is better, **3** Tie, **4** Both bad, **s** Skip.")
                gr.Button("Log out", link="logout", size="sm", variant="secondary", elem_id="btn-logout")
            with gr.Tab("My history"):
                history_button = gr.Button("Refresh")
                history_table = gr.Dataframe(headers=["time", "prompt", "answer", "seconds"],
                                             datatype=["str", "str", "str", "number"], interactive=False,
                                             elem_id="history")  # fmt: skip
            with gr.Tab("Admin", visible=False) as admin_tab:
                admin_opened, admin_outputs = build_admin_tab(store, require_admin, _api)

        task_outputs = [token, progress, status, prompt, pair_box, resp_a, resp_b, rank_box,
                        *slots, *slot_texts, *slot_ranks, strength, rationale, edit]  # fmt: skip

        def render(view: dict) -> list:
            k, is_pair = len(view["responses"]), view["kind"] == "pair"
            done = f"**{view['done']} of {view['total']} done**"
            if not view["token"]:
                done += " - nothing left to label for you right now."
            responses = view["responses"] + [""] * MAX_RANK
            choices = [str(r) for r in range(1, k + 1)]
            ranked = view["kind"] == "rank"
            return [
                view["token"], done, view.get("status", ""), view["prompt"],
                gr.update(visible=is_pair), responses[0] if is_pair else "", responses[1] if is_pair else "",
                gr.update(visible=ranked),
                *[gr.update(visible=ranked and i < k) for i in range(MAX_RANK)],
                *[responses[i] if ranked else "" for i in range(MAX_RANK)],
                *[gr.update(choices=choices if ranked and i < k else [], value=None) for i in range(MAX_RANK)],
                gr.update(value=None), "", "",
            ]  # fmt: skip

        def keep(message: str) -> list:
            """Leave the task on screen and show ``message``."""
            return [gr.update() for _ in task_outputs[:2]] + [message] + [gr.update() for _ in task_outputs[3:]]

        def ui(fn, *args, **kwargs) -> list:
            """Run a task function for the UI: the next task, or the current one kept with the error shown."""
            try:
                return render(fn(store, *args, **kwargs))
            except UserError as exc:
                return keep(f"**Not saved:** {exc}")
            except Exception:
                log.exception("%s failed", fn.__name__)
                return keep(f"**Not saved:** {INTERNAL_ERROR}")

        def on_load(request: gr.Request):
            user = _api(tasks.current_user, store, request.username)
            is_admin = user.role == "admin"
            return [*ui(tasks.serve, user.name, rate, **ttl), gr.update(visible=is_admin), *admin_opened(is_admin)]

        def on_pair(choice):
            def handler(tok, strength_value, why, better, request: gr.Request):
                return ui(tasks.answer, request.username, tok, rate, choice=choice, strength=strength_value,
                          rationale=why, edit=better, **ttl)  # fmt: skip

            return handler

        def on_rank(request: gr.Request, tok, why, better, *ranks):  # request first: *ranks ends the positionals
            chosen = {int(r): i for i, r in enumerate(ranks) if r}
            if len(chosen) != sum(1 for r in ranks if r):
                return keep("**Not saved:** give each response a different rank")
            positions = [chosen[r] for r in sorted(chosen)]
            return ui(tasks.answer, request.username, tok, rate, positions=positions, rationale=why, edit=better,
                      **ttl)  # fmt: skip

        demo.load(on_load, None, [*task_outputs, admin_tab, *admin_outputs], **EVENT_OPTIONS)
        for button, (_, choice, _) in zip(pair_buttons, PAIR_BUTTONS):
            button.click(on_pair(choice), [token, strength, rationale, edit], task_outputs, **EVENT_OPTIONS)
        rank_button.click(on_rank, [token, rationale, edit, *slot_ranks], task_outputs, **EVENT_OPTIONS)

        def on_skip(tok, request: gr.Request):
            return ui(tasks.skip, request.username, tok, rate, **ttl)

        skip_button.click(on_skip, [token], task_outputs, **EVENT_OPTIONS)
        history_button.click(history, None, history_table, api_name="ui_history", **EVENT_OPTIONS)

        for fn in (next_task, vote, rank, skip, history, admin_stats):
            gr.api(fn, api_name=fn.__name__, queue=EVENT_OPTIONS["queue"])
    return demo


def launch(*args, **kwargs):
    """Serve the app behind the login; see :func:`feedback_ui.server.launch`."""
    from feedback_ui.server import launch as _launch

    return _launch(*args, **kwargs)
