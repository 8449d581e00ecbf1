"""Cold and warm compile of the README command for each way of caching programs, in fresh processes.

    PYTHONPATH=$PWD python experiments/warm_compile.py --reps 3 --sweep-reps 2 --crash-checks

The README command is `kl-rl train --algo ppo --env CartPole-v1 --seeds 4`. Each repetition runs
every mode in turn (the order rotates) on a cache folder of its own: once with the folder empty
(cold), then again (warm). Modes:

- `persistent`: JAX's persistent compilation cache alone (KL_RL_PROGRAM_CACHE=0): a warm command
  skips XLA's compilation but still traces and lowers every program (kl_rl's default before the
  export cache).
- `export`: kl_rl's default: each program also kept lowered (`jax.export`); a warm command loads
  it and JAX's persistent cache supplies the executable.
- `export-lapack` (a probe, not a setting): `export` without kl_rl's skipping of JAX's LAPACK
  setup (`kl_rl.parallel._skip_lapack_setup`). Lowering a call of an exported program on CPU
  makes JAX load LAPACK's kernels from scipy (an import of scipy.linalg) even for a program
  with no LAPACK call, as kl_rl's are: this mode shows what that costs.
- `executable`: the former opt-in cache of XLA executables (KL_RL_PROGRAM_CACHE=1 in kl_rl at
  `--executable-rev`, whose kl_rl/ is unpacked with `git archive`).

Each command is timed whole (`wall`: process start to exit, imports included); `compile` is its
summary.json's compile_time_s. Every run's metrics.csv (every metric and evaluation return of
every seed) is hashed, so the table also says whether every mode and both temperatures gave the
same bits. `--sweep-reps` times a small `kl-rl sweep` (2x2 grid, 2 seeds, 20k steps) the same way.
`--crash-checks` runs, for the export and executable caches, the commands that crashed the
executable cache (VPG; PPO with --policy-lag 2; PPO with --replay-rollouts 2): once with JAX's
cache alone, to warm it as earlier runs would have, then twice with the cache; the second must
run. Prints one JSON line per command, then the tables (medians over the repetitions, min-max in
brackets).
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ["train", "--algo", "ppo", "--env", "CartPole-v1", "--seeds", "4"]
SWEEP = ["sweep", "--algo", "ppo", "--env", "CartPole-v1", "--grid", "lr=3e-4,1e-3", "clip_eps=0.1,0.2",
         "--seeds", "2", "--total-steps", "20000"]  # fmt: skip
CRASH_CASES = {
    "vpg": ["train", "--algo", "vpg", "--env", "CartPole-v1", "--seeds", "4"],
    "ppo --policy-lag 2": [*README, "--policy-lag", "2"],
    "ppo --replay-rollouts 2": [*README, "--replay-rollouts", "2"],
}
MODES = ("persistent", "export", "export-lapack", "executable")
CLI = "import sys; from kl_rl.cli import main; sys.argv[0] = 'kl-rl'; sys.exit(main())"
WITH_LAPACK = "from kl_rl import parallel; parallel._skip_lapack_setup = lambda: None; " + CLI


def sources(executable_rev: str, tmp: Path) -> dict[str, tuple[Path, str | None]]:
    """Each mode's kl_rl (a folder to put first on PYTHONPATH) and its KL_RL_PROGRAM_CACHE.

    This checkout's kl_rl is copied as it is now, so that editing it while this runs changes
    neither what is measured nor the cache keys (they hash kl_rl's source).
    """
    new = tmp / "src"
    shutil.copytree(ROOT / "kl_rl", new / "kl_rl", ignore=shutil.ignore_patterns("__pycache__"))
    old = tmp / "executable-src"
    old.mkdir()
    git = ["git", "-C", str(ROOT), "archive", executable_rev, "kl_rl"]
    archive = subprocess.run(git, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    return {
        "persistent": (new, "0"),
        "export": (new, None),
        "export-lapack": (new, None),
        "executable": (old, "1"),
    }


def command(mode: str, src: Path, cache: str | None, args: list[str], out: Path, tmp: Path) -> dict:
    """Runs `kl-rl ARGS --out OUT` in a fresh process; its times, exit status and result digest."""
    env = {k: v for k, v in os.environ.items() if k not in ("KL_RL_PROGRAM_CACHE", "KL_RL_CACHE_DIR")}
    env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["KL_RL_CACHE_DIR"] = str(tmp / f"cache-{mode}")
    if cache is not None:
        env["KL_RL_PROGRAM_CACHE"] = cache
    tmp.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    code = WITH_LAPACK if mode == "export-lapack" else CLI
    proc = subprocess.run([sys.executable, "-c", code, *args, "--out", str(out)], env=env, cwd=tmp,
                          capture_output=True, text=True, check=False)  # fmt: skip
    wall = time.perf_counter() - start
    row = {"mode": mode, "rc": proc.returncode, "wall_s": round(wall, 3)}
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip().splitlines()[-1][-300:] if proc.stderr.strip() else "?"
        return row
    summary = json.loads((out / "summary.json").read_text())
    if "programs" in summary:  # a sweep
        row["compile_s"] = round(sum(p["compile_time_s"] for p in summary["programs"]), 3)
    else:
        row["compile_s"] = round(summary["compile_time_s"], 3)
        row["cached"] = summary["compiled_from_cache"]
    row["digest"] = hashlib.sha256((out / "metrics.csv").read_bytes()).hexdigest()[:16]
    return row


def cold_and_warm(reps: int, args: list[str], modes: dict, tmp: Path, label: str) -> list[dict]:
    rows = []
    for rep in range(reps):
        order = list(modes)[rep % len(modes) :] + list(modes)[: rep % len(modes)]
        for mode in order:
            src, cache = modes[mode]
            folder = tmp / f"{label}-{rep}-{mode}"
            for temperature in ("cold", "warm"):
                row = command(mode, src, cache, args, folder / temperature, folder)
                row.update(rep=rep, temperature=temperature, command=label)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def table(rows: list[dict], label: str) -> None:
    """Medians (min-max) per mode and temperature; the warm compile against `persistent`'s, per rep."""

    def cell(values):
        if not values:
            return "-"
        return f"{statistics.median(values):6.2f} [{min(values):.2f}-{max(values):.2f}]"

    rows = [r for r in rows if r["command"] == label]
    reps = len({r["rep"] for r in rows})
    print(f"\n{label}: {reps} repetition(s), fresh process each; seconds, median [min-max]")
    heads = ("cold compile", "warm compile", "cold wall", "warm wall")
    print(f"{'mode':<14} " + " ".join(f"{h:>20}" for h in heads) + "  warm compile / persistent's")
    digests = {r.get("digest") for r in rows}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        cells = []
        for temperature in ("cold", "warm"):
            got = [r for r in rows if r["mode"] == mode and r["temperature"] == temperature and r["rc"] == 0]
            cells.append(([r["compile_s"] for r in got], [r["wall_s"] for r in got]))
        ratios = []
        for rep in range(reps):
            pair = [r for r in rows if r["rep"] == rep and r["temperature"] == "warm" and r["rc"] == 0
                    and r["mode"] in (mode, "persistent")]  # fmt: skip
            by_mode = {r["mode"]: r["compile_s"] for r in pair}
            if mode in by_mode and "persistent" in by_mode:
                ratios.append(by_mode[mode] / by_mode["persistent"])
        failed = sum(r["rc"] != 0 for r in rows if r["mode"] == mode)
        print(f"{mode:<14} {cell(cells[0][0]):>20} {cell(cells[1][0]):>20} {cell(cells[0][1]):>20} "
              f"{cell(cells[1][1]):>20}  {statistics.median(ratios) if ratios else float('nan'):.2f}"
              f"{f'   {failed} FAILED' if failed else ''}")  # fmt: skip
    print(f"same bits in every run: {len(digests) == 1 and None not in digests} ({len(digests)} digest(s))")


def crash_checks(modes: dict, tmp: Path) -> None:
    """Each case: JAX's cache warmed by a plain run, then the mode twice; the second must run."""
    print()
    for case, args in CRASH_CASES.items():
        results = []
        for mode, (src, cache) in modes.items():
            if mode not in ("export", "executable"):
                continue
            folder = tmp / f"crash-{case.replace(' ', '_')}-{mode}"
            runs = [command(mode, src, "0" if cache is None else None, args, folder / "prime", folder)]
            runs += [command(mode, src, cache, args, folder / f"run{i}", folder) for i in (1, 2)]
            for i, row in enumerate(runs):
                print(json.dumps({"case": case, "run": ["prime", "first", "second"][i], **row}), flush=True)
            same = len({r.get("digest") for r in runs}) == 1
            ok = all(r["rc"] == 0 for r in runs)
            results.append(f"{mode}: {'ran' if ok else 'FAILED: ' + next(r['error'] for r in runs if r['rc'])}"
                           f"{', same bits' if ok and same else ''}")  # fmt: skip
        print(f"crash check {case}: " + "; ".join(results), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of cold and warm, per mode")
    parser.add_argument("--modes", default=",".join(MODES), help=f"some of {','.join(MODES)}")
    parser.add_argument("--executable-rev", default="5a69229", help="a kl_rl revision with the executable cache")
    parser.add_argument("--sweep-reps", type=int, default=0, help="repetitions of the small sweep")
    parser.add_argument("--crash-checks", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="warm-compile-") as name:
        tmp = Path(name)
        every = sources(args.executable_rev, tmp)
        modes = {m: every[m] for m in args.modes.split(",")}
        rows = cold_and_warm(args.reps, README, modes, tmp, "train")
        if args.sweep_reps:
            sweep_modes = {m: src for m, src in modes.items() if m != "export-lapack"}
            rows += cold_and_warm(args.sweep_reps, SWEEP, sweep_modes, tmp, "sweep")
        if args.crash_checks:
            crash_checks(modes, tmp)
        for label in dict.fromkeys(r["command"] for r in rows):
            table(rows, label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
