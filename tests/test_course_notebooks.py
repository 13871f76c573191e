"""The course notebooks 01–06 as a student meets them: learning goals at the top, an estimated student time, linked
references for the methods they use, a written question with a model answer, takeaways at the end — and text that
follows the numbers the notebook computes (issue 25)."""

import json
import re
from pathlib import Path

import pytest

from boftlab.teaching import kit

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
COURSE = sorted(NOTEBOOKS.glob("[01][0-9]_*.ipynb"))  # 00 (a demo): goals and takeaways, no question
QUESTIONS = [p for p in COURSE if not p.name.startswith("00_")]


def markdown(path: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown"]


@pytest.mark.parametrize("path", COURSE, ids=lambda p: p.stem)
def test_goals_time_and_linked_papers_at_the_top_and_takeaways_at_the_end(path):
    cells = markdown(path)
    header = next(c for c in cells[:2] if "**Learning goals.**" in c)  # the title cell, or the cell right after it
    assert "**Learning goals.**" in header
    assert re.search(r"\*\*Student time:\*\* about \d+ min", header)
    papers = header[header.index("**Papers:**"):].split("\n\n")[0]
    assert len(re.findall(r"\]\(https://(arxiv\.org/abs/\d{4}\.\d{5}|doi\.org/[^)]+)\)", papers)) >= 2
    assert any(re.match(r"(## Takeaways|\*\*Takeaways)", c) for c in cells[-3:])


@pytest.mark.parametrize("path", QUESTIONS, ids=lambda p: p.stem)
def test_a_written_question_with_an_answer_cell_and_a_model_answer(path):
    nb = json.loads(path.read_text())
    questions = kit.tagged_questions(nb)
    assert questions == [f"{int(path.stem[:2])}.w1"]
    answer = next(c for c in nb["cells"] if kit.WRITTEN in c["metadata"].get("tags", []))
    assert "".join(answer["source"]) == kit.ANSWER_PLACEHOLDER
    model = next(c for c in nb["cells"] if kit.MODEL in c["metadata"].get("tags", []))
    assert "".join(model["source"]).startswith("<details><summary>Model answer")


def test_the_primer_uses_the_books_notation_and_explains_the_neumann_parity():
    text = "\n".join(markdown(NOTEBOOKS / "01_primer.ipynb"))
    assert r"\mathbb R^{n\times d}" not in text and r"W\in\mathbb R^{d_\text{out}\times d_\text{in}}" in text
    assert "Why 3 terms are worse than 2" in text and "I - S^{2k}" in text


def test_notebook_02_says_exactly_what_the_printed_permutation_is():
    text = "\n".join(markdown(NOTEBOOKS / "02_information_transmission.ipynb"))
    assert "interleaves the halves of every chunk" not in text
    assert "stride-2 permutation" in text and "perfect shuffle" in text


def test_notebook_04s_verdicts_are_computed_from_its_numbers():
    """Test 1 called a finer ladder evidence while BOFT's largest drop (0.235) exceeded OFT's (0.222)."""
    nb = json.loads((NOTEBOOKS / "04_expressivity.ipynb").read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "if all_drop < oft_drop else" in code and "random_rows = ex.sweep(" in code
    assert "it is evidence of a *finer* ladder" not in "\n".join(markdown(NOTEBOOKS / "04_expressivity.ipynb"))
