#!/usr/bin/env python3
"""Write BENCHMARKS.md from the benchmark scripts' JSON results (benchmarks/results/*.json).

Every number in BENCHMARKS.md comes from those files, each naming the machine, the date and the
command that produced it; the explanations of missed goals are computed from the same measurements
(where the time went), so they cannot drift from the figures. Regenerate after any run:

    python benchmarks/report.py [--results benchmarks/results] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jinja2

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402  (a sibling file, found when run as a script or loaded by the tests)

BENCH_DIR = Path(__file__).resolve().parent
TEMPLATE = "BENCHMARKS.md.j2"
NAMES = ("deploy_vs_ansible", "deploy_scale", "build_cost", "module_overhead")


def load(results_dir: Path) -> dict[str, dict]:
    """The latest result of each benchmark found in RESULTS_DIR (missing ones are left out)."""
    found = {}
    for name in NAMES:
        path = Path(results_dir) / f"{name}.json"
        if path.is_file():
            found[name] = json.loads(path.read_text())
    return found


def machine_line(doc: dict) -> str:
    machine = doc["machine"]
    load_average = ", ".join(f"{value:g}" for value in machine.get("load_average_at_start", []))
    return (f"{machine['hostname']}: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
            f"{machine['os']}, kernel {machine['kernel']}, Python {machine['python']}; "
            f"load average at start {load_average}; {doc['date']}")


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def goal_limit(goal: dict) -> float:
    """The number in a goal as the scripts write it: "<= 1.1", "<= 0.3 s", ">= 0.99"."""
    return float(goal["goal"].split()[1])


def goal_text(goal: dict) -> str:
    """"met", or how far the measurement is from the goal."""
    if goal["met"]:
        return "met"
    if goal["goal"].startswith("<="):
        return f"missed: {goal['measured'] / goal_limit(goal):.2f}x the limit"
    return f"missed: reaches {goal['measured'] / goal_limit(goal):.2f} of the goal"


def deploy_view(doc: dict) -> dict:
    """The deploy table and its explanations, from deploy_vs_ansible's JSON."""
    summary = doc["summary"]
    counts = list(next(iter(summary["median"].values())))
    rows = [{"tool": tool,
             "cells": [(seconds(summary["median"][tool][n]["wall_seconds"]),
                        seconds(summary["median"][tool][n]["cpu_seconds"])) for n in counts]}
            for tool in summary["tools"]]
    reference = {tool: [seconds(by_n.get(n) or by_n.get(int(n))) for n in counts]
                 for tool, by_n in doc["reference_before_toa"].items()}
    goals = [{"name": name, "goal": goal["goal"], "measured": f"{goal['measured']:.2f}", "verdict": goal_text(goal)}
             for name, goal in doc["goals"].items()]
    profile = doc.get("profile")
    return {"counts": counts, "rows": rows, "ratios": summary["ratios"], "reference": reference, "goals": goals,
            "per_host": summary["per_added_host"], "between": summary["per_added_host_between"],
            "profile": profile, "profile_total": sum(profile["step_seconds"].values()) if profile else None}


def load_note(doc: dict) -> str | None:
    """A note when other work loaded the machine as the run started (it slows every side alike)."""
    machine = doc["machine"]
    load_average = (machine.get("load_average_at_start") or [0])[0]
    if load_average < machine["cores"]:
        return None
    return (f"The load average was {load_average:g} on {machine['cores']} cores when the run started: other work "
            "shared the machine and slowed every side; the ratios compare sides measured in the same run.")


