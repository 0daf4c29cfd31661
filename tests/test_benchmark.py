"""Offline checks of benchmarks/module_overhead.py: reading BENCH lines into medians and ratios, and
the verdict on a guest console. No kernel is booted here (running the benchmark itself does that)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from toa import lab

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "module_overhead.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("module_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


bench = _load_script()


def bench_line(metric: str, side: str, round_: int, ops: int, seconds: float) -> str:
    return f"BENCH name={metric} side={side} round={round_} ops={ops} seconds={seconds:.6f} rate={ops / seconds:.1f}"


def full_console(rounds: int, seconds: dict[tuple[str, str], list[float]]) -> list[str]:
    """A console as the guest prints it: every metric for both sides of every round."""
    lines = ["[    1.80] Run /init as init process", "TOA-BENCH BEGIN release=6.1.0-56-amd64"]
    for round_ in range(1, rounds + 1):
        for side in bench.SIDES:
            for metric in bench.METRICS:
                lines.append(bench_line(metric, side, round_, 1000, seconds[metric, side][round_ - 1]))
    return lines + ["TOA-BENCH END", "[   15.46] reboot: Power down"]


def uniform(baseline: list[float], toa: list[float]) -> dict[tuple[str, str], list[float]]:
    return {(metric, side): times for metric in bench.METRICS for side, times in (("baseline", baseline), ("toa", toa))}


def test_medians_per_side_and_ratio():
    # Rates 1000/s: baseline 500, 1000, 250 (median 500); toa 400, 200, 100000 (median 400).
    lines = full_console(3, uniform([2.0, 1.0, 4.0], [2.5, 5.0, 0.01]))
    outcome = bench.evaluate(lines, 3, timed_out=False, returncode=0)
    assert outcome.problems == []
    assert outcome.release == "6.1.0-56-amd64"
    assert [row.metric for row in outcome.rows] == list(bench.METRICS)
    for row in outcome.rows:
        assert row.baseline == pytest.approx(500.0)
        assert row.with_toa == pytest.approx(400.0)
        assert row.ratio == pytest.approx(0.8)


def test_rate_comes_from_ops_and_seconds_not_the_printed_rate():
    line = "BENCH name=handshake-toa side=toa round=2 ops=300 seconds=1.500000 rate=9999.0"
    (sample,) = bench.parse_samples([line])
    assert (sample.metric, sample.side, sample.round, sample.ops) == ("handshake-toa", "toa", 2, 300)
    assert sample.rate == pytest.approx(200.0)


def test_bench_line_after_kernel_noise_on_the_same_line_counts():
    noisy = "[    7.93] toa: loading out-of-tree module taints kernel." + bench_line("getpeername-toa", "toa", 1, 10, 0.5)
    (sample,) = bench.parse_samples([noisy])
    assert sample.metric == "getpeername-toa" and sample.rate == pytest.approx(20.0)


def test_unknown_metrics_and_sides_are_not_samples():
    lines = [bench_line("handshake-fast", "toa", 1, 10, 1.0), bench_line("handshake-toa", "other", 1, 10, 1.0)]
    assert bench.parse_samples(lines) == []


def test_missing_measurement_is_a_problem_and_its_metric_has_no_row():
    lines = full_console(2, uniform([1.0, 1.0], [1.0, 1.0]))
    lines = [line for line in lines if not ("getpeername-toa side=toa" in line)]
    outcome = bench.evaluate(lines, 2, timed_out=False, returncode=0)
    assert "getpeername-toa" not in [row.metric for row in outcome.rows]
    assert any("2 measurements missing" in problem and "getpeername-toa/toa/round1" in problem
               for problem in outcome.problems), outcome.problems


def test_more_rounds_asked_than_run_is_a_problem():
    outcome = bench.evaluate(full_console(2, uniform([1.0, 1.0], [1.0, 1.0])), 3, timed_out=False, returncode=0)
    assert any("measurements missing" in problem and "round3" in problem for problem in outcome.problems)


def test_guest_errors_are_problems():
    lines = full_console(1, uniform([1.0], [1.0]))
    lines.insert(3, "BENCH-ERROR name=handshake-toa side=toa round=1 op=4 error=accept-reported-wrong-peer")
    lines.insert(4, "TOA-BENCH ERROR insmod failed in round 1")
    outcome = bench.evaluate(lines, 1, timed_out=False, returncode=0)
    assert outcome.problems == [
        "BENCH-ERROR name=handshake-toa side=toa round=1 op=4 error=accept-reported-wrong-peer",
        "TOA-BENCH ERROR insmod failed in round 1",
    ]


def test_guest_that_never_started_or_finished():
    outcome = bench.evaluate(["Kernel panic - not syncing: VFS"], 1, timed_out=True, returncode=None)
    joined = " | ".join(outcome.problems)
    assert "never started" in joined and "QEMU was killed" in joined and "did not reach the end" in joined
    assert "kernel fault" in joined and outcome.rows == []


def test_qemu_failure_is_a_problem_even_with_every_sample():
    outcome = bench.evaluate(full_console(1, uniform([1.0], [1.0])), 1, timed_out=False, returncode=1)
    assert outcome.problems == ["QEMU exited with status 1"]


def test_init_runs_the_rounds_alternating_sides():
    init = bench.render_init(tun_modules=["tun.ko"], rounds=4, handshakes=123, calls=4567)
    assert init.startswith("#!/bin/busybox sh\n")
    assert "insmod /lib/modules/tun.ko" in init
    assert "while [ $round -le 4 ]" in init
    baseline = init.index("toa_peer bench baseline $round 123 4567")
    loaded = init.index("insmod /lib/toa.ko")
    toa = init.index("toa_peer bench toa $round 123 4567")
    assert baseline < loaded < toa < init.index("unload $round") < init.index("TOA-BENCH END")


def test_peer_refuses_bad_bench_arguments(tmp_path):
    peer = lab.build_peer(tmp_path)
    for args in (["nope", "1", "10", "10"], ["toa", "0", "10", "10"], ["baseline", "1", "0", "10"], ["toa", "1"]):
        result = subprocess.run([str(peer), "bench", *args], capture_output=True, text=True)
        assert result.returncode == 2, args
        assert "bench SIDE ROUND HANDSHAKES CALLS" in result.stderr


def test_round_counts_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--suite", "bookworm", "--rounds", "0"])
    assert exit_info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err
    assert bench.parse_args(["--suite", "bookworm"]).rounds == bench.DEFAULT_ROUNDS
