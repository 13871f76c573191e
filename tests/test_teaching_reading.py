"""boftlab.teaching.reading: the readings of notebooks 00 and 07–10 are written from the numbers, and each agrees
with the table it is displayed under by the notebooks' own check (tests/notebook_outputs.py ``reading_problems``);
the paired bootstrap against hand-computed cases."""

import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

from boftlab.report import markdown_table
from boftlab.reproduce.protocol import (CLAIMS, DomainResults, MethodResult, Protocol, check_claims,
                                        paired_against_lora)
from boftlab.teaching import reading
from notebook_outputs import reading_problems


def shown(*markdowns: str) -> dict:
    """An executed notebook that displayed ``markdowns`` (tables, then readings)."""
    cell = new_code_cell("display(...)")
    cell.outputs = [new_output("display_data", data={"text/markdown": m}) for m in markdowns]
    return new_notebook(cells=[cell])


# --- the paired bootstrap ---------------------------------------------------------------------------------------------
def test_the_bootstrap_of_identical_answers_is_exactly_zero_and_of_opposite_ones_exactly_one():
    same = reading.paired_bootstrap("a", [True, False, True], "b", [True, False, True], resamples=200)
    assert (same.difference, same.lo, same.hi) == (0.0, 0.0, 0.0) and not same.separated()
    opposite = reading.paired_bootstrap("a", [True] * 5, "b", [False] * 5, resamples=200)
    assert (opposite.difference, opposite.lo, opposite.hi) == (1.0, 1.0, 1.0) and opposite.separated()
    assert opposite.interval() == "+1.000 [+1.000, +1.000]"


def test_the_bootstrap_interval_covers_its_difference_and_narrows_with_more_examples():
    a, b = [True] * 9 + [False], [True] * 8 + [False] * 2  # a is right on one example more: +0.1
    small = reading.paired_bootstrap("a", a, "b", b)
    large = reading.paired_bootstrap("a", a * 20, "b", b * 20)
    assert small.difference == pytest.approx(0.1) and small.lo <= 0 <= small.hi  # 1 of 10: no separation
    assert large.difference == pytest.approx(0.1) and 0 < large.lo < 0.1 < large.hi  # 20 of 200: separated
    assert large.hi - large.lo < small.hi - small.lo


def test_the_bootstrap_refuses_answers_on_different_examples():
    with pytest.raises(ValueError, match="need the same examples for both: 3 vs 2"):
        reading.paired_bootstrap("a", [True] * 3, "b", [True] * 2)


# --- notebook 00 ------------------------------------------------------------------------------------------------------
def quickstart(head_correct, lora_correct, boft_correct):
    correct = {"head only": head_correct, "LoRA r=4 (PEFT)": lora_correct, "BOFT b=8 m=2": boft_correct}
    accuracies = {name: float(f"{sum(c) / len(c):.3f}") for name, c in correct.items()}
    comparisons = [reading.paired_bootstrap("BOFT b=8 m=2", boft_correct, name, correct[name])
                   for name in ("head only", "LoRA r=4 (PEFT)")]
    interval = {c.b: c.interval() for c in comparisons}
    n = len(head_correct)
    table = markdown_table(["method", f"test accuracy ({n} sentences)", "BOFT b=8 m=2 − this row [95 % interval]"],
                           [[name, f"{accuracies[name]:.3f}", interval.get(name)] for name in correct])
    return table, reading.quickstart_reading("BOFT b=8 m=2", comparisons, accuracies, n)


def test_the_quickstart_states_the_null_result_plainly_when_no_interval_excludes_zero():
    head = [True] * 103 + [False] * 17  # 0.858 on 120, as notebook 00 measured
    boft = [True] * 102 + [False] * 18
    lora = [True] * 105 + [False] * 15
    table, text = quickstart(head, lora, boft)
    assert text.startswith(reading.TITLE)
    assert "cannot be told apart" in text and "credits BOFT b=8 m=2 with nothing" in text and "beats" not in text
    assert "The head only model already reaches 0.858" in text
    assert reading_problems(shown(table, text), "00_quickstart") == []


