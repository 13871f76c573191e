"""The check that a notebook's "reading the results" text agrees with the numbers the same run displayed
(tests/notebook_outputs.py ``reading_problems``, applied to every executed notebook by notebooks/conftest.py): a
reading that agrees passes, and each way of disagreeing is found."""

import re

import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from notebook_outputs import READINGS, claims, displayed_tables, reading_problems

TABLE = """| method | test accuracy (mean ± std, 3 seeds) | − LoRA r=4 (PEFT), 95 % interval |
|---|---|---|
| LoRA r=4 (PEFT) | 0.884 ± 0.006 | – |
| BOFT b=8 m=2 | 0.903 ± 0.004 | +0.019 [+0.008, +0.030] |
| OFT b=16 | 0.880 ± 0.010 | −0.004 [−0.021, +0.013] |
| head only | 0.674 ± 0.020 | −0.210 [−0.250, −0.170] |"""

AGREES = """#### Reading the results
Higher is better: test accuracy over 3 seeds.
* BOFT b=8 m=2 beats LoRA r=4 (PEFT): +0.019 [+0.008, +0.030].
* OFT b=16 and LoRA r=4 (PEFT) cannot be told apart: −0.004 [−0.021, +0.013].
* head only trails LoRA r=4 (PEFT) by 0.21 [−0.250, −0.170]; it reaches 0.674.
"""


def notebook(reading: str, table: str = TABLE, html: str | None = None, name_cells=()) -> dict:
    outputs = [new_output("display_data", data={"text/markdown": table, "text/plain": "<Markdown>"})]
    if html:
        outputs.append(new_output("execute_result", data={"text/html": html, "text/plain": "df"}, execution_count=1))
    outputs.append(new_output("display_data", data={"text/markdown": reading, "text/plain": "<Markdown>"}))
    cell = new_code_cell("display(Markdown(table)); display(Markdown(reading_of(results)))")
    cell.outputs = outputs
    return new_notebook(cells=[*name_cells, cell])


def test_a_reading_that_agrees_with_its_table_passes():
    assert reading_problems(notebook(AGREES), "07_vit_finetuning") == []


def test_the_tables_and_the_claims_are_read_as_shown():
    (table,) = displayed_tables(notebook(AGREES))
    assert table[0][0] == "method" and table[2] == ["BOFT b=8 m=2", "0.903 ± 0.004", "+0.019 [+0.008, +0.030]"]
    assert claims(AGREES)[1].startswith("BOFT b=8 m=2 beats") and len(claims(AGREES)) == 4


@pytest.mark.parametrize("claim, found", [
    # the example: a sentence claims "X beats LoRA" while the interval includes 0
    ("OFT b=16 beats LoRA r=4 (PEFT): −0.004 [−0.021, +0.013].", "claims an order that the interval"),
    ("OFT b=16 is higher than LoRA r=4 (PEFT) [−0.021, +0.013].", "claims an order that the interval"),
    # an order with no interval behind it
    ("BOFT b=8 m=2 beats LoRA r=4 (PEFT).", "claims an order without the 95 % interval"),
    # a tie where the interval separates the two
    ("BOFT b=8 m=2 and LoRA r=4 (PEFT) tie: +0.019 [+0.008, +0.030].", "calls a tie what the interval"),
    # a number that differs from the table
    ("BOFT b=8 m=2 reaches 0.913.", "quotes 0.913, which the row(s) of ['BOFT b=8 m=2'] does not show"),
    # a number from another method's row
    ("OFT b=16 reaches 0.903.", "quotes 0.903, which the row(s) of ['OFT b=16'] does not show"),
    # an interval with its signs flipped
    ("OFT b=16 is lower than LoRA r=4 (PEFT): [−0.013, +0.021].", "quotes the interval [−0.013, +0.021]"),
    ("head only is higher than LoRA r=4 (PEFT): [+0.170, +0.250].", "quotes the interval [+0.170, +0.250]"),
    # an interval that separates the two, quoted without saying which is ahead
    ("head only against LoRA r=4 (PEFT): [−0.250, −0.170].", "quotes an interval that excludes 0 and says neither"),
    # denying what the interval shows
    ("BOFT b=8 m=2 does not beat LoRA r=4 (PEFT) [+0.008, +0.030].", "denies an order"),
])
def test_a_claim_that_disagrees_with_the_numbers_is_found(claim, found):
    reading = f"#### Reading the results\nHigher is better.\n* {claim}\n"
    problems = reading_problems(notebook(reading), "07_vit_finetuning")
    assert problems and problems[0].startswith(found), problems


