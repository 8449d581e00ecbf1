import os

import hypothesis
import pytest

# Tests compile from scratch and leave nothing in ~/.cache (kl_rl.runner's persistent cache).
os.environ.setdefault("KL_RL_CACHE_DIR", "off")

# Compiling the small training programs is most of the suite's time. The tests check semantics
# (parity, invariants, equality between two ways of computing the same thing), not speed, so they
# compile with XLA's cheapest backend optimization level, which roughly halves compile time.
# Subprocesses and notebook kernels inherit it. KL_RL_TEST_FAST_COMPILE=0 runs the suite with
# XLA's default flags instead (as the benchmarks do).
if os.environ.get("KL_RL_TEST_FAST_COMPILE", "1") != "0":
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()

hypothesis.settings.register_profile("kl_rl", deadline=None, max_examples=50, derandomize=True)
hypothesis.settings.load_profile("kl_rl")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Make `--dist loadgroup` (pyproject's addopts) keep each xdist_group on one worker.

    pytest-xdist marks a grouped test by appending "@group" to `item._nodeid`; pytest 9 derives a
    test's nodeid from `item._id` instead, so that suffix is lost, every test becomes its own work
    unit, and a file's module-scoped fixtures (an SFT run, a finished run folder) are built once on
    each worker. This appends the suffix where xdist could not, on the workers of a loadgroup run.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        names = {
            str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")
        }
        suffix = "@" + "_".join(sorted(names))
        if not names or item.nodeid.endswith(suffix):
            continue  # ungrouped, or xdist's own suffix took
        if hasattr(item, "_id"):  # pytest >= 9: nodeid is str(item._id)
            from _pytest.nodeid import NodeId

            item._id = NodeId.parse(item.nodeid + suffix)
        else:
            item._nodeid = item.nodeid + suffix
