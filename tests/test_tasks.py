"""The task layer as a whole: one flag convention for every task."""

from toa.tasks import ns


def test_flags_are_long_only_except_the_test_runners_pytest_style():
    """`-o` meant --no-host-key-check in one task and --option in another: tasks take long flags only;
    `invoke test` keeps pytest's -k and -m (and -f for --fast)."""
    for name, task in ns.tasks.items():
        shorts = sorted(flag for argument in task.get_arguments() for flag in argument.names if len(flag) == 1)
        if name == "test":
            assert shorts == ["f", "k", "m"], shorts
        else:
            assert shorts == [], f"{name} has short flags {shorts}"
