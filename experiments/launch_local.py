"""Starts N local processes of one kl-rl command, joined on 127.0.0.1 (for testing, not clusters).

    python experiments/launch_local.py 2 train --algo ppo --env CartPole-v1 --seeds 4 --devices 1

Each process gets --coordinator 127.0.0.1:<a free port> --num-processes N --process-id I;
process 0's output is this script's, the others' goes to stderr only if they fail. When the
cores this script may use split evenly into N, process I is pinned to the I-th share (as
`srun --cpu-bind=cores` binds a cluster's tasks), so each sees only its own cores and the
processes' thread pools do not compete for them; `--no-pin` (first) leaves them unpinned. Exits with
the first non-zero exit code of the processes (0 when every one succeeded). A cluster uses its
launcher instead (srun, mpirun: see the README, "Several processes and hosts").
"""

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str]) -> int:
    pin = not (argv and argv[0] == "--no-pin")
    argv = argv if pin else argv[1:]
    if len(argv) < 2 or not argv[0].isdigit() or int(argv[0]) < 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    count, command = int(argv[0]), argv[1:]
    join = ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", str(count)]
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // count if pin and count > 1 and len(cores) % count == 0 else 0
    procs = []
    for index in range(count):
        args = [sys.executable, "-m", "kl_rl.cli", *command, *join, "--process-id", str(index)]
        quiet = {} if index == 0 else {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        own = set(cores[index * share : (index + 1) * share])
        bind = {"preexec_fn": lambda own=own: os.sched_setaffinity(0, own)} if share else {}
        procs.append(subprocess.Popen(args, **quiet, **bind))
    codes = []
    for index, proc in enumerate(procs):
        out = proc.communicate()[0]
        codes.append(proc.returncode)
        if proc.returncode and out:
            print(f"process {index}:\n{out.rstrip()}", file=sys.stderr)
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