def test_better_and_worse_follow_the_direction_the_reading_states():
    """Perplexity: lower is better, so "beats" needs a negative difference."""
    claim = "* BOFT b=8 m=2 beats LoRA r=4 (PEFT): +0.019 [+0.008, +0.030].\n"
    assert reading_problems(notebook("#### Reading the results\nHigher is better.\n" + claim), "x") == []
    (problem,) = reading_problems(notebook("#### Reading the results\nLower is better.\n" + claim), "x")
    assert problem.startswith("claims an order that the interval [+0.008, +0.030] does not show")
    (problem,) = reading_problems(notebook("#### Reading the results\n" + claim), "x")
    assert problem.startswith("claims better/worse without saying whether higher or lower is better")


def test_speed_claims_follow_the_time_ratio():
    table = "| method | d | ms / step | ÷ LoRA |\n|---|---|---|---|\n| BOFT b=8 m=2 | 256 | 3.1 | 1.42× |"
    agrees = "#### Reading the results\n* BOFT b=8 m=2 takes 1.42× LoRA's time at d = 256: slower.\n"
    assert reading_problems(notebook(agrees, table), "x") == []
    (problem,) = reading_problems(notebook(agrees.replace("slower", "faster"), table), "x")
    assert problem.startswith("calls a time ratio of [1.42] faster")
    quoted, called = reading_problems(notebook(agrees.replace("1.42", "0.71"), table), "x")
    assert quoted.startswith("quotes 0.71, which the row(s) of ['BOFT b=8 m=2'] does not show")
    assert called.startswith("calls a time ratio of [0.71] slower")


def test_numbers_in_a_pandas_html_table_count_and_rounding_is_allowed():
    html = ("<table><thead><tr><th></th><th>method</th><th>ms / step</th></tr></thead><tbody>"
            "<tr><th>0</th><td>LoRA</td><td>2.1834</td></tr></tbody></table>")
    reading = "#### Reading the results\n* A LoRA step took 2.18 ms here.\n"
    assert reading_problems(notebook(reading, table="", html=html), "x") == []
    (problem,) = reading_problems(notebook(reading.replace("2.18", "2.28"), table="", html=html), "x")
    assert problem.startswith("quotes 2.28, which any table does not show")


@pytest.mark.parametrize("name", READINGS)
def test_a_reading_notebook_must_display_a_generated_reading_and_none_by_hand(name):
    no_reading = notebook("#### Something else\n* 0.903", name_cells=[new_markdown_cell("## The methods")])
    assert reading_problems(no_reading, name) == [
        f"{name} displays no generated reading (a Markdown output titled 'Reading the results')"]
    by_hand = notebook(AGREES, name_cells=[new_markdown_cell("## Reading the results\n\n* BOFT wins.")])
    assert reading_problems(by_hand, name) == [
        "cell 0 reads the results by hand; generate the reading from the run's numbers"]
    assert reading_problems(by_hand, "01_primer") == []  # only where a reading is generated


# --- what the committed notebooks say and call ------------------------------------------------------------------------
FINE_TUNING = ["07_vit_finetuning", "08_llm_finetuning", "09_diffusion_finetuning"]


def source(name: str, kind: str) -> str:
    import nbformat

    from test_notebooks import ROOT

    nb = nbformat.read(str(ROOT / "notebooks" / f"{name}.ipynb"), as_version=4)
    return "\n".join(c.source for c in nb.cells if c.cell_type == kind)


@pytest.mark.parametrize("name", FINE_TUNING)
def test_the_fine_tuning_notebooks_name_their_settings_for_what_they_are(name):
    """The issue: 07 called ViT-B/16 on CIFAR-10 "the paper's setting", 08 called Qwen2.5-0.5B "paper-scale"."""
    text = " ".join(source(name, "markdown").split()).lower()
    assert not re.search(r"(?<!not )the paper's setting", text) and "paper-scale" not in text  # "not the …" may stay
    assert "what the ci profile can and cannot show" in text


@pytest.mark.parametrize("name", FINE_TUNING)
def test_the_fine_tuning_notebooks_run_the_protocol_beside_the_committed_results(name):
    code = source(name, "code")
    assert "run_protocol(PROFILE, PROTOCOL)" in code and "reduced_protocol(COMMITTED)" in code
    assert "COMMITTED.markdown()" in code and "domain_reading(COMMITTED, this_run)" in code
    assert "seed_table" not in code and "run_methods(" not in code  # the single-rate comparison and its std rule
