"""kl_rl.distributed: several processes, one run.

The contract extends to processes: a seed's bits do not depend on how many processes run beside
it. Two processes of one device each, joined on 127.0.0.1, are checked bit for bit against one
process of two devices, for PPO and TRPO at 50+ updates and for a sweep.
"""

import json
import os
import shutil
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kl_rl import cli, distributed
from kl_rl.errors import ConfigError
from test_checkpoint import KILLER  # process 1 SIGKILLs itself from its progress report

TESTS = os.path.dirname(__file__)
ROOT = os.path.dirname(TESTS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    """The subprocesses' environment: this checkout first on the path (XLA_FLAGS, the fast
    compile of conftest.py, are inherited)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), **extra}


@pytest.mark.parametrize(
    "given, message",
    [
        (("127.0.0.1:1234", None, None), "missing {num_processes}, {process_id}"),
        ((None, 2, 0), "missing {coordinator}"),
        (("127.0.0.1:1234", 2, 2), "between 0 and {num_processes} - 1 = 1, got 2"),
        (("127.0.0.1:1234", 2, -1), "got -1"),
        (("127.0.0.1:1234", 0, 0), "{num_processes} must be a positive integer"),
        (("127.0.0.1", 2, 0), "HOST:PORT"),
        (("127.0.0.1:99999", 2, 0), "HOST:PORT"),
    ],
)
def test_the_three_join_settings_go_together_and_agree(given, message):
    with pytest.raises(ConfigError) as err:
        distributed.check(*given)
    assert message in err.value.template
    distributed.check(None, None, None)
    distributed.check("127.0.0.1:1234", 2, 1)


def test_bad_join_flags_are_one_line_and_exit_2_before_jax_starts(capsys):
    assert cli.main(["train", "--coordinator", "127.0.0.1:1234", "--process-id", "0"]) == 2
    bad_id = ["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"]
    assert cli.main(["sweep", *bad_id, "--grid", "lr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "kl-rl: error: --coordinator, --num-processes and --process-id go together: give all three "
        "(missing --num-processes), or none for one process",
        "kl-rl: error: --process-id must be between 0 and --num-processes - 1 = 1, got 2",
    ]


def test_only_a_step_of_several_tasks_joins_without_flags(monkeypatch):
    for name in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "SLURM_JOB_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # an salloc shell or an sbatch script: one process
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert not distributed.cluster_detected()
    assert not distributed.join()  # and so the run stays one process
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert not distributed.cluster_detected()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")  # srun -n 2
    assert distributed.cluster_detected()
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # mpirun -n 2
    assert distributed.cluster_detected()


BITS = """
import sys
import numpy as np
from kl_rl import distributed, parallel
index = int(sys.argv[1])
if index >= 0:
    distributed.join("127.0.0.1:" + sys.argv[2], 2, index, timeout_s=60)
    parallel.use_cpu_devices(1)
else:
    parallel.use_cpu_devices(2)
import jax
import kl_rl
from kl_rl import sweep
sys.path.insert(0, {tests!r})
from test_parallel import SMALL, _bits
out = {{"processes": np.array(jax.process_count()), "devices": np.array(len(jax.devices()))}}
for algo, small in SMALL.items():
    result = kl_rl.run(algo, "CartPole-v1", seeds=3, **small)
    out[algo + "_layout"] = np.array(result.devices)
    for seed in range(3):
        for i, x in enumerate(_bits(result, seed)):
            out[f"{{algo}}/{{seed}}/{{i}}"] = np.asarray(x)
grid = {{"lr": [3e-4, 1e-3], "clip_eps": [0.1, 0.3]}}
swept = sweep.run_sweep("ppo", "CartPole-v1", grid, seeds=2, overrides=SMALL["ppo"], chunk_size=1)
for name, x in swept.metrics.items():
    out["sweep/" + name] = x
out["sweep/eval_returns"] = swept.eval_returns
np.savez(sys.argv[3], **out)
"""


@pytest.mark.slow  # about 2 minutes on 2 loaded cores: three processes compile PPO, TRPO and a sweep
def test_two_processes_give_every_item_the_bits_of_one_process_on_two_devices(tmp_path):
    """PPO and TRPO (3 seeds: one process runs a padding copy) and a sweep chunked to 2 items."""
    script = tmp_path / "bits.py"
    script.write_text(BITS.format(tests=TESTS))
    port = str(_free_port())
    env = _env(KL_RL_CACHE_DIR="off")
    start = time.perf_counter()
    procs = []
    for i in (0, 1, -1):  # the two joined processes, and one process alone
        args = [sys.executable, str(script), str(i), port, str(tmp_path / f"p{i}.npz")]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    print(f"three processes in {time.perf_counter() - start:.1f}s")
    first, second, alone = (dict(np.load(tmp_path / f"p{i}.npz")) for i in (0, 1, -1))
    assert (first["processes"], first["devices"], alone["processes"], alone["devices"]) == (2, 2, 1, 2)
    assert first["ppo_layout"] == first["trpo_layout"] == alone["ppo_layout"] == 2
    assert first.keys() == second.keys() == alone.keys()
    assert first["ppo/0/0"].shape[-1] >= 50 and first["trpo/0/0"].shape[-1] >= 50  # updates
    for name in [n for n in first if "/" in n]:
        assert np.array_equal(first[name], alone[name], equal_nan=True), name
        assert np.array_equal(second[name], alone[name], equal_nan=True), name  # every process holds it all
    seed0, seed1 = ([first[n] for n in first if n.startswith(f"ppo/{s}/")] for s in (0, 1))
    assert not all(map(np.array_equal, seed0, seed1))  # seeds differ: not one run repeated
    assert not np.array_equal(first["sweep/entropy"][0], first["sweep/entropy"][3])


def _cli(args: list[str], env: dict[str, str], stderr: Path | None = None) -> subprocess.Popen:
    err = subprocess.PIPE if stderr is None else stderr.open("w")
    return subprocess.Popen([sys.executable, "-m", "kl_rl.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=err, text=True)  # fmt: skip


def test_a_process_that_never_sees_the_others_join_stops_with_one_line():
    port = _free_port()
    start = time.perf_counter()
    proc = _cli(["train", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0"],
                _env(KL_RL_JOIN_TIMEOUT_S="5"))  # fmt: skip
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 4
    assert time.perf_counter() - start < 30
    assert err.strip().splitlines()[-1] == (
        f"kl-rl: error: not all 2 processes joined at 127.0.0.1:{port} within 5 s; "
        "start every process of the run with the same --coordinator"
    )
    assert "Check failure" not in err  # JAX's own abort did not come first


# Slow since the checkpointed kill-and-resume test joined it (the default tier was over its 10 minutes);
# the default tier joins processes in the never-joined and host-path tests.
@pytest.mark.slow
def test_a_cli_run_of_two_processes_writes_one_folder_and_survives_a_killed_process(tmp_path):
    small = ["--algo", "ppo", "--seeds", "2", "--num-envs", "2", "--num-steps", "16", "--num-minibatches", "2",
             "--update-epochs", "2", "--devices", "1"]  # fmt: skip
    port = _free_port()
    env = _env(KL_RL_CACHE_DIR="off", KL_RL_JOIN_TIMEOUT_S="20")

    def pair(out, steps, port):
        join = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
        args = ["train", *small, "--total-steps", str(steps), "--out", str(out), *join]
        return [_cli([*args, "--process-id", str(i)], env, tmp_path / f"{out.name}{i}.err") for i in (0, 1)]

    # A whole run: process 0 writes the folder and prints; process 1 is silent.
    procs = pair(tmp_path / "run", 2 * 16 * 50, port)
    out0, out1 = (p.communicate(timeout=300)[0] for p in procs)
    err0, err1 = ((tmp_path / f"run{i}.err").read_text() for i in (0, 1))
    assert [p.returncode for p in procs] == [0, 0], err0[-2000:] + err1[-2000:]
    assert "final_return" in out0 and f"run folder: {tmp_path / 'run'}" in out0
    assert re.search(r"^joined 2 processes in \d+\.\ds$", out0, re.M), out0  # its wait, beside the wall time
    assert [line for line in out1.splitlines() if not line.startswith("[Gloo]")] == []
    assert "step/s" in err0 and err1 == ""  # the bar is process 0's alone
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoints", "config.json", "metrics.csv", "summary.json"]  # fmt: skip
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 50  # both seeds, each 50 updates

    # A run too long to finish here: process 1 is killed once process 0 has drawn its bar.
    procs = pair(tmp_path / "killed", 2 * 16 * 20_000, _free_port())
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and "step" not in (tmp_path / "killed0.err").read_text():
        time.sleep(0.5)
    procs[1].kill()
    killed = time.monotonic()
    procs[0].communicate(timeout=180)
    err0 = (tmp_path / "killed0.err").read_text()
    assert procs[0].returncode == 4, err0[-2000:]
    assert time.monotonic() - killed < 60
    # Found at the next gather (a segment of this run is a few seconds), or by the watch.
    last = err0.strip().splitlines()[-1]
    by_gather = last.startswith("kl-rl: error: process 0 of 2 lost contact with process 1 of the run (")
    by_watch = "kl-rl: error: process 0 of 2: process 1 of the run stopped answering; no run folder was written"
    assert (by_gather and last.endswith("); no run folder was written")) or last.endswith(by_watch), last
    assert not (tmp_path / "killed").exists()


@pytest.mark.slow  # the default tier kills a process in test_a_cli_run_of_two_processes_...
def test_a_process_killed_during_a_long_segment_is_named_within_a_third_of_the_timeout(tmp_path):
    """No gather comes for minutes: `distributed.watch` notices the silent process, before JAX
    ends the survivor with a stack dump at the timeout."""
    args = ["train", "--algo", "ppo", "--seeds", "2", "--num-envs", "2", "--num-steps", "16", "--devices", "1",
            "--total-steps", str(2 * 16 * 200_000), "--coordinator", f"127.0.0.1:{_free_port()}",
            "--num-processes", "2", "--out", str(tmp_path / "run")]  # fmt: skip
    env = _env(KL_RL_CACHE_DIR="off", KL_RL_JOIN_TIMEOUT_S="30")
    procs = [_cli([*args, "--process-id", str(i)], env, tmp_path / f"{i}.err") for i in (0, 1)]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and "step/s" not in (tmp_path / "0.err").read_text():
        time.sleep(0.5)
    procs[1].kill()
    killed = time.monotonic()
    procs[0].communicate(timeout=120)
    err0 = (tmp_path / "0.err").read_text()
    assert procs[0].returncode == 4, err0[-2000:]
    assert time.monotonic() - killed < 25  # a third of 30 s, and a second's beat, and a margin
    assert err0.rstrip().endswith(
        "kl-rl: error: process 0 of 2: process 1 of the run stopped answering; no run folder was written"
    )


def test_host_side_envs_are_refused_by_every_process(tmp_path):
    """The one thing that stays in one process: gymnasium's envs live in the Python process."""
    join = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2", "--out", str(tmp_path / "run")]
    args = ["train", "--algo", "ppo", "--env", "CartPole-v1", "--env-path", "host", "--devices", "1", *join]
    env = _env(KL_RL_CACHE_DIR="off", KL_RL_JOIN_TIMEOUT_S="60")
    procs = [_cli([*args, "--process-id", str(i)], env) for i in (0, 1)]
    for proc in procs:
        err = proc.communicate(timeout=120)[1]
        assert proc.returncode == 2, err[-2000:]
        assert err.strip().splitlines()[-1] == (
            "kl-rl: error: the host-side gymnasium envs run in one process; run them without joining other "
            "processes, or use a JAX port of the env (kl-rl list)"
        )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # six processes compile PPO: about a minute on 2 loaded cores
def test_a_checkpointed_run_of_two_processes_resumes_bit_identically_after_a_killed_process(tmp_path):
    """Process 0 writes the checkpoints of every item; after process 1 is killed, the survivor
    exits 4 naming it, and the run resumes bit-identically in 2 processes, or in 1."""
    small = ["--algo", "ppo", "--env", "CartPole-v1", "--seeds", "2", "--num-envs", "2", "--num-steps", "16",
             "--num-minibatches", "2", "--update-epochs", "2", "--total-steps", str(2 * 16 * 100),
             "--checkpoint-every", "20", "--no-progress"]  # fmt: skip
    env = _env(KL_RL_CACHE_DIR="off", KL_RL_JOIN_TIMEOUT_S="20")

    def cli_run(args):
        proc = _cli(args, env, tmp_path / "whole.err")
        proc.communicate(timeout=300)
        return proc.returncode

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert cli_run(["train", *small, "--devices", "2", "--out", str(whole)]) == 0, (tmp_path / "whole.err").read_text()

    join = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2", "--devices", "1"]
    first = _cli(["train", *small, *join, "--out", str(killed), "--process-id", "0"], env, tmp_path / "k0.err")
    second = subprocess.Popen(
        [sys.executable, "-c", KILLER.format(kill_at=2 * 32 * 50), "train", *small, *join, "--out", str(killed),
         "--process-id", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    second.wait(timeout=300)
    gone = time.monotonic()
    first.communicate(timeout=120)
    err0 = (tmp_path / "k0.err").read_text()
    assert (second.returncode, first.returncode) == (-9, 4), err0[-2000:]
    assert time.monotonic() - gone < 20
    resume = f"continue from its last checkpoint with kl-rl train --resume {killed} in every process"
    assert err0.rstrip().endswith(resume), err0[-2000:]
    saved = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < 100 and not (killed / "summary.json").exists(), saved

    alone = tmp_path / "alone"  # the same checkpoints, resumed by one process
    shutil.copytree(killed, alone)
    join = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2", "--devices", "1"]
    pair = [_cli(["train", "--resume", str(killed), "--no-progress", *join, "--process-id", str(i)], env,
                 tmp_path / f"r{i}.err") for i in (0, 1)]  # fmt: skip
    outs = [p.communicate(timeout=300)[0] for p in pair]
    assert [p.returncode for p in pair] == [0, 0], (tmp_path / "r0.err").read_text()[-2000:]
    assert f"from update {max(saved)} of 100" in outs[0]
    assert cli_run(["train", "--resume", str(alone), "--no-progress", "--devices", "1"]) == 0
    for run in (killed, alone):
        assert (run / "metrics.csv").read_text() == (whole / "metrics.csv").read_text()
        a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, run))
        assert a["final_return"] == b["final_return"]


@pytest.mark.slow  # three processes tune PPO: about a minute on 2 loaded cores
def test_a_tune_of_two_processes_is_the_tune_of_one_process_on_two_devices(tmp_path):
    """Process 0 holds the study and decides; both train each batch's (trial, seed) items. The
    study's trials (params, values, pruned or not) are those of one process with both devices."""
    args = ["tune", "--algo", "ppo", "--env", "CartPole-v1", "--space", "lr=log:1e-4:1e-2", "clip_eps=0.1:0.3",
            "--trials", "4", "--batch-size", "2", "--seeds", "2", "--rungs", "2", "--startup-trials", "1",
            "--sampler-seed", "3", "--num-envs", "2", "--num-steps", "16", "--num-minibatches", "2",
            "--update-epochs", "2", "--total-steps", str(16 * 2 * 40), "--no-progress"]  # fmt: skip
    env = _env(KL_RL_CACHE_DIR="off", KL_RL_JOIN_TIMEOUT_S="60")
    join = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2", "--devices", "1"]
    storage = f"journal:{tmp_path / 'two.log'}"
    procs = [_cli([*args, *join, "--storage", storage, "--out", str(tmp_path / "two"), "--process-id", str(i)], env,
                  tmp_path / f"t{i}.err") for i in (0, 1)]  # fmt: skip
    procs.append(_cli([*args, "--devices", "2", "--storage", f"journal:{tmp_path / 'one.log'}",
                       "--out", str(tmp_path / "one")], env, tmp_path / "one.err"))  # fmt: skip
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, name in zip(procs, ("t0", "t1", "one"), strict=True):
        assert p.returncode == 0, (tmp_path / f"{name}.err").read_text()[-2000:]
    assert "tune folder" in outs[0] and [line for line in outs[1].splitlines() if not line.startswith("[Gloo]")] == []
    assert (tmp_path / "two.log").read_text() != ""  # process 0 wrote the study
    two, one = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("two", "one"))
    assert two["study_trials"] == one["study_trials"] and sum(one["study_trials"].values()) == 4
    assert "PRUNED" in one["study_trials"], one["study_trials"]  # process 0's pruner decided for both
    assert two["best"] == one["best"]
    assert (tmp_path / "two" / "metrics.csv").read_text() == (tmp_path / "one" / "metrics.csv").read_text()
