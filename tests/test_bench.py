"""The benchmark harness: its report format round-trips (boftlab.bench.read_results reads what the suites write), its
round-robin timing interleaves methods, its CPU memory peak counts live tensor bytes, its goals table judges."""

import pytest
import torch

from boftlab.bench import peak_memory_mib, read_results, round_robin
from boftlab.report import goals_table, markdown_table


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


def test_round_robin_interleaves_every_method_in_each_round():
    calls = []
    medians = round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, torch.device("cpu"),
                          budget_s=0.0, min_rounds=3)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds, each running a then b
    assert set(medians) == {"a", "b"} and all(ms >= 0 for ms in medians.values())


def test_peak_memory_counts_what_is_live_at_once_during_the_call():
    def step():
        first = torch.ones(2**20)  # 4 MiB
        second = torch.ones(2**20)  # 8 MiB live together
        del first, second
        third = torch.ones(2**19)  # 2 MiB after both were freed
        return third.sum()

    peak = peak_memory_mib(step, torch.device("cpu"))
    assert 8.0 <= peak < 8.1


def profiler_peak_mib(fn) -> float:
    """The same peak from torch.profiler's allocator events (profile_memory=True): the running sum of their sizes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def test_peak_memory_of_a_training_step_agrees_with_the_profiler():
    from boftlab import BOFTConfig
    from boftlab.bench import fwd_bwd, with_peft

    x = torch.randn(64, 128)
    for module in (with_peft("LoraConfig", torch.nn.Linear(128, 96), r=8),
                   BOFTConfig(block_size=8, n_factors=2).make_layer(torch.nn.Linear(128, 96))):
        step = fwd_bwd(module, x)
        step()
        assert peak_memory_mib(step, torch.device("cpu")) == pytest.approx(profiler_peak_mib(step), rel=1e-3)


def test_goals_table_says_met_or_by_how_much_each_goal_misses():
    table = goals_table([("fast", 1.1, "≤", 1.15), ("slow", 1.38, "≤", 1.15), ("speed-up", 16.0, "≥", 20.0),
                         ("absent", None, "≤", 1.0)])
    rows = [line.split(" | ")[-1].rstrip(" |") for line in table.splitlines()[2:]]
    assert rows == ["met", "missed by 20 %", "missed by 25 %", "not measured"]


def test_op_counter_counts_every_op_of_a_matmul_and_its_backward_exactly():
    """(x @ w).sum() backward: mm and sum forward; the seed gradient (ones_like), sum's backward (expand), the two
    gradients of mm (each a transpose and a mm), and AccumulateGrad's detach of each leaf's new gradient."""
    from boftlab.bench.ops import count_ops

    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    counter = count_ops(lambda: (x @ w).sum().backward(), warmup=0)
    assert counter.ops == {"mm": 3, "sum": 1, "ones_like": 1, "expand": 1, "t": 2, "detach": 2}
    assert (counter.total, counter.kernels) == (10, 5)  # views and aliases (expand, t, detach) launch no kernel


def test_bench_methods_cover_every_registered_family_and_the_peft_references():
    from boftlab.bench.methods import REFERENCES, all_methods
    from boftlab.contract import FAMILIES

    keys = [m.key for m in all_methods(torch.device("cpu"))]
    assert keys == [*REFERENCES, *("boft-m2" if f == "boft" else f for f in FAMILIES)]
    x = torch.randn(3, 16)
    for method in all_methods(torch.device("cpu")):
        with method.context(torch.device("cpu")) if method.context else torch.enable_grad():
            layer = method.apply(torch.nn.Linear(16, 16).requires_grad_(False), None)
            assert layer(x).shape == (3, 16)
            assert any(p.requires_grad for p in layer.parameters())


def test_overhead_goals_judge_the_median_over_repeats_and_show_their_spread():
    from boftlab.bench.overhead import goal, ratio_runs

    times, keys = {"ours": [2.0, 4.0, 3.0], "theirs": [1.0, 2.0, 2.0]}, {"ours": "oft", "theirs": "peft_oft"}
    runs = ratio_runs(times, keys, "oft", "peft_oft")  # each repeat's ratio from that repeat's own rounds
    assert runs == [2.0, 2.0, 1.5] and ratio_runs(times, keys, "boft-m2", "peft_oft") is None
    assert goal("OFT ÷ PEFT OFT", runs, "≤", 1.1) == ("OFT ÷ PEFT OFT [repeats 1.5–2]", 2.0, "≤", 1.1)
    assert goal("absent", None, "≤", 1.1) == ("absent", None, "≤", 1.1)


def test_boftlab_oft_and_boft_launch_no_more_kernels_than_issue_28_allows():
    """The op goals met today stay met (counts are deterministic; the bench's ``ops`` suite reports all of them):
    per training step of nn.Linear(256, 256), boftlab OFT launches at most PEFT OFT's kernels, BOFT m=2 at most 1.5×."""
    from boftlab.bench.ops import op_rows

    _, by_key = op_rows(256, 128, torch.device("cpu"))
    assert by_key["oft"].kernels <= by_key["peft_oft"].kernels
    assert by_key["boft-m2"].kernels <= 1.5 * by_key["peft_oft"].kernels
