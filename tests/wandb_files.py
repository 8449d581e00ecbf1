"""Offline W&B runs read back from their local files, for the tests of `kl_rl.logging_wandb`."""

import json
import struct
from collections.abc import Iterator
from pathlib import Path


HIDDEN = ("_runtime", "_timestamp", "_wandb")
"""Keys W&B adds to every history row and summary by itself."""

_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def offline_mode(tmp_path: Path, monkeypatch) -> Iterator[Path]:
    """For a fixture: W&B in offline mode writing under tmp_path/wandb (yielded), with none of
    the user's settings; its service process is stopped afterwards, so none outlives the test."""
    import wandb

    for name in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name, sub in (("WANDB_DIR", ""), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                      ("WANDB_DATA_DIR", "data")):  # fmt: skip
        monkeypatch.setenv(name, str(tmp_path / sub))
    wandb.teardown()  # a W&B setup from before holds the settings it read then
    yield tmp_path / "wandb"
    wandb.teardown()


def read_runs(folder: Path) -> list[dict]:
    """Every offline run under `folder` (WANDB_DIR/wandb), in the order they were started.

    Returns:
      [{"id", "project", "group", "name", "job_type", "config", "history", "summary"}], history
      a list of {key: value} rows with W&B's `_step`, without the keys in HIDDEN.
    """
    import wandb

    # A finished run's file is written by W&B's service process, after `finish` returns; stopping
    # the service (as a process's exit does) waits until it is complete.
    wandb.teardown()
    runs = []
    for path in sorted(folder.glob("offline-run-*/run-*.wandb")):
        run = {"history": [], "summary": {}, "config": {}}
        for record in _records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                r = record.run
                run.update(id=r.run_id, project=r.project, group=r.run_group, name=r.display_name,
                           job_type=r.job_type, start=(r.start_time.seconds, r.start_time.nanos))  # fmt: skip
                run["config"].update(_items(r.config.update))
            elif kind == "config":
                run["config"].update(_items(record.config.update))
            elif kind == "history":
                run["history"].append(_items(record.history.item))
            elif kind == "summary":
                run["summary"].update(_items(record.summary.update))
        run["config"].pop("_wandb", None)
        runs.append(run)
    return sorted(runs, key=lambda run: run.pop("start"))


def _items(items) -> dict:
    """{key: value}; a nested key (a logged dict, such as a video's) as nested dicts."""
    out = {}
    for item in items:
        *outer, last = [item.key] if item.key else list(item.nested_key)
        if not (outer or [last])[0].startswith(HIDDEN):
            inner = out
            for key in outer:
                inner = inner.setdefault(key, {})
            inner[last] = json.loads(item.value_json)
    return out


def _records(path: Path) -> list:
    """The protobuf records of a .wandb file: LevelDB's log format (32 KiB blocks of chunks, each
    with a 7-byte header: CRC, length, type) after W&B's own 7-byte header (':W&B', magic, version)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero-filled rest of a block
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (_FULL, _LAST):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
        else:
            assert kind in (_FIRST, _MIDDLE), kind
    assert not pending
    return records