def deploy_notes(doc: dict) -> list[str]:
    """Why a deploy goal was missed, in the run's own numbers."""
    view, notes = deploy_view(doc), []
    medians, goals = doc["summary"]["median"], doc["goals"]
    top = str(max(int(n) for n in view["counts"]))
    profile = doc.get("profile")
    missed_floor = "toa/floor at N=8" in goals and not goals["toa/floor at N=8"]["met"]
    if missed_floor and profile:
        steps = sorted(profile["step_seconds"].items(), key=lambda item: -item[1])
        parts = ", ".join(f"{step} {value:.1f} s" for step, value in steps)
        notes.append(
            f"toa/floor: in a profiled toa deploy to {profile['hosts']} hosts, the median host spent {parts} "
            f"({view['profile_total']:.1f} s in all; the whole run took {profile['wall_seconds']:.1f} s), where the "
            f"floor's whole run to {top} hosts took {medians['floor'][top]['wall_seconds']:.1f} s (the guests' CPUs "
            "are the bottleneck: every step waits for them, the floor's copy, depmod and load included).")
    per_host = view["per_host"]
    if "toa" in per_host:
        low, high = view["between"]
        cost = per_host["toa"]
        notes.append(
            f"Per added host (N={low} to N={high}), toa's wall time grew {cost['wall_seconds']:.2f} s while its own "
            f"processes used {cost['cpu_seconds']:.2f} s more CPU on this machine: the rest of the wall time is the "
            f"guests, whose emulated CPUs share {doc['machine']['cores']} host cores.")
    missed_ansible = "ansible/toa at N=8" in goals and not goals["ansible/toa at N=8"]["met"]
    if missed_ansible and {"ansible", "toa", "floor"} <= set(medians):
        reference = doc["reference_before_toa"]
        ansible_then, floor_then = (reference[tool].get(top) or reference[tool].get(int(top))
                                    for tool in ("ansible", "floor"))
        ansible_now, floor_now = (medians[tool][top]["wall_seconds"] for tool in ("ansible", "floor"))
        notes.append(
            f"ansible/toa: the goal reads Ansible's {ansible_then:.0f} s for {top} hosts, measured when it was set, "
            f"against 1.5x that day's floor of {floor_then:.0f} s. In this run the floor took {floor_now:.1f} s "
            f"({floor_now / floor_then:.1f}x then) but Ansible {ansible_now:.1f} s ({ansible_now / ansible_then:.1f}x "
            f"then): Ansible over the floor is {ansible_now / floor_now:.1f} here against "
            f"{ansible_then / floor_then:.1f} then. A deploy at the goal's 1.5x the floor would have reached "
            f"ansible/toa = {ansible_now / floor_now / 1.5:.1f} here; toa, at "
            f"{medians['toa'][top]['wall_seconds'] / floor_now:.2f}x the floor, reached "
            f"{goals['ansible/toa at N=8']['measured']:.1f}.")
    note = load_note(doc)
    return notes + ([note] if note else [])


def build_notes(doc: dict) -> list[str]:
    summary, notes = doc["summary"], []
    if not doc["goals"]["warm_seconds"]["met"]:
        notes.append(
            f"Warm re-run: {summary['warm_seconds']:.2f} s, of which toa's own up-to-date check takes "
            f"{summary['warm_in_process_seconds']:.3f} s. The rest is start-up, measured in fresh processes: the "
            f"interpreter alone {summary['python_startup_seconds']:.2f} s, `import docker` "
            f"{summary['import_docker_seconds']:.2f} s, `import toa.build` {summary['import_build_seconds']:.2f} s, "
            f"invoke with toa's "
            f"tasks {summary['invoke_startup_seconds']:.2f} s.")
    if not doc["goals"]["cold_over_bare"]["met"]:
        ratios = [one["cold"] / one["bare"] for one in doc["rounds"]]
        notes.append(
            f"Cold build: {summary['cold_seconds']:.2f} s against bare make's {summary['bare_make_seconds']:.2f} s "
            f"(medians; the rounds' ratios ranged {min(ratios):.2f} to {max(ratios):.2f}). toa runs the same make; "
            f"what it adds is mostly the start-up of the warm re-run above ({summary['warm_seconds']:.2f} s), "
            f"plus copying the sources, reading toa.ko's .modinfo and writing the manifest.")
    note = load_note(doc)
    return notes + ([note] if note else [])


