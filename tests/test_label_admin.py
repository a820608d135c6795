"""The admin view's pure pieces: votes over time, out-of-range flags, and text without a raw None."""

from datetime import datetime, timedelta

from feedback_ui.admin_view import labeler_rows, pair_rows, summary_markdown, timeline_svg
from feedback_ui.stats import agreement_text, labeler_flags, pair_flags, votes_timeline

T0 = datetime(2026, 1, 2, 10, 0, 30)


def test_votes_timeline_buckets_and_running_total():
    assert votes_timeline([]) == []
    # 3 votes over 5 minutes: 1-minute buckets (6 of them, empty ones kept)
    times = [T0, T0 + timedelta(seconds=20), T0 + timedelta(minutes=5)]
    rows = votes_timeline(times)
    assert [r["votes"] for r in rows] == [2, 0, 0, 0, 0, 1] and [r["total"] for r in rows] == [2, 2, 2, 2, 2, 3]
    assert rows[0]["time"] == "2026-01-02T10:00" and rows[-1]["time"] == "2026-01-02T10:05"
    # 2 votes 3 hours apart: 180 one-minute buckets is too many, 5-minute buckets give 37
    rows = votes_timeline([T0, T0 + timedelta(hours=3)])
    assert len(rows) == 37 and rows[1]["time"] == "2026-01-02T10:05" and rows[-1]["total"] == 2
    # 59 min 59 s from 10:00:30 end in the 61st minute counted from 10:00: 5-minute buckets, not 61 of a minute
    rows = votes_timeline([T0, T0 + timedelta(seconds=3599)])
    assert len(rows) == 13 and rows[0]["time"] == "2026-01-02T10:00"


def labeler(**kw):
    base = {"name": "ann", "role": "labeler", "disabled": False, "done": 12, "voided": 0, "skipped": 0, "open": 0,
            "median_seconds": None, "side_a_rate": 0.5, "decisive": 12, "gold_items": 0, "gold_accuracy": None,
            "agreement": None}  # fmt: skip
    return {**base, **kw}


def test_flags_only_out_of_range_and_only_with_enough_votes():
    assert labeler_flags(labeler()) == []
    assert labeler_flags(labeler(side_a_rate=0.75)) == ["side bias: picked A in 75% of 12 decisive votes"]
    assert labeler_flags(labeler(side_a_rate=0.25, decisive=9)) == []  # too few to tell
    assert labeler_flags(labeler(gold_items=4, gold_accuracy=0.5)) == ["gold accuracy 50% on 4 gold items"]
    assert labeler_flags(labeler(gold_items=2, gold_accuracy=0.0)) == []
    assert pair_flags({"labelers": ["a", "b"], "items": 6, "cohen_kappa": 0.1}) == [
        "low agreement: kappa 0.10 on 6 shared items"]
    assert pair_flags({"labelers": ["a", "b"], "items": 4, "cohen_kappa": -0.5}) == []
    assert pair_flags({"labelers": ["a", "b"], "items": 9, "cohen_kappa": None}) == []


def test_admin_text_says_na_in_words_and_escapes_names():
    none_yet = {"overlapping_items": 0, "percent_agreement": None, "cohen_kappa": None, "mean_pairwise_kappa": None,
                "krippendorff_alpha": None, "pairwise": []}  # fmt: skip
    assert "None" not in agreement_text(none_yet) and "n/a" in agreement_text(none_yet)
    one_pair = {**none_yet, "overlapping_items": 3, "percent_agreement": 1.0,
                "pairwise": [{"labelers": ["ann", "b_b"], "items": 3, "cohen_kappa": None, "flags": []}]}  # fmt: skip
    assert "Cohen's kappa n/a (too few overlapping votes)" in agreement_text(one_pair)
    flagged = labeler(name="b_b", side_a_rate=0.9)
    stats = {"counts": {"comparisons": 4, "comparisons_complete": 1, "votes": 12, "voided": 0, "open": 0,
                        "skipped": 0, "gold_items": 0},
             "agreement": one_pair, "labelers": [{**flagged, "flags": labeler_flags(flagged)}], "timeline": []}  # fmt: skip
    text = summary_markdown(stats)
    assert "None" not in text and "1 of 4 comparisons complete (25%)" in text
    assert "⚠ b\\_b: side bias: picked A in 90% of 12 decisive votes" in text
    assert labeler_rows(stats)[0][-1].startswith("⚠ side bias") and "None" not in str(labeler_rows(stats))
    assert pair_rows(stats) == [["ann", "b_b", 3, "n/a (too few overlapping votes)", "ok"]]


def test_timeline_svg_has_no_script_and_shows_the_total():
    assert timeline_svg([]) == '<p id="admin-chart-empty">No votes yet.</p>'
    svg = timeline_svg(votes_timeline([T0, T0 + timedelta(minutes=2)]))
    assert svg.startswith("<svg") and "2 votes counted" in svg and "<script" not in svg and " on" not in svg
    assert svg.count("<rect") == 3 and "votes per 1 min" in svg


def test_the_overall_kappa_is_the_one_pair_that_shares_items_among_three_labelers():
    from feedback_ui.stats import _agreement

    # ann and bob share items 1-4 (agreeing on 3, labels A A B B vs A A B A); cy voted only on item 5, alone
    labels = {1: {"ann": "A", "bob": "A"}, 2: {"ann": "A", "bob": "A"}, 3: {"ann": "B", "bob": "B"},
              4: {"ann": "B", "bob": "A"}, 5: {"cy": "A"}}  # fmt: skip
    overall, _ = _agreement(labels)
    # p_o = 3/4; ann A 1/2, bob A 3/4: p_e = 1/2 * 3/4 + 1/2 * 1/4 = 1/2; kappa = (3/4 - 1/2) / (1 - 1/2) = 0.5
    assert [p["labelers"] for p in overall["pairwise"]] == [["ann", "bob"]]
    assert overall["cohen_kappa"] == overall["mean_pairwise_kappa"] == 0.5

