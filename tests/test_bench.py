"""The benchmark harness's report format round-trips (boftlab.bench.read_results reads what the suites write)."""

from boftlab.bench import markdown_table, read_results


def test_read_results_inverts_markdown_table(tmp_path):
    rows = [[768, "PEFT LoRA r=8", 12.5, None], [4096, "boftlab BOFT m=2 b=8", 1234.0, 0.25]]
    report = (
        "# boftlab benchmarks\n\nMeasured on: CPU x86_64, 1 threads; torch 2.x; 2026-01-01\n\n"
        "## linear: one layer\n\nsome text\n\n" + markdown_table(["d", "method", "ms", "ratio"], rows) + "\n\n"
        "## layers: more\n\n" + markdown_table(["a", "b"], [[1, "x"]]) + "\n"
    )
    path = tmp_path / "cpu.md"
    path.write_text(report)
    first, second = read_results(path)
    assert (first.suite, second.suite) == ("linear", "layers")
    assert first.machine == "CPU x86_64, 1 threads; torch 2.x; 2026-01-01"
    assert first.header == ["d", "method", "ms", "ratio"]
    assert first.rows == [[768.0, "PEFT LoRA r=8", 12.5, None], [4096.0, "boftlab BOFT m=2 b=8", 1234.0, 0.25]]
    assert second.rows == [[1.0, "x"]]
