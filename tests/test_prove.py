"""toa.prove, the one fetch -> build -> lab pipeline, and build plans that are executed, not redone:
a kernel is resolved on the mirror once, and the build uses exactly what planning resolved."""

import dataclasses

import pytest

from toa import build, debian, prove
from toa.errors import ToaError

RESOLVERS = ("resolve_suite", "find_release", "cached_packages", "kernels_of_suite")


@pytest.fixture
def lookups(monkeypatch):
    """Every call to toa.debian's resolvers and to its fetch, counted; the real functions still run."""
    calls = []
    for name in (*RESOLVERS, "fetch"):
        real = getattr(debian, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, args))
            return _real(*args, **kwargs)

        monkeypatch.setattr(debian, name, spy)
    return calls


def test_a_bad_kernel_ends_the_proof_at_fetch_in_one_line(tmp_path):
    proof = prove.prove(kernel="5.14.0-503.el9.x86_64", dist=tmp_path)
    assert (proof.stage, proof.fetched, proof.built, proof.report) == ("fetch", None, None, None)
    assert "not a Debian kernel release" in proof.error and "\n" not in proof.error and not proof.ok
    with pytest.raises(ToaError, match=r"^fetch: 5.14.0-503.el9.x86_64 is not a Debian kernel release"):
        proof.raise_failure()


def test_a_plan_without_packages_or_headers_is_refused_not_resolved_again(tmp_path, lookups):
    plan = build.plan_debian_tree("6.1.0-9-amd64", "bookworm", tmp_path / "headers", tmp_path)
    plan = build.BuildPlan(plan.release, plan.target, plan.method, plan.image, plan.headers_package, plan.output,
                           suite=plan.suite)
    with pytest.raises(ToaError, match="carries neither its Debian packages nor headers"):
        build.execute(plan)
    assert lookups == []


@pytest.mark.network
def test_fetch_resolves_once_and_fetches_what_the_plan_resolved(tmp_path, lookups):
    fetched = prove.fetch(suite="bookworm", dist=tmp_path)
    resolved = [call for call in lookups if call[0] in RESOLVERS and call[0] != "kernels_of_suite"]
    assert [name for name, _ in resolved] == ["resolve_suite"], lookups
    assert [args for name, args in lookups if name == "fetch"] == [(fetched.plan.packages,)]
    assert fetched.plan.release == fetched.tree.release == fetched.plan.packages.release
    assert fetched.plan.output == tmp_path / fetched.plan.target / fetched.release


@pytest.mark.network
@pytest.mark.docker
def test_the_build_executes_the_plan_without_looking_the_kernel_up_again(tmp_path, lookups):
    fetched = prove.fetch(suite="bookworm", dist=tmp_path)
    lookups.clear()
    result = prove.build_module(fetched)
    assert lookups == [], "the build looked the kernel up again"
    assert result.ko == fetched.plan.output / "toa.ko" and result.ko.is_file()
    assert build.execute(fetched.plan, tree=fetched.tree).skipped and lookups == []
    # A tree of another kernel is not silently built against the plan's.
    other = dataclasses.replace(fetched.tree, release=fetched.release + "-other")
    with pytest.raises(ToaError, match="plan and fetch the same one"):
        build.execute(fetched.plan, tree=other)
