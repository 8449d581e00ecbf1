"""Several processes, one run: joining JAX's multi-controller runtime, and results on the host.

Every process runs the same command; `join` connects them (`jax.distributed.initialize`) before
JAX starts its backends. From then on `jax.devices()` lists the devices of every process, and
`kl_rl.parallel.layout` spreads a batch's items over all of them: each process runs the items
of its own devices, through the same compiled programs as one process would. `to_host` brings
a batch's results (arrays split over the processes) to every process, so process 0 can write
the run folder (`is_main`).

    >>> import jax, kl_rl
    >>> jax.distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=0)  # the other: 1
    >>> result = kl_rl.run("ppo", "CartPole-v1", seeds=8)   # the same call in every process
    >>> if jax.process_index() == 0: result.save("runs/ppo")

On CPU the processes talk through gloo (`jax_cpu_collectives_implementation`).
"""

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from kl_rl.errors import ConfigError

JOIN_TIMEOUT_S = 60
"""How long a process waits for the others to join, and for a silent one before giving up."""
TIMEOUT_ENV = "KL_RL_JOIN_TIMEOUT_S"


def join_timeout() -> int:
    """$KL_RL_JOIN_TIMEOUT_S if set (a positive number of seconds), else `JOIN_TIMEOUT_S`."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        return max(1, int(text)) if text else JOIN_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"${TIMEOUT_ENV} must be a whole number of seconds, got {text!r}") from None


_FLAGS = ("coordinator", "num_processes", "process_id")

_joined = {"seconds": None}


def join_time_s() -> float | None:
    """How long this process's `join` waited for the others (seconds), or None if it joined none."""
    return _joined["seconds"]


