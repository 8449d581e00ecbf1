"""Orbax checkpoints of a multi-seed run: the full train state, the metrics so far, and what run it is.

A checkpoint at update U holds, for every seed, the `TrainState` after U updates (parameters,
optimizer state, observation normalizer, KL controller, PRNG key, env state, buffer and
counters), the per-update metrics of updates 1..U, and a JSON record of the run (algo, env,
seeds, resolved config, kl_rl version). Restoring it and running the remaining updates gives,
bit for bit, what the uninterrupted run gives.

Saving is asynchronous (orbax copies the arrays off the device, then writes them from a
background thread while training goes on) and atomic: orbax writes into a temporary folder and
renames it when complete, so a run killed mid-save leaves the previous checkpoint as the latest.

Typed PRNG keys are stored as their raw `key_data` and rewrapped on restore.
"""

import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from kl_rl.errors import ConfigError

FOLDER = "checkpoints"


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_storable(tree: Any) -> Any:
    """Typed PRNG keys replaced by their uint32 key data (what orbax can write)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_storable(tree: Any, template: Any) -> Any:
    """Inverse of `to_storable`: rewraps key data wherever `template` holds a typed key."""

    def wrap(x, t):
        if not _is_key(t):
            return x
        impl = jax.random.key_impl(t) if isinstance(t, jax.Array) else t.dtype._impl  # abstract template
        return jax.random.wrap_key_data(x, impl=impl)

    return jax.tree.map(wrap, tree, template)


def _abstract(template: Any) -> Any:
    """ShapeDtypeStructs of the storable form of `template` (concrete or abstract), on one device.

    A run spread over several devices saves its arrays with that layout; restored onto one
    device, a checkpoint loads whatever device count saved it (the runner spreads it again).
    """
    storable = jax.eval_shape(to_storable, template)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), storable)


def _this_process_only() -> ocp.options.MultiprocessingOptions:
    """Orbax's processes: this one alone. When several processes run a batch, process 0 writes
    the run folder with the results gathered from all (`kl_rl.distributed`); orbax must not wait
    for the others at its barriers (and then leaves creating the folder to the caller)."""
    return ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})


class Checkpointer:
    """Saves and restores the checkpoints of one run folder (`run_dir/checkpoints/<update>`)."""

    def __init__(self, run_dir: str | Path, max_to_keep: int = 2, read_only: bool = False):
        self.directory = Path(run_dir).absolute() / FOLDER
        absl = logging.getLogger("absl")
        level = absl.level
        # orbax warns "Given directory is read only" on every read-only open: loading a run (a
        # reference policy, `kl_rl.runfolder.load`) is what read-only is for, not a problem to report.
        absl.setLevel(logging.ERROR if read_only else level)
        alone = {}
        if jax.process_count() > 1:
            alone = {"multiprocessing_options": _this_process_only(), "create": False}
            if not read_only:
                self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=None if read_only else max_to_keep,
                    save_interval_steps=0 if read_only else 1,
                    enable_async_checkpointing=True,
                    read_only=read_only,
                    **{"create": not read_only, **alone},
                ),
            )
        finally:
            absl.setLevel(level)

    def save(self, update: int, state: Any, metrics: dict[str, np.ndarray], record: dict[str, Any]) -> None:
        """Starts saving the state after `update` updates; returns once the arrays are copied off."""
        storable = to_storable(state)
        if jax.process_count() > 1:  # orbax writes no one-process jax.Array among several processes
            storable = jax.tree.map(np.asarray, storable)
        self._manager.save(
            update,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(storable),
                history=ocp.args.StandardSave({k: np.asarray(v) for k, v in metrics.items()}),
                record=ocp.args.JsonSave(record),
            ),
        )

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def latest(self) -> int | None:
        """The update count of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def updates(self) -> list[int]:
        """The update counts of every complete checkpoint, oldest first."""
        return sorted(self._manager.all_steps())

    def record(self, update: int) -> dict[str, Any]:
        """The JSON record saved with checkpoint `update`."""
        try:
            return self._manager.restore(update, args=ocp.args.Composite(record=ocp.args.JsonRestore())).record
        except Exception as err:  # orbax raises many types for a damaged folder
            raise ConfigError(f"checkpoint {self.directory / str(update)} is unreadable ({_reason(err)})") from None

    def restore(self, update: int, template: Any) -> tuple[Any, dict[str, np.ndarray]]:
        """The state (shaped like `template`) and the metrics saved at `update`.

        Raises:
          ConfigError: the checkpoint is damaged or its arrays do not match `template`.
        """
        path = self.directory / str(update)
        abstract = _abstract(template)
        try:
            restored = self._manager.restore(
                update,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract),
                    history=ocp.args.StandardRestore(),
                ),
            )
        except Exception as err:  # orbax raises many types for a damaged or mismatched folder
            raise ConfigError(
                f"checkpoint {path} does not match this run or is damaged ({_reason(err)}); "
                "resume it with the config it was saved with, or start a new run"
            ) from None
        state = restored.state
        got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), state)
        want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), abstract)
        if jax.tree.structure(got) != jax.tree.structure(want) or jax.tree.leaves(got) != jax.tree.leaves(want):
            raise ConfigError(
                f"checkpoint {path} holds arrays of other shapes than this run's config makes; "
                "resume it with the config it was saved with, or start a new run"
            )
        metrics = {k: np.asarray(v) for k, v in restored.history.items()}
        return from_storable(state, template), metrics


def _reason(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON file of a run folder, or a ConfigError naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: {what}") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is unreadable ({_reason(err)}): {what}") from None