def test_the_quickstart_credits_the_adapter_where_the_interval_excludes_zero():
    head = [True] * 60 + [False] * 60
    boft = [True] * 110 + [False] * 10
    table, text = quickstart(head, boft, boft)
    assert "BOFT b=8 m=2 beats head only: +0.417" in text and "with nothing" not in text
    assert reading_problems(shown(table, text), "00_quickstart") == []


# --- notebooks 07–09 --------------------------------------------------------------------------------------------------
def method(name, family, options, tests, lr=3e-3, at_edge=None):
    return MethodResult(name, family, options, 100, 90, grid=[1e-3, 3e-3, 9e-3], grid_validation=[0.8, 0.85, 0.84],
                        grid_notes=[None] * 3, lr=lr, at_edge=at_edge, seeds=[0, 1, 2], test=tests,
                        ms_per_step=12.5, peak_mib=3.25)


def domain(higher_is_better=True):
    methods = [
        method("LoRA r=4 (PEFT)", "lora", {"r": 4}, [0.880, 0.884, 0.888]),
        method("BOFT b=8 m=2", "boft", {"block_size": 8, "n_factors": 2}, [0.900, 0.905, 0.911]),  # +0.021 ± small
        method("OFT b=16", "oft", {"block_size": 16}, [0.890, 0.870, 0.885]),  # straddles 0
        method("SURM circulant", "surm", {"structure": "circulant"}, [0.850, 0.851, 0.856], at_edge="highest"),
    ]
    return DomainResults("vit", "ViT: digits 0–4 → 5–9", "ci", Protocol("full", seeds=(0, 1, 2)), "A task.",
                         "test accuracy", higher_is_better, "validation accuracy", higher_is_better, 0.02, methods,
                         paired_against_lora(methods), check_claims(CLAIMS, methods, higher_is_better, 0.02))


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_the_domain_reading_ranks_only_what_the_intervals_separate_and_agrees_with_the_tables(higher_is_better):
    committed = domain(higher_is_better)
    reduced = domain(higher_is_better)
    reduced.protocol = Protocol("reduced", seeds=(0,), lrs={m.name: m.lr for m in committed.methods})
    text = reading.domain_reading(committed, reduced)
    better, worse = ("Beats", "Worse than") if higher_is_better else ("Worse than", "Beats")
    assert f"{better} LoRA r=4 (PEFT): BOFT b=8 m=2 (+0.0213 [" in text
    assert f"{worse} LoRA r=4 (PEFT): SURM circulant (-0.0317 [" in text
    assert "Cannot be told apart from LoRA r=4 (PEFT) on these seeds: OFT b=16 (" in text
    assert "⚑): SURM circulant" in text and "reduced protocol: one seed" in text
    assert "supported — “BOFT (b=8, m=2) is at least as good as OFT" in text or not higher_is_better
    assert reading_problems(shown(committed.markdown(), text), "07_vit_finetuning") == []


def test_the_domain_reading_checked_against_flipped_intervals_fails():
    """The same reading under a table whose differences have the other sign: the check finds every ranking."""
    committed = domain()
    text = reading.domain_reading(committed)
    flipped = domain()
    for m in flipped.methods:
        if m.family != "lora":
            m.test = [2 * 0.884 - x for x in m.test]  # mirrored around LoRA's mean
    flipped.paired = paired_against_lora(flipped.methods)
    problems = reading_problems(shown(flipped.markdown(), text), "07_vit_finetuning")
    assert any("BOFT b=8 m=2" in p and p.startswith("quotes the interval") for p in problems)


