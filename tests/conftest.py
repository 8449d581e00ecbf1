import os

import hypothesis
import pytest

# Tests compile from scratch and leave nothing in ~/.cache (kl_rl.runner's persistent cache).
os.environ.setdefault("KL_RL_CACHE_DIR", "off")

# Compiling the small training programs is most of the suite's time. The tests check semantics
# (parity, invariants, equality between two ways of computing the same thing), not speed, so they
# compile as cheaply as XLA:CPU allows. Measured on one core (a 3-seed, 8-update PPO run and a
# 2-seed, 4-update TRPO run, compile included), from XLA's defaults:
#   --xla_backend_optimization_level=0       the cheapest backend level: roughly half the time
#   --xla_llvm_disable_expensive_passes      (with the first: what jax's disable_most_optimizations
#                                            sets) 17% off a sweep test
#   --xla_cpu_use_fusion_emitters=false      the elemental emitters instead of the MLIR fusion
#                                            emitters: 13.1 s -> 6.4 s and 10.9 s -> 4.8 s
#   --xla_cpu_parallel_codegen_split_count=1 one LLVM module, not split for parallel codegen
#                                            (the two test processes fill the cores): 5.8 s, 4.1 s
# They change rounding, not semantics; every test compares results computed under the same flags
# or to tolerances. Subprocesses and notebook kernels inherit them. KL_RL_TEST_FAST_COMPILE=0
# runs the suite with XLA's default flags instead (as the benchmarks do).
FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)
if os.environ.get("KL_RL_TEST_FAST_COMPILE", "1") != "0":
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in FAST_COMPILE_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}"
    os.environ["XLA_FLAGS"] = flags.strip()

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
