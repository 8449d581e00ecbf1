"""`kl-rl list`: the algos, JAX-ported envs, installed env families and presets."""

from kl_rl.errors import ConfigError


def main(argv: list[str]) -> int:
    """`kl-rl list`: prints the names each command accepts."""
    from kl_rl import envs
    from kl_rl.agents import ALGOS
    from kl_rl.presets import PRESETS

    if argv:
        raise ConfigError(f"kl-rl list takes no arguments, got {' '.join(argv)!r}")
    print("algos:   " + ", ".join(sorted(ALGOS)))
    ports = [e for e in envs.ENV_IDS if e not in envs.TASK_IDS]
    print("envs:    " + ", ".join(ports) + " (JAX ports); any other gymnasium id runs host-side")
    print("tasks:   " + ", ".join(envs.TASK_IDS) + " (verifiable token tasks, JAX)")
    installed = envs.installed_families()
    for name, family in envs.FAMILIES.items():
        if name in installed:
            ids = installed[name]
            print((name + ':').ljust(8) + ' ' + ", ".join(f"{name}/{i}" for i in ids))
        else:
            print((name + ':').ljust(8) + ' ' + f"not installed: pip install 'kl_rl[{family.extra}]'")
    print("presets: " + ", ".join(f"{a}/{e}" for a, e in sorted(PRESETS)))
    return 0
