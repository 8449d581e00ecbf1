"""Batches of runs on every local device: the one way kl_rl places seeds, grid points and trials.

A batch is a list of items, each one run of `train` (a seed, or a (grid point, seed) pair, or a
(trial, seed) pair) with its own key and config. `layout` spreads the items over the local
devices, padding the last device's share with copies of the final item (dropped afterwards), and
`Programs` compiles a trainer's init, segment and evaluate functions over that layout, each
once, with `shard_map` so that no device talks to another.

How items share a device is the batching (`BATCHING`), by default the platform's:

- "map", the default on CPU: each device runs its items one after another (`lax.map`), each
  through the unbatched program. So an item's result depends only on its key and config, never
  on how many items run beside it or on how many devices there are: the same bits for
  `--seeds 1` and for seed 0 of a 16-seed run on 2 devices. A vmap does not give this (a size-1
  vmap compiles differently, and TRPO's batched dots round differently at every batch size).
- "vmap", the default on accelerators: the items of a device run as one batch. Thousands of
  seeds fill a GPU only that way, and on CPU it is faster too (docs/benchmarks.md), but a
  seed's result can depend on the batch it ran in.

Either can be asked for on any platform. An explicit "map" on a GPU runs the items one after
another there too: their bits do not depend on the batch (up to the GPU's own nondeterminism),
at the price of leaving most of the GPU idle. The host-side env path is always "vmap".

On CPU the devices are the cores once `use_cpu_devices` has run before JAX starts (the `kl-rl`
CLI does it), or with `XLA_FLAGS=--xla_force_host_platform_device_count=N`.

When several processes have joined (`kl_rl.distributed`), a layout takes the same number of
devices from each, and every process runs every program over all of them; `pad` places a batch
that every process holds whole, and `unpad` brings the results back whole to each. Per item,
nothing changes: on CPU 2 processes x 1 device give the bits of 1 process x 2 devices.
"""

import contextlib
import functools
import hashlib
import importlib.util
import os
import pickle
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kl_rl import distributed
from kl_rl.errors import ConfigError
from kl_rl.train import Trainer, vmap_seeds

AXIS = "items"
BATCHING = ("map", "vmap")
"""How the items of one device run: one after another (`lax.map`) or as one batch (`vmap`)."""
PROGRAM_CACHE_ENV = "KL_RL_PROGRAM_CACHE"


