"""The report helpers the bench, the runner, counts and the teaching code print with: markdown cells, ratios of
methods that may be missing, where a table was measured."""

import torch

from boftlab.report import machine, markdown_table, ratio


def test_markdown_table_formats_floats_and_missing_cells():
    table = markdown_table(["d", "ms", "ratio", "note"], [[768, 12.3456, None, "x"], [4096, 1234.5, 0.25, ""]])
    assert table.splitlines() == [
        "| d | ms | ratio | note |",
        "|---|---|---|---|",
        "| 768 | 12.3 | – | x |",
        "| 4096 | 1234 | 0.25 |  |",
    ]


def test_ratio_is_empty_where_a_method_was_not_measured():
    assert ratio(3.0, 1.5) == 2.0
    assert ratio(None, 1.5) is None and ratio(3.0, None) is None and ratio(3.0, 0.0) is None


def test_machine_names_the_device_torch_and_the_date():
    where = machine()
    assert f"torch {torch.__version__}" in where and where.count(";") == 2
