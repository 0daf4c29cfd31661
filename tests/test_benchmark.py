"""The benchmark scripts: their pure parts on made-up inputs (BENCH lines into medians and ratios, the
verdict on a guest console, deploy runs into ratios and per-host costs, the report), then each script
run end to end in a tiny configuration, checking that it measures and prints ratios that come from
its own measurements. No test here asserts a time."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from toa import lab

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "module_overhead.py"


def _load_script(name: str = "module_overhead"):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
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


def uniform(baseline: list[float], toa: list[float], bpf: list[float] | None = None) -> dict[tuple[str, str], list[float]]:
    """Seconds per metric and side; the eBPF engine's side takes the module's unless given."""
    sides = (("baseline", baseline), ("toa", toa), ("bpf", toa if bpf is None else bpf))
    return {(metric, side): times for metric in bench.METRICS for side, times in sides}


def test_medians_per_side_and_ratio():
    # Rates 1000/s: baseline 500, 1000, 250 (median 500); toa 400, 200, 100000 (median 400).
    lines = full_console(3, uniform([2.0, 1.0, 4.0], [2.5, 5.0, 0.01]))
    outcome = bench.evaluate(lines, 3, timed_out=False, returncode=0)
    assert outcome.problems == []
    assert outcome.release == "6.1.0-56-amd64"
    assert [row.metric for row in outcome.rows] == [*bench.METRICS, "connection"]
    for row in outcome.rows[:-1]:
        assert row.baseline == pytest.approx(500.0)
        assert row.with_toa == pytest.approx(400.0)
        # per-round ratios 0.8, 0.2 and 400: the median, not the ratio of the median rates
        assert row.round_ratios == pytest.approx((0.8, 0.2, 400.0))
        assert row.ratio == pytest.approx(0.8)


def test_the_bpf_engine_is_its_own_column_from_the_same_rounds():
    # bpf: rates 1000/s over 2.0, 4.0, 4.0 s = 500, 250, 250 (median 250); per-round ratios 1, 0.25, 1
    lines = full_console(3, uniform([2.0, 1.0, 4.0], [2.5, 5.0, 0.01], [2.0, 4.0, 4.0]))
    outcome = bench.evaluate(lines, 3, timed_out=False, returncode=0)
    assert outcome.problems == []
    for row in outcome.rows[:-1]:
        assert row.with_bpf == pytest.approx(250.0)
        assert row.bpf_round_ratios == pytest.approx((1.0, 0.25, 1.0)) and row.bpf_ratio == pytest.approx(1.0)
        assert row.ratio == pytest.approx(0.8)  # the module's column is untouched
    without_bpf = [line for line in lines if "side=bpf" not in line]
    missing = bench.evaluate(without_bpf, 3, timed_out=False, returncode=0)
    assert "measurements missing" in " ".join(missing.problems) and "bpf" in " ".join(missing.problems)


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


def _module_for(tmp_path: Path, release: str) -> Path:
    """An ELF object with nothing but a .modinfo naming a kernel, as a module built for it has."""
    source = tmp_path / "modinfo.c"
    source.write_text('const char modinfo[] __attribute__((section(".modinfo"), used)) = '
                      f'"vermagic={release} SMP mod_unload modversions ";\n')
    out = tmp_path / "toa.ko"
    subprocess.run(["gcc", "-c", "-o", str(out), str(source)], check=True)
    return out


def test_ko_must_be_a_module_built_for_the_kernel_booted(tmp_path):
    from toa.errors import ToaError

    module = _module_for(tmp_path, "6.1.0-40-amd64")
    assert bench.given_module(module, "6.1.0-40-amd64") == module.resolve()
    with pytest.raises(ToaError, match="built for 6.1.0-40-amd64, not 6.12.90\\+deb13-amd64"):
        bench.given_module(module, "6.12.90+deb13-amd64")
    (tmp_path / "junk.ko").write_bytes(b"not a module")
    with pytest.raises(ToaError, match="not a kernel module"):
        bench.given_module(tmp_path / "junk.ko", "6.1.0-40-amd64")
    with pytest.raises(ToaError, match="no such file"):
        bench.given_module(tmp_path / "missing.ko", "6.1.0-40-amd64")
    assert bench.parse_args(["--suite", "bookworm", "--ko", str(module)]).ko == module
    assert bench.parse_args(["--suite", "bookworm"]).ko is None


def test_accept_getpeername_is_measured_and_headlined():
    assert bench.METRICS["accept-getpeername"] == "connections/s"
    assert [metric for metric, _what in bench.HEADLINE] == ["handshake-toa", "accept-getpeername", "getpeername-toa"]


def test_connection_adds_the_two_toa_costs_of_each_round():
    lines = ["TOA-BENCH BEGIN release=6.1.0-56-amd64"]
    # handshake-toa 1000 ops: 1 s baseline, 2 s toa; getpeername-toa 1000 ops: 1 s and 1 s.
    # Per connection: baseline 0.001 + 0.001 s (500/s); toa 0.002 + 0.001 s (333.3/s); ratio 2/3.
    seconds = {("handshake-toa", "baseline"): 1.0, ("handshake-toa", "toa"): 2.0,
               ("getpeername-toa", "baseline"): 1.0, ("getpeername-toa", "toa"): 1.0}
    for (metric, side), value in seconds.items():
        lines.append(bench_line(metric, side, 1, 1000, value))
    rows = {row.metric: row for row in bench.summarize(bench.parse_samples(lines))}
    assert rows["connection"].baseline == pytest.approx(500.0)
    assert rows["connection"].with_toa == pytest.approx(1000 / 3)
    assert rows["connection"].ratio == pytest.approx(2 / 3)
    assert "handshake-plain" not in rows  # measured on neither side


def test_connection_needs_both_parts_in_the_same_round():
    lines = [bench_line("handshake-toa", "baseline", 1, 10, 1.0), bench_line("getpeername-toa", "baseline", 2, 10, 1.0),
             bench_line("handshake-toa", "toa", 1, 10, 1.0), bench_line("getpeername-toa", "toa", 1, 10, 1.0)]
    assert "connection" not in [row.metric for row in bench.summarize(bench.parse_samples(lines))]


# ---------------------------------------------------------------- deploy_vs_ansible: pure parts

deploy_bench = _load_script("deploy_vs_ansible")
build_bench = _load_script("build_cost")
report = _load_script("report")
scale_bench = _load_script("deploy_scale")


def _runs(walls: dict[tuple[str, int], list[float]], cpu: float = 1.0):
    return [deploy_bench.Run(tool, n, repeat, wall, cpu * n) for (tool, n), values in walls.items()
            for repeat, wall in enumerate(values, 1)]


def test_deploy_summary_medians_ratios_and_cost_per_added_host():
    runs = _runs({("floor", 1): [2.0], ("toa", 1): [3.0], ("ansible", 1): [30.0],
                  ("floor", 8): [10.0, 12.0, 11.0], ("toa", 8): [12.0, 12.5, 99.0], ("ansible", 8): [200.0]})
    summary = deploy_bench.summarize(runs, [1, 8])
    assert summary["tools"] == ["floor", "toa", "ansible"]
    assert summary["median"]["toa"]["8"]["wall_seconds"] == 12.5
    assert summary["ratios"]["8"] == {"toa/floor": pytest.approx(12.5 / 11), "ansible/toa": pytest.approx(200 / 12.5)}
    assert summary["ratios"]["1"]["toa/floor"] == pytest.approx(1.5)
    assert summary["per_added_host"]["toa"]["wall_seconds"] == pytest.approx((12.5 - 3) / 7)
    assert summary["per_added_host"]["toa"]["cpu_seconds"] == pytest.approx(1.0)
    goals = deploy_bench.goals(summary)
    assert goals["toa/floor at N=8"]["met"] and goals["ansible/toa at N=8"]["met"]
    slow = deploy_bench.summarize(_runs({("floor", 8): [10.0], ("toa", 8): [20.0], ("ansible", 8): [100.0]}), [8])
    verdicts = deploy_bench.goals(slow)
    assert not verdicts["toa/floor at N=8"]["met"] and not verdicts["ansible/toa at N=8"]["met"]
    assert deploy_bench.miss_text("toa/floor at N=8", verdicts["toa/floor at N=8"]) == "missed by a factor of 1.74"
    assert deploy_bench.miss_text("ansible/toa at N=8", verdicts["ansible/toa at N=8"]) == "missed by a factor of 2.40"
    assert slow["per_added_host"] == {}  # one N: no slope


def test_a_host_missing_any_part_of_the_work_is_reported():
    artifact = deploy_bench.artifacts.Artifact(Path("toa.ko"), {"kernel_release": "5.10.0-40-amd64", "target": "debian-12",
                                                                "sha256": "ab" * 32, "srcversion": "8A22A2"})
    done = f"@@loaded 8A22A2\n@@installed {'ab' * 32}\n@@autoload 1\n"
    assert deploy_bench.check_problems(done, artifact) == []
    problems = deploy_bench.check_problems("@@loaded \n@@installed \n@@autoload 0\n", artifact)
    assert problems == ["loaded srcversion none, not 8A22A2", "the installed toa.ko is not the artifact",
                        "no toa line in /etc/modules-load.d/toa.conf"]


def test_every_tool_gets_the_same_key_and_checked_known_hosts(tmp_path):
    guests = [deploy_bench.guests.Guest(f"guest{i}", _image(), tmp_path, 40000 + i) for i in (1, 2)]
    key, known_hosts = Path("/keys/client key"), tmp_path / "known_hosts"
    inventory = deploy_bench.inventory_text(guests, key, known_hosts)
    assert "guest2 ansible_host=127.0.0.1 ansible_port=40002" in inventory
    assert "ansible_user=root" in inventory
    options = deploy_bench.ssh_options(key, known_hosts)
    assert "StrictHostKeyChecking=yes" in options and f"UserKnownHostsFile={known_hosts}" in options
    assert "'IdentityFile=/keys/client key'" in inventory  # quoted for the shell ansible hands it to
    assert deploy_bench.nodes_text(guests) == "root@127.0.0.1:40001\nroot@127.0.0.1:40002\n"
    assert deploy_bench.known_hosts_text(guests).splitlines() == [
        "[127.0.0.1]:40001 ssh-ed25519 AAAAkey", "[127.0.0.1]:40002 ssh-ed25519 AAAAkey"]


def _image():
    return deploy_bench.guests.GuestImage("5.10.0-40-amd64", Path("vmlinuz"), Path("initrd"), Path("disk"),
                                          Path("key"), "ssh-ed25519 AAAAkey")


def test_reset_removes_what_every_tool_writes():
    release = "5.10.0-40-amd64"
    module = f"/lib/modules/{release}/extra/toa.ko"
    script = deploy_bench.reset_command(release, module)
    for path in (module, "/etc/modules-load.d/toa.conf", "/etc/modprobe.d/toa.conf", module + ".prev",
                 "/etc/kernel/postinst.d/zz-toa", "/usr/src/toa-kmod-"):
        assert path in script
    assert "dmesg -C" in script and f"depmod -a {release}" in script  # the floor's dmesg check must not see old lines


def test_profile_steps_add_up_per_host_and_take_the_median():
    marks = {"a": [(0.0, "connect"), (1.0, "autoload"), (1.5, "autoload"), (2.5, "done")],
             "b": [(0.0, "connect"), (3.0, "autoload"), (3.5, "done")],
             "c": [(0.0, "connect"), (2.0, "done")]}
    assert deploy_bench.step_medians(marks) == {"connect": 2.0, "autoload": 0.5}


def test_host_counts_are_checked():
    assert deploy_bench.parse_args(["--hosts", "8,1,4,4"]).hosts == [1, 4, 8]
    for bad in ("0", "1,x", "17", ""):
        with pytest.raises(SystemExit):
            deploy_bench.parse_args(["--hosts", bad])
    with pytest.raises(SystemExit):
        deploy_bench.parse_args(["--tools", "floor,chef"])


def test_build_summary_is_the_median_of_per_round_ratios():
    measurement = build_bench.Measurement("6.1.0-56-amd64", "/headers", [
        build_bench.Round(10.0, 11.0, 0.5, 0.01, 0.05, 0.3, 0.4, 0.2),
        build_bench.Round(20.0, 10.0, 0.7, 0.02, 0.05, 0.3, 0.4, 0.2),
        build_bench.Round(5.0, 10.0, 0.6, 0.03, 0.05, 0.3, 0.4, 0.2)])
    summary = measurement.summary()
    assert summary["cold_over_bare"] == pytest.approx(1.1)  # ratios 1.1, 0.5, 2.0
    assert summary["bare_make_seconds"] == 10.0 and summary["warm_seconds"] == 0.6
    doc = build_bench.document(measurement, {"cores": 2}, [])
    assert doc["goals"]["warm_seconds"]["met"] is False and doc["goals"]["cold_over_bare"]["met"] is True


# ---------------------------------------------------------------- the report, from the committed results


def test_report_from_the_committed_results_shows_their_numbers(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    assert report.main(["--out", str(out)]) == 0
    text = out.read_text()
    found = report.load(report.results.RESULTS_DIR)
    assert set(found) == set(report.NAMES)
    for doc in found.values():
        assert doc["date"] in text and doc["machine"]["cpu"] in text
    deploy_doc = found["deploy_vs_ansible"]
    for n, ratios in deploy_doc["summary"]["ratios"].items():
        for value in ratios.values():
            assert f"{value:.2f}" in text
    assert f"{found['build_cost']['summary']['cold_over_bare']:.3f}" in text
    for row in found["module_overhead"]["rows"]:
        assert f"| {row['metric']} |" in text and f"{row['ratio']:.3f}" in text
    for doc in found.values():
        for goal in doc["goals"].values():
            assert ("met" if goal["met"] else "missed") in text


def test_report_without_results_is_a_one_line_error(tmp_path, capsys):
    assert report.main(["--results", str(tmp_path), "--out", str(tmp_path / "B.md")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "B.md").exists()


def test_a_step_the_docker_engine_refuses_is_one_line_and_exit_1(tmp_path, capsys):
    import docker.errors

    def measure(say):
        raise docker.errors.APIError("500 Server Error: port is already allocated\nsecond line")

    assert scale_bench.results.run(measure, lambda *_: {}, print, tmp_path / "r.json") == 1
    err = capsys.readouterr().err
    assert err == "failed: the Docker engine: 500 Server Error: port is already allocated second line\n"
    assert not (tmp_path / "r.json").exists()


def test_a_deploy_worker_past_its_time_is_a_failed_step(tmp_path, monkeypatch):
    """The worker is really started (a Python that cannot even import in a millisecond) and really cut off."""
    monkeypatch.setattr(scale_bench, "WORKER_TIMEOUT", 0.001)
    hosts = scale_bench.Fleet("run", [1], [], tmp_path / "key", tmp_path / "known_hosts", tmp_path / "nodes.txt")
    with pytest.raises(scale_bench.results.StepFailed, match=r"^the deploy worker did not finish within 0.001 s$"):
        scale_bench.run_worker(hosts, tmp_path, 1, None)


# ---------------------------------------------------------------- the scripts, end to end


def _run(script: str, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT.parent / script), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, cwd=SCRIPT.parent.parent)


@pytest.mark.network
def test_build_cost_end_to_end(tmp_path):
    result = _run("build_cost.py", "--rounds", "1", "--json", str(tmp_path / "build.json"))
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "build.json").read_text())
    (one,) = doc["rounds"]
    assert all(value > 0 for value in one.values())
    printed = re.search(r"ratio cold/bare = ([0-9.]+)", result.stdout)
    assert printed and float(printed[1]) == pytest.approx(one["cold"] / one["bare"], abs=0.0005)
    assert re.search(r"warm re-run = ([0-9.]+) s", result.stdout)[1] == f"{one['warm']:.3f}"


@pytest.mark.lab
@pytest.mark.network
@pytest.mark.docker
@pytest.mark.ssh
def test_deploy_vs_ansible_end_to_end_on_one_guest(tmp_path):
    result = _run("deploy_vs_ansible.py", "--hosts", "1", "--tools", "floor,toa,ansible", "--json",
                  str(tmp_path / "deploy.json"))
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "deploy.json").read_text())
    walls = {run["tool"]: run["wall_seconds"] for run in doc["runs"]}
    assert sorted(walls) == ["ansible", "floor", "toa"] and all(wall > 0 for wall in walls.values())
    printed = dict(re.findall(r"([a-z-]+/[a-z-]+) = ([0-9.]+)", result.stdout.split("N=1:", 1)[1].splitlines()[0]))
    assert float(printed["toa/floor"]) == pytest.approx(walls["toa"] / walls["floor"], abs=0.005)
    assert float(printed["ansible/toa"]) == pytest.approx(walls["ansible"] / walls["toa"], abs=0.005)


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.network
def test_module_overhead_end_to_end_one_round(tmp_path):
    result = _run("module_overhead.py", "--suite", "bookworm", "--rounds", "1", "--handshakes", "200",
                  "--calls", "2000", "--icount", "--out", str(tmp_path / "dist"), "--json", str(tmp_path / "overhead.json"))
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "overhead.json").read_text())
    # --icount: the guest's clock counts emulated instructions, said in the output and the results
    assert doc["clock"] == "instructions" and "clock: emulated instructions" in result.stdout
    rows = {row["metric"]: row for row in doc["rows"]}
    assert set(rows) == {*bench.METRICS, "connection"}
    for row in rows.values():
        assert row["ratio"] == pytest.approx(row["with_toa"] / row["baseline"])  # one round: one ratio
        assert row["bpf_ratio"] == pytest.approx(row["with_bpf"] / row["baseline"])
        assert re.search(rf"{row['metric']}\s.*\s{row['ratio']:.3f}\s.*\s{row['bpf_ratio']:.3f}\s", result.stdout)
    assert re.search(r"^bpf ratio [0-9.]+  connection rate", result.stdout, re.M)


def test_scale_slope_and_estimate_come_from_the_smallest_and_largest_n():
    points = [{"hosts": 200, "cpu_seconds": 12.0, "peak_rss_mib": 90.0, "wall_seconds": 60.0},
              {"hosts": 50, "cpu_seconds": 4.5, "peak_rss_mib": 75.0, "wall_seconds": 20.0},
              {"hosts": 100, "cpu_seconds": 99.0, "peak_rss_mib": 999.0, "wall_seconds": 999.0}]
    summary = scale_bench.summarize(points, estimate_hosts=10_000)
    assert summary["between"] == [50, 200]
    assert summary["cpu_per_host"] == pytest.approx(0.05) and summary["rss_mib_per_host"] == pytest.approx(0.1)
    assert summary["estimate"]["cpu_seconds"] == pytest.approx(12.0 + 0.05 * 9_800)
    assert summary["estimate"]["peak_rss_mib"] == pytest.approx(90.0 + 0.1 * 9_800)
    assert scale_bench.goals(summary)["cpu per added host"]["met"]
    assert scale_bench.summarize(points[:1])["cpu_per_host"] is None and scale_bench.goals(
        scale_bench.summarize(points[:1])) == {}


def test_a_fleet_host_missing_any_part_of_the_deploy_is_reported():
    sha, srcversion = "a" * 64, "ABCDEF0123456789ABCDEF0"
    whole = f"@@installed {sha}\n@@loaded {srcversion}\n@@autoload 1\n"
    assert scale_bench.check_problems(whole, sha, srcversion) == []
    assert scale_bench.check_problems("@@installed \n@@loaded \n@@autoload 0\n", sha, srcversion) == [
        "the installed toa.ko is not the artifact", f"loaded srcversion none, not {srcversion}",
        "no toa line in /etc/modules"]


def test_scale_host_counts_are_checked():
    assert scale_bench.parse_counts("200,50,50") == [50, 200]
    for bad in ("0", "50,", "x", "1001"):
        with pytest.raises(Exception):
            scale_bench.parse_counts(bad)


@pytest.mark.docker
def test_a_fleet_host_toa_never_touched_fails_the_check(tmp_path):
    """The check reads the host from outside toa: a fleet host nothing was deployed to fails it, and
    its fake kernel surface refuses a module for another release."""
    from toa import build, guests

    client = build.docker_client()
    userland = guests.userland(guests.DEFAULT_SUITE)
    tree = _cached_tree()
    image = scale_bench.fleet_image(client, userland, tree, say=lambda _text: None)
    with scale_bench.fleet(client, image, 1, userland, tmp_path, say=lambda _text: None) as hosts:
        with pytest.raises(scale_bench.results.StepFailed, match="not the artifact"):
            scale_bench.verify_fleet(hosts, f"/lib/modules/{tree.release}/updates/toa.ko", "a" * 64, "ABC")
        (container,) = hosts.containers
        # a module whose vermagic names another release is refused, as the kernel's loader would
        script = ("printf 'name=toa\\0vermagic=0.0.0-other SMP\\0srcversion=ABC\\0' > /tmp/toa.ko; "
                  "insmod /tmp/toa.ko 2>&1; echo exit=$?; echo loaded=$(ls /sys/module)")
        output = container.exec_run(["sh", "-c", script]).output.decode()
        assert "Invalid module format" in output and "exit=1" in output
        assert "loaded=\n" in output  # nothing recorded as loaded
    assert not client.containers.list(all=True, filters={"label": f"{scale_bench.LABEL}={hosts.run_id}"})


def _cached_tree():
    """The newest bookworm kernel toa has in its cache (the fleet image needs its /boot files only)."""
    from toa import debian

    trees = sorted((debian.cache_dir() / "kernels").glob("*/root/usr/src/linux-headers-*-amd64"))
    if not trees:
        pytest.skip("no Debian kernel in toa's cache: run a network test first")
    headers = trees[-1]
    release = headers.name.removeprefix("linux-headers-")
    root = headers.parents[2]
    return debian.KernelTree(release=release, suite="bookworm", vmlinuz=root / "boot" / f"vmlinuz-{release}",
                             modules_dir=None, headers_dir=headers)


@pytest.mark.docker
@pytest.mark.network
def test_deploy_scale_end_to_end_on_five_hosts(tmp_path):
    """The scale benchmark at N = 1 and 5: a real deploy to every fleet host, each checked by the script
    (sha256 installed, srcversion loaded, /etc/modules), the numbers printed from its own JSON, and no
    container left behind."""
    import docker

    def fleet_containers() -> set[str]:
        return {c.id for c in docker.from_env().containers.list(all=True, filters={"label": scale_bench.LABEL})}

    before = fleet_containers()  # another run's fleet may be up meanwhile
    result = _run("deploy_scale.py", "--hosts", "1,5", "--dist", str(tmp_path / "dist"), "--json",
                  str(tmp_path / "scale.json"))
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "scale.json").read_text())
    assert [point["hosts"] for point in doc["points"]] == [1, 5]
    assert all(point["cpu_seconds"] > 0 and point["peak_rss_mib"] > 0 for point in doc["points"])
    summary = doc["summary"]
    assert summary["cpu_per_host"] == pytest.approx(
        (doc["points"][1]["cpu_seconds"] - doc["points"][0]["cpu_seconds"]) / 4)
    assert f"{summary['cpu_per_host']:.4f}" in result.stdout and "estimate" in result.stdout
    assert fleet_containers() <= before


def test_goal_verdicts_say_how_far_off():
    assert report.goal_text({"goal": "<= 0.3 s", "measured": 0.45, "met": False}) == "missed: 1.50x the limit"
    assert report.goal_text({"goal": ">= 12.0", "measured": 9.0, "met": False}) == "missed: reaches 0.75 of the goal"
    assert report.goal_text({"goal": ">= 0.99", "measured": 1.0, "met": True}) == "met"
