"""kl_rl: JAX reinforcement learning with KL divergence as the regularizer.

`kl_rl.run(algo, env, seeds=..., **hyperparameters)` trains from Python, `kl_rl.load(DIR)` reads
a run folder back; `kl_rl.train.make_train` gives the pure `train(key, config)` function to jit
and vmap yourself. docs/architecture.md maps the modules.
"""

__version__ = "0.1.0"

_LAZY = {"run": "runner", "resolve_config": "resolve", "RunResult": "runfolder", "load": "runfolder"}


def __getattr__(name: str):
    # Lazy, so `import kl_rl.kl` does not pull in the envs and agents.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"kl_rl.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'kl_rl' has no attribute {name!r}")