def overhead_notes(doc: dict) -> list[str]:
    notes = []
    goal = doc["goals"].get("connection ratio")
    rows = {row["metric"]: row for row in doc["rows"]}
    if goal and not goal["met"] and {"connection", "handshake-toa", "getpeername-toa"} <= set(rows):
        connection, handshake, call = rows["connection"], rows["handshake-toa"], rows["getpeername-toa"]
        # a connection's seconds = one handshake's + one call's, so each part's share is its rate's inverse
        call_share = connection["with_toa"] / call["with_toa"]
        plain = rows.get("handshake-plain")
        notes.append(
            f"Connection rate: median ratio {goal['measured']:.3f} (rounds {min(connection['round_ratios']):.3f} "
            f"to {max(connection['round_ratios']):.3f}). getpeername() is slower with the module loaded (ratio "
            f"{call['ratio']:.3f}), but one call is {call_share:.2%} of a connection's time: the connection ratio "
            f"follows the handshake's ({handshake['ratio']:.3f}"
            + (f"; {plain['ratio']:.3f} without a TOA option" if plain else "")
            + "), the module's hooks on the handshake path (syn_recv, the peer address accept() asks for, the "
              "socket's destructor) cost that much in this emulated CPU; whether hardware pays the same share was "
              "not measured here.")
    note = load_note(doc)
    return notes + ([note] if note else [])


def scale_notes(doc: dict) -> list[str]:
    """What the loopback fleet's numbers say beyond the table, in the run's own numbers."""
    notes = []
    summary = doc["summary"]
    if summary.get("cpu_per_host") is not None:
        low, high = summary["between"]
        estimate = summary["estimate"]
        notes.append(
            f"Estimate, not a measurement: from the slope between N={low} and N={high}, {estimate['hosts']:,} hosts "
            f"would cost toa about {estimate['cpu_seconds'] / 60:.0f} CPU-minutes and a peak of about "
            f"{estimate['peak_rss_mib']:.0f} MiB on the control host, and take about "
            f"{estimate['wall_seconds'] / 3600:.1f} h at --parallel {doc['parallel']} against hosts that answer as "
            f"fast as these containers (real hosts and networks are slower; the CPU figure does not depend on it).")
    if load_note(doc):
        machine = doc["machine"]
        notes.append(f"The load average was {machine['load_average_at_start'][0]:g} on {machine['cores']} cores when the "
                     "run started: other work slowed the wall times; the CPU times are the deploy process's own.")
    return notes


def report(found: dict[str, dict]) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(BENCH_DIR), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["seconds"] = seconds
    env.globals["machine_line"] = machine_line
    deploy = found.get("deploy_vs_ansible")
    return env.get_template(TEMPLATE).render(
        deploy=deploy, deploy_view=deploy_view(deploy) if deploy else None,
        build=found.get("build_cost"), overhead=found.get("module_overhead"), goal_text=goal_text,
        scale=found.get("deploy_scale"), scale_notes=scale_notes, deploy_notes=deploy_notes, build_notes=build_notes, overhead_notes=overhead_notes,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write BENCHMARKS.md from the benchmarks' JSON results.")
    parser.add_argument("--results", type=Path, default=results.RESULTS_DIR,
                        help="directory of <benchmark>.json files (default: benchmarks/results)")
    parser.add_argument("--out", type=Path, default=results.REPO / "BENCHMARKS.md",
                        help="the file to write (default: BENCHMARKS.md at the top of the repository)")
    args = parser.parse_args(argv)
    found = load(args.results)
    if not found:
        print(f"error: no results in {args.results}: run the benchmarks first (see benchmarks/README.md)",
              file=sys.stderr)
        return 2
    args.out.write_text(report(found))
    print(f"wrote {args.out} from {', '.join(sorted(found))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