def program_cache_enabled() -> bool:
    """Whether `Programs` keeps the programs it lowers (on unless $KL_RL_PROGRAM_CACHE is 0/off).

    It keeps them lowered (`jax.export`'s StableHLO), not compiled: XLA:CPU (jaxlib 0.10)
    serializes an executable that JAX's persistent cache supplied without some of its fused
    functions, so kl_rl's former cache of executables crashed on the second command whenever the
    persistent cache was warm before the first ("Function broadcast_multiply_fusion.3 not found",
    "iota_convert_fusion"). Serializing needs the `flatbuffers` package; without it, nothing is
    kept.
    """
    if os.environ.get(PROGRAM_CACHE_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return False
    return importlib.util.find_spec("flatbuffers") is not None


_FORCE_FLAG = "xla_force_host_platform_device_count"


def use_cpu_devices(count: int | None = None) -> int | None:
    """Exposes `count` CPU devices to JAX (default: one per usable core), so runs spread over them.

    Must run before JAX starts its backends (before the first computation). It leaves alone a
    device count already set through `XLA_FLAGS` (--xla_force_host_platform_device_count) or
    `jax_num_cpu_devices`, and does nothing once JAX has started.

    Returns:
      The count it set, or None when it left things as they were.
    """
    from jax._src import xla_bridge

    if count is not None and (not isinstance(count, int) or count <= 0):
        raise ConfigError(f"{{devices}} must be a positive integer, got {count!r}", "devices")
    if _FORCE_FLAG in os.environ.get("XLA_FLAGS", "") or jax.config.jax_num_cpu_devices > 0:
        return None
    if xla_bridge.backends_are_initialized():
        return None
    # The cores this process may run on (taskset, cgroups' cpusets), not all the machine's.
    if count is None:
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jax.config.update("jax_num_cpu_devices", count)
    return count


class Layout(NamedTuple):
    """How a batch of items sits on the devices."""

    items: int
    """The real items; the batch is padded to `padded`."""
    devices: tuple[Any, ...]
    per_device: int
    mode: str
    """The batching: "map" (items one after another, each unbatched) or "vmap" (items batched)."""

    @property
    def padded(self) -> int:
        return self.per_device * len(self.devices)

    @property
    def sharding(self) -> NamedSharding:
        """The items axis split across the devices."""
        return NamedSharding(Mesh(np.array(self.devices), (AXIS,)), PartitionSpec(AXIS))


def check_batching(batching: str | None) -> str | None:
    """`batching` if it is one of `BATCHING` or None (the platform's default).

    Raises:
      ConfigError: any other value.
    """
    if batching is not None and batching not in BATCHING:
        raise ConfigError(f"{{batching}} must be one of {', '.join(BATCHING)}, got {batching!r}", "batching")
    return batching


def layout(
    items: int, devices: int | Sequence[Any] | None = None, host_env: bool = False, batching: str | None = None
) -> Layout:
    """Spreads `items` over the local devices: at most one device per item, equal shares.

    With several processes, over the devices of every process (`_global_devices`).

    Args:
      items: how many runs the batch holds.
      devices: a device count (the first ones of `jax.local_devices()`; of each process's, with
        several), a list of devices, or None for every local device (of every process).
      host_env: the run steps gymnasium envs on the host. One vector env holds every item's
        copies and is called once per step for the whole batch, so the items are vmapped on one
        device.
      batching: how a device's items run, "map" or "vmap" (module docstring); None: "map" on
        CPU, "vmap" on accelerators.

    Raises:
      ConfigError: a device count that is not positive or exceeds the local devices; a batching
        that is not one of `BATCHING`, or "map" with host-side envs.
    """
    check_batching(batching)
    if host_env and batching == "map":
        raise ConfigError(
            "host-side envs run their items as one batch, so {batching} map does not apply; leave it unset",
            "batching",
        )
    local = jax.local_devices()
    if isinstance(devices, int) and (devices <= 0 or devices > len(local)):
        raise ConfigError(
            f"{{devices}} must be between 1 and the {len(local)} local device(s), got {devices} "
            "(on CPU, kl-rl sets the count before JAX starts; from Python call "
            "kl_rl.parallel.use_cpu_devices(N) first)",
            "devices",
        )
    if jax.process_count() > 1 and (devices is None or isinstance(devices, int)):
        chosen = _global_devices(items, devices, host_env)
    else:
        if devices is None:
            chosen = local
        elif isinstance(devices, int):
            chosen = local[:devices]
        else:
            chosen = list(devices)
        if host_env:
            chosen = chosen[:1]
        chosen = tuple(chosen[: max(1, min(len(chosen), items))])
    if batching is None:
        batching = "map" if chosen[0].platform == "cpu" and not host_env else "vmap"
    return Layout(items, chosen, -(-items // len(chosen)), batching)


def _global_devices(items: int, count: int | None, host_env: bool) -> tuple[Any, ...]:
    """The devices of a layout over several processes (`kl_rl.distributed`): the same number of
    each process's devices (`count` each, default all), fewer when there are fewer items, but at
    least one each, since every process runs every program."""
    if host_env:
        raise ConfigError(
            "the host-side gymnasium envs run in one process; run them without joining other processes, "
            "or use a JAX port of the env (kl-rl list)"
        )
    by_process: dict[int, list[Any]] = {}
    for device in jax.devices():
        by_process.setdefault(device.process_index, []).append(device)
    each = min(len(ds) for ds in by_process.values()) if count is None else count
    each = max(1, min(each, -(-items // len(by_process))))
    return tuple(d for p in sorted(by_process) for d in by_process[p][:each])


def pad(tree: Any, lay: Layout) -> Any:
    """Pads the leading (items) axis of every leaf to `lay.padded` with copies of the last item,
    and places the batch on the layout's devices."""

    def one(x):
        extra = lay.padded - x.shape[0]
        return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)]) if extra else x

    padded = jax.tree.map(one, tree)
    if lay.sharding.is_fully_addressable:
        return jax.device_put(padded, lay.sharding)
    return jax.tree.map(lambda x: _put_global(x, lay.sharding), padded)


def _put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """A batch every process holds whole, placed on devices of several processes (each keeps its share)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _put_global(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)


def unpad(tree: Any, lay: Layout) -> Any:
    """The real items of a padded batch; a batch split over several processes comes to the host whole."""
    return jax.tree.map(lambda x: x[: lay.items], distributed.to_host(tree))


def stack(configs: Sequence[Any]) -> Any:
    """One config pytree whose leaves have a leading items axis."""
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *configs)


def batched(fn: Callable, lay: Layout) -> Callable:
    """`fn` (one item's function) over a padded batch: every argument and output has the items axis."""
    if lay.mode == "map":

        def local(*args):
            return jax.lax.map(lambda item: fn(*item), args)

    else:
        local = vmap_seeds(fn)
    if len(lay.devices) == 1:
        return local
    spec = PartitionSpec(AXIS)
    return jax.shard_map(local, mesh=lay.sharding.mesh, in_specs=spec, out_specs=spec, check_vma=False)


class Programs:
    """A trainer's init, segment of n updates and evaluate over one layout, each compiled once.

    Every argument and output is batched along the items axis (padded to `layout.padded`):
    keys, configs (stacked with `stack`), train states.

    With a `cache_dir` and a `key` naming the trainer (algo, env, path, its config), each
    program is also kept there lowered (`jax.export`: its StableHLO, not an executable), and a
    later process that builds the same programs loads them instead of tracing and lowering
    them, about 1.5 s of Python for PPO. XLA's executable then comes from JAX's persistent
    compilation cache as for any program (`kl_rl.runner.enable_compilation_cache` points it at
    the same folder): a cold process compiles the very module a warm one loads, so the warm one
    hits that cache and both run the same executable. The file name hashes everything a program
    depends on: the key, the program, the layout (which with the key fixes every argument's
    shape), kl_rl's source, the JAX version, XLA_FLAGS and the JAX settings that change numerics.
    $KL_RL_PROGRAM_CACHE=0 turns this cache off (`program_cache_enabled`); programs stepping
    host-side envs are never kept (their callbacks cannot be exported). The files are pickles:
    load only your own.
    """

    def __init__(self, trainer: Trainer, lay: Layout, cache_dir: str | None = None, key: Any = None):
        self.trainer = trainer
        self.layout = lay
        self.compiled: dict[Any, Any] = {}
        self.compile_time_s = 0.0
        self.loaded = 0
        """How many of the programs came from `cache_dir` (loaded, not traced)."""
        # Programs over several processes' devices are not kept: each process would write them.
        enabled = cache_dir is not None and key is not None and program_cache_enabled() and jax.process_count() == 1
        self._cache = Path(cache_dir) / "kl_rl" if enabled and trainer.env_path != "host" else None
        self._key = key

    def _options(self, name: Any) -> dict[str, Any]:
        """XLA options: on CPU, init and evaluate run once, so they compile at the cheapest
        backend level (about 40% of a cold PPO compile went to them at the default level)."""
        once = not isinstance(name, tuple) and self.layout.devices[0].platform == "cpu"
        return {"xla_backend_optimization_level": 0} if once else {}

    def _fn(self, name: Any) -> Callable:
        """Program `name` over the layout: "init", "evaluate", "restart_envs" or ("run", n)."""
        if isinstance(name, tuple):  # ("run", n): a segment of n updates
            return batched(lambda state, config: self.trainer.run(state, config, name[1]), self.layout)
        return batched(getattr(self.trainer, name), self.layout)

    def _trace(self, name: Any, args: tuple) -> tuple[Callable[[], Any], Any]:
        """Traces and lowers program `name` for `args` (arrays or `jax.ShapeDtypeStruct`s).

        Returns:
          (a function that compiles it, and keeps it in the cache; the shapes of its outputs).
        """
        # A segment's state going in is dead once it has its own: XLA may update it in place.
        donate = 0 if isinstance(name, tuple) else ()
        path, options = self._path(name), self._options(name)
        if path is not None:
            try:
                exported = _export(self._fn(name), args, self.layout, donate=isinstance(name, tuple))
            except Exception:  # a program JAX cannot export is compiled as usual, not kept
                pass
            else:

                def compile_and_keep():
                    program = _compile(exported, self.layout, options)
                    _store(path, exported)
                    return program

                return compile_and_keep, exported.out_info(self.layout)
        low = jax.jit(self._fn(name), donate_argnums=donate).lower(*args)
        return functools.partial(low.compile, options), low.out_info

    def prepare(
        self, keys: jax.Array, configs: Any, lengths: Sequence[int], state: Any = None, setup: Any = None
    ) -> None:
        """Makes every program a run needs, at once: init (unless the run starts from a restored
        `state`), a segment of each length in `lengths`, and evaluate. `setup` is init's per-item
        `kl_rl.train.Setup` (a reference policy, parameters to start from), or None.

        Each comes from the program cache where it can; the others are traced one after another
        and each is compiled by XLA in a thread of its own as soon as it is traced, so on two
        cores compilation overlaps the tracing of the next program.
        """
        start = time.perf_counter()
        if state is None and "init" in self.compiled:
            state = self.compiled["init"].out_info
        names = ([] if state is not None else ["init"]) + [("run", n) for n in sorted(set(lengths))] + ["evaluate"]
        names = [name for name in names if name not in self.compiled]
        with ThreadPoolExecutor(max(1, len(names))) as pool:
            loading = {name: pool.submit(_load, self._path(name), self.layout, self._options(name)) for name in names}
            compiling = {}
            for name in names:  # init first: the others take its output, whose shapes stand for it
                if name == "init":
                    args = (keys, configs, setup)
                elif isinstance(name, tuple):
                    args = (state, configs)
                else:
                    args = (keys, state, configs)
                program = loading[name].result()
                if program is not None and program.accepts(args):
                    self.compiled[name] = program
                    self.loaded += 1
                    out_info = program.out_info
                else:
                    compile_program, out_info = self._trace(name, args)
                    compiling[name] = pool.submit(compile_program)
                if name == "init":
                    state = out_info
            for name, future in compiling.items():
                self.compiled[name] = future.result()
        self.compile_time_s += time.perf_counter() - start

    def _call(self, name: Any, *args: Any) -> Any:
        """Runs program `name`, first loading or compiling it for these arguments if need be."""
        if name not in self.compiled:
            start = time.perf_counter()
            program = _load(self._path(name), self.layout, self._options(name))
            if program is not None and program.accepts(args):
                self.loaded += 1
            else:
                program = self._trace(name, args)[0]()
            self.compiled[name] = program
            self.compile_time_s += time.perf_counter() - start
        return self.compiled[name](*args)

    def _path(self, name: Any) -> Path | None:
        """The cache file of program `name`. The key and the layout fix every argument's shape."""
        if self._cache is None:
            return None
        lay = self.layout
        where = (lay.items, lay.per_device, lay.mode, [d.device_kind for d in lay.devices], lay.devices[0].platform)
        parts = ("jax.export", self._key, name, where, _environment())
        return self._cache / f"{hashlib.sha256(repr(parts).encode()).hexdigest()}.pkl"

    def init(self, keys: jax.Array, configs: Any, setup: Any = None) -> Any:
        return self._call("init", keys, configs, setup)

    def run(self, state: Any, configs: Any, num_updates: int) -> tuple[Any, dict[str, jax.Array]]:
        return self._call(("run", num_updates), state, configs)

    def evaluate(self, keys: jax.Array, state: Any, configs: Any) -> jax.Array:
        return self._call("evaluate", keys, state, configs)

    def restart_envs(self, keys: jax.Array, state: Any) -> Any:
        return self._call("restart_envs", keys, state)


# The modules whose code runs while kl_rl's programs are traced (besides JAX), and their packages.
_TRACED_BY = {"flax": "flax", "optax": "optax", "chex": "chex", "numpy": "numpy", "gymnax": "gymnax",
              "brax": "brax", "mujoco": "mujoco", "mujoco.mjx": "mujoco-mjx", "navix": "navix"}  # fmt: skip


def _environment() -> tuple:
    """What a program depends on besides its trainer and arguments: the code that traces it
    (kl_rl's source, the versions of JAX and of the libraries imported) and what changes its
    numerics."""
    from jax._src.lib import version_str as jaxlib_version

    settings = (
        "jax_enable_x64",
        "jax_default_matmul_precision",
        "jax_default_prng_impl",
        "jax_threefry_partitionable",
        "jax_num_cpu_devices",
    )
    return (
        _source_digest(),
        jax.__version__,
        jaxlib_version,
        tuple((module, _version(module, package)) for module, package in _TRACED_BY.items() if module in sys.modules),
        os.environ.get("XLA_FLAGS", ""),
        tuple(str(getattr(jax.config, s, None)) for s in settings),
    )


@functools.cache
def _source_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.cache
def _version(module: str, package: str) -> str | None:
    """A module's `__version__`, else its package's (slower: importlib.metadata scans sys.path)."""
    version = getattr(sys.modules[module], "__version__", None)
    if version is None:
        from importlib import metadata

        with contextlib.suppress(metadata.PackageNotFoundError):
            version = metadata.version(package)
    return version


class _Exported(NamedTuple):
    """A program lowered by `jax.export` over flat arguments, with the trees it takes and gives.

    Flat, so that no pytree node type (kl_rl's states and configs) needs registering with
    `jax.export`'s serialization: the trees are pickled beside it.
    """

    exported: Any
    """The `jax.export.Exported` of the program over the leaves of its arguments."""
    in_tree: Any
    out_tree: Any
    donate: tuple[int, ...]
    """The leaves whose buffers the program may reuse (a segment's train state)."""

    def out_info(self, lay: Layout) -> Any:
        return jax.tree.unflatten(self.out_tree, _specs(self.exported.out_avals, lay))

    def serialize(self) -> bytes:
        return pickle.dumps((bytes(self.exported.serialize()), self.in_tree, self.out_tree, self.donate))

    @classmethod
    def deserialize(cls, blob: bytes) -> "_Exported":
        exported, *trees = pickle.loads(blob)
        return cls(jax.export.deserialize(bytearray(exported)), *trees)


class _Program(NamedTuple):
    """A program compiled from an `_Exported`, called with and answering pytrees like a jitted one."""

    compiled: Any
    exported: _Exported
    out_info: Any

    def accepts(self, args: tuple) -> bool:
        """Whether `args` (arrays or `jax.ShapeDtypeStruct`s) are the trees, shapes and dtypes it takes."""
        leaves, tree = jax.tree.flatten(args)
        shapes = [(a.shape, a.dtype) for a in self.exported.exported.in_avals]
        return tree == self.exported.in_tree and [(x.shape, x.dtype) for x in leaves] == shapes

    def __call__(self, *args: Any) -> Any:
        leaves, tree = jax.tree.flatten(args)
        if tree != self.exported.in_tree:
            raise TypeError(f"a compiled program for arguments {self.exported.in_tree} got {tree}")
        return jax.tree.unflatten(self.exported.out_tree, self.compiled(*leaves))


def _specs(avals: Sequence[Any], lay: Layout) -> list[jax.ShapeDtypeStruct]:
    """Every argument and output of a program lies on the layout's devices, split along the items axis."""
    return [
        jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False), sharding=lay.sharding)
        for a in avals
    ]


def _export(fn: Callable, args: tuple, lay: Layout, donate: bool) -> _Exported:
    """Traces and lowers `fn` (pytrees in and out) for `args` as a function of flat leaves.

    With `donate`, the program may reuse the buffers of its first argument.
    """
    leaves, in_tree = jax.tree.flatten(args)
    leaves = _specs(leaves, lay)
    out_trees = []

    def flat(*leaves):
        out, out_tree = jax.tree.flatten(fn(*jax.tree.unflatten(in_tree, leaves)))
        out_trees.append(out_tree)
        return out

    exported = jax.export.export(jax.jit(flat))(*leaves)
    first = len(jax.tree.leaves(args[0])) if donate else 0
    return _Exported(exported, in_tree, out_trees[0], tuple(range(first)))


def _compile(exported: _Exported, lay: Layout, options: dict[str, Any]) -> _Program:
    """Compiles an exported program over the layout.

    Lowering it only wraps its module in a call; a cold process and a warm one lower the same
    module from the same argument specs, so JAX's persistent cache keys them alike.
    """
    specs = _specs(exported.exported.in_avals, lay)
    call = jax.jit(exported.exported.call, donate_argnums=exported.donate)
    _skip_lapack_setup()
    module = exported.exported.mlir_module_serialized
    _lowering.skip_lapack = lay.devices[0].platform == "cpu" and b"lapack" not in module
    try:
        lowered = call.lower(*specs)
    finally:
        _lowering.skip_lapack = False
    return _Program(lowered.compile(options), exported, exported.out_info(lay))


_lowering = threading.local()


@functools.cache
def _skip_lapack_setup() -> None:
    """Lets `_compile` lower a CPU program that makes no LAPACK call without JAX loading LAPACK.

    Lowering a call of an exported program on CPU makes JAX load LAPACK's kernels from scipy
    first, whatever the program: an import of scipy.linalg that took 0.5 s of a warm README
    command's 1.1 s of compile_time_s (experiments/warm_compile.py). kl_rl's programs make no
    LAPACK call (`kl_rl.networks.orthogonal` avoids one), and a program that makes none never
    uses those kernels. So JAX's (private) hook is wrapped, once, to do nothing in a thread
    where `_lowering.skip_lapack` is set; with a JAX that has no such hook, nothing changes but
    the time.
    """
    try:
        from jax._src.export import _export as jax_export

        ensure = jax_export._ensure_backends_initialized
    except (ImportError, AttributeError):
        return

    def ensure_unless_skipped(platforms):
        if not getattr(_lowering, "skip_lapack", False):
            ensure(platforms)

    jax_export._ensure_backends_initialized = ensure_unless_skipped


def _load(path: Path | None, lay: Layout, options: dict[str, Any]) -> _Program | None:
    """A program `_store` kept, compiled (or None: no cache, missing, unreadable, from another JAX)."""
    if path is None:
        return None
    try:
        return _compile(_Exported.deserialize(path.read_bytes()), lay, options)
    except Exception:  # a missing or stale file is a cache miss, never an error
        return None


def _store(path: Path | None, exported: _Exported) -> None:
    """Writes a lowered program atomically (nothing if it cannot be serialized)."""
    if path is None:
        return
    try:
        blob = exported.serialize()
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as f:
            f.write(blob)
        os.replace(f.name, path)
    except Exception:
        return


def segments(num_updates: int, every: int = 0, target: int = 20) -> list[int]:
    """The update counts of a run's compiled segments.

    With `every` (checkpoints): segments of `every`, the remainder last. Otherwise equal
    segments, about `target` of them (a divisor of `num_updates`, so one program serves them
    all), which is how often the progress bar moves.
    """
    if every:
        return [every] * (num_updates // every) + ([num_updates % every] if num_updates % every else [])
    divisors = [d for d in range(1, num_updates + 1) if num_updates % d == 0]
    size = min(divisors, key=lambda d: (abs(num_updates // d - target), d))
    return [size] * (num_updates // size)