# --- notebook 10 ------------------------------------------------------------------------------------------------------
def test_the_speed_reading_quotes_each_multiple_of_lora_as_the_table_shows_it():
    header = ["d", "tokens", "method", "ms / step", "× LoRA", "peak MiB", "memory × LoRA"]
    rows = [[256, 128, "PEFT LoRA r=4", 2.0, 1.0, 1.5, 1.0], [256, 128, "boftlab BOFT m=2", 2.9, 1.45, 1.8, 1.2],
            [256, 128, "boftlab OFT", 1.7, 0.85, 1.6, None]]
    records = [dict(zip(header, row)) for row in rows]
    text = reading.speed_reading(records, reference="PEFT LoRA r=4")
    assert "At d = 256, boftlab BOFT m=2 takes 1.45× PEFT LoRA r=4's time per step (slower), and 1.20× its" in text
    assert "boftlab OFT takes 0.85× PEFT LoRA r=4's time per step (faster)." in text
    table = markdown_table(["method", *[h for h in header if h != "method"]],
                           [[r[2], r[0], r[1], *r[3:]] for r in rows])
    assert reading_problems(shown(table, text), "10_speed_and_memory") == []
    assert reading_problems(shown(table.replace("1.45", "0.95"), text), "10_speed_and_memory") != []


def test_the_frozen_base_reading_finds_a_base_slower_than_its_adapters_and_states_the_files_noise():
    from types import SimpleNamespace

    header = ["d", "tokens", "method", "ms / step"]
    noisy = SimpleNamespace(suite="linear", source="noisy.md", header=header, rows=[
        [768, 512, "frozen base", 20.0, ], [768, 512, "PEFT LoRA r=8", 24.0], [4096, 512, "frozen base", 3198.0],
        [4096, 512, "PEFT LoRA r=8", 1800.0], [4096, 512, "boftlab OFT b=8", 1426.0]])
    idle = SimpleNamespace(suite="linear", source="idle.md", header=header, rows=[
        [768, 512, "frozen base", 19.0], [768, 512, "PEFT LoRA r=8", 23.0]])
    goals = SimpleNamespace(suite="linear", source="idle.md", header=["goal", "measured"], rows=[["x", 1.0]])
    text = reading.frozen_base_reading([noisy, idle, goals])
    assert ("In linear: noisy.md the frozen base took 3198 ms per step at d = 4096, 2.24× boftlab OFT b=8's 1426 ms "
            "(2 adapter(s) on that layer took less)") in text
    assert "a difference of up to 2.24× is within its noise" in text
    assert "In linear: idle.md the frozen base is the quickest row at every width" in text


def test_the_overhead_reading_names_the_multiples_that_shrink_with_d_and_only_those():
    rows = [{"method": "LoRA", "d": 256, "ms / step": 1.02, "× LoRA": 1.0},
            {"method": "BOFT", "d": 256, "ms / step": 10.0, "× LoRA": 9.85},
            {"method": "OFT", "d": 256, "ms / step": 1.1, "× LoRA": 1.08},
            {"method": "LoRA", "d": 512, "ms / step": 10.8, "× LoRA": 1.0},
            {"method": "BOFT", "d": 512, "ms / step": 12.5, "× LoRA": 1.16},
            {"method": "OFT", "d": 512, "ms / step": 11.8, "× LoRA": 1.10}]
    text = reading.overhead_reading(rows, "LoRA")
    assert "* BOFT: 9.85× LoRA's time at d = 256, 1.16× at d = 512." in text and "* OFT:" not in text
    assert "LoRA itself took 1.02 ms per step at d = 256 and 10.8 ms at d = 512." in text
    assert reading.overhead_reading(rows[:3], "LoRA") == ""
    assert reading.overhead_reading([r for r in rows if r["method"] != "BOFT"], "LoRA") == ""


def test_the_goals_reading_counts_the_committed_goal_tables():
    """Notebook 10's overhead reading: every goal row of the committed file counted, each missed one quoted as its
    table shows it; no goal table is a ValueError, not an empty reading."""
    from boftlab.bench import RESULTS_DIR, read_results

    tables = read_results(RESULTS_DIR / "cpu-2026-12-05-overhead.md")
    goals = [row for t in tables if list(t.header) == reading.GOAL_HEADER for row in t.rows]
    missed = [row for row in goals if str(row[3]).startswith("missed")]
    text = reading.goals_reading(tables)
    assert f"{len(goals) - len(missed)} of {len(goals)} goals" in text and text.count("* Missed: ") == len(missed)
    assert all(row[0] in text for row in missed)
    with pytest.raises(ValueError, match="no goal table"):
        reading.goals_reading([t for t in tables if list(t.header) != reading.GOAL_HEADER])
