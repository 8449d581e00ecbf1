import os

import hypothesis

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