def cluster_detected() -> bool:
    """Whether this process is one task of several in a SLURM step (srun) or an Open MPI job.

    Narrower than JAX's own detection, which takes any SLURM job (an salloc shell, an sbatch
    script's single task) for a cluster and would then wait for processes that never come.
    """
    for name in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(os.environ.get(name, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def check(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Raises a ConfigError unless the three are all given (and consistent) or all None."""
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if not any(given):
        return
    if not all(given):
        missing = ", ".join("{" + name + "}" for name, g in zip(_FLAGS, given, strict=True) if not g)
        raise ConfigError(
            "{coordinator}, {num_processes} and {process_id} go together: give all three "
            f"(missing {missing}), or none for one process",
            *_FLAGS,
        )
    host, sep, port = str(coordinator).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{{coordinator}} must be HOST:PORT (e.g. 127.0.0.1:12345), got {coordinator!r}",
                          "coordinator")  # fmt: skip
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ConfigError(f"{{num_processes}} must be a positive integer, got {num_processes!r}", "num_processes")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ConfigError(
            f"{{process_id}} must be between 0 and {{num_processes}} - 1 = {num_processes - 1}, got {process_id!r}",
            "process_id",
            "num_processes",
        )


def join(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int | None = None,
) -> bool:
    """Joins this process to the others of a run (`jax.distributed.initialize`), before JAX starts.

    With none of the three given, joins only inside a SLURM step or Open MPI job of several
    tasks (`cluster_detected`), where JAX finds the coordinator itself; otherwise it does
    nothing and the run is one process, as always.

    A process that stops answering for `timeout_s` (default `join_timeout()`) while the run goes
    on makes the others stop with an error rather than wait forever; JAX gives up waiting for the
    others to join 10 s later, so a caller's own deadline of `timeout_s` can speak first
    (`kl-rl` prints one line; JAX ends the process with a stack dump).

    Returns:
      Whether this process joined others.

    Raises:
      ConfigError: some but not all of the three given, a bad value, or JAX already started.
    """
    from jax._src import distributed as jax_distributed
    from jax._src import xla_bridge

    check(coordinator, num_processes, process_id)
    if coordinator is None and not cluster_detected():
        return False
    if jax_distributed.global_state.client is not None:
        return True  # the caller joined already
    if xla_bridge.backends_are_initialized():
        raise ConfigError("joining other processes must come before JAX starts (before any computation)")
    # CPU devices talk to other processes through gloo; GPUs and TPUs have their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout_s = join_timeout() if timeout_s is None else timeout_s
    start = time.perf_counter()
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               initialization_timeout=timeout_s + 10, heartbeat_timeout_seconds=timeout_s)  # fmt: skip
    _joined["seconds"] = time.perf_counter() - start
    return True


def watch(on_lost: Callable[[str], None], timeout_s: int | None = None, every_s: float = 1.0) -> Callable[[], None]:
    """Notices a process of the run going silent sooner than JAX does, in a daemon thread.

    Each process bumps a counter in the coordinator's key-value store every `every_s`. When
    another process's counter has not moved for a third of `timeout_s` (default
    `join_timeout()`), or the store itself stops answering (process 0 is gone), `on_lost` is
    called once with the silent process's name; JAX's own heartbeat ends the process with a
    stack dump at `timeout_s`, so this gives the caller the first word.

    Returns:
      `done()`: call it once this process has finished its part: it stops watching, and the
      others stop expecting its counter (process 0 may still be writing the run folder).
    """
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    index, count = jax.process_index(), jax.process_count()
    stale_s = (join_timeout() if timeout_s is None else timeout_s) / 3
    finished = threading.Event()

    def beat() -> None:
        seen: dict[int, tuple[str, float]] = {}
        bumps = 0
        while True:
            now = time.monotonic()
            if finished.is_set():  # the others may now finish and go, this one with them
                with contextlib.suppress(Exception):
                    client.key_value_set(f"kl_rl/alive/{index}", "done", allow_overwrite=True)
                return
            try:
                client.key_value_set(f"kl_rl/alive/{index}", str(bumps), allow_overwrite=True)
                bumps += 1
                for other in range(count):
                    if other == index:
                        continue
                    try:
                        value = client.key_value_try_get(f"kl_rl/alive/{other}")
                    except Exception:  # not written yet
                        value = ""
                    if value == "done":
                        continue
                    if other not in seen or seen[other][0] != value:
                        seen[other] = (value, now)
                    elif now - seen[other][1] > stale_s:
                        on_lost(f"process {other}")
                        return
            except Exception:
                on_lost("process 0 (the coordinator)")
                return
            time.sleep(every_s)

    threading.Thread(target=beat, name="kl_rl-watch", daemon=True).start()
    return finished.set


_shared = {"count": 0}


def share(value: Any = None, timeout_s: int | None = None) -> Any:
    """Process 0's `value` (JSON-serializable), on every process: what one process decides for all.

    Every process calls it at the same point of the run (process 0 with the value, the others
    with anything); the others wait for it at most `timeout_s` (default `join_timeout()`). In
    one process it returns `value`. Tuning uses it: process 0 asks Optuna and tells it, the
    others run the same trials.
    """
    if jax.process_count() == 1:
        return value
    import json

    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    key = f"kl_rl/share/{_shared['count']}"
    _shared["count"] += 1
    if is_main():
        client.key_value_set(key, json.dumps(value))
        return value
    timeout = join_timeout() if timeout_s is None else timeout_s
    return json.loads(client.blocking_key_value_get(key, timeout * 1000))


def barrier(name: str, timeout_s: int | None = None) -> None:
    """Waits until every process has reached `barrier(name)` (a no-op in one process): what a
    process checks on a shared filesystem, before process 0 writes there."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    timeout = join_timeout() if timeout_s is None else timeout_s
    jax_distributed.global_state.client.wait_at_barrier(f"kl_rl/{name}", timeout * 1000)


def is_main() -> bool:
    """Whether this process writes the run's files and prints its progress (process 0)."""
    return jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """Every array of `tree` split over several processes, gathered whole onto this host (numpy).

    Each process calls it for the same arrays in the same order (it is a collective). Arrays
    this process holds entirely are returned as they are, so one process changes nothing.
    """

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        from jax.experimental import multihost_utils

        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = multihost_utils.process_allgather(jax.random.key_data(x), tiled=True)
            return jax.random.wrap_key_data(np.asarray(data), impl=jax.random.key_impl(x))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)
