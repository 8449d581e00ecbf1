"""kl_rl: JAX reinforcement learning with KL divergence as the regularizer.

`kl_rl.run(algo, env, seeds=..., **hyperparameters)` trains from Python; `kl_rl.train.make_train`
gives the pure `train(key, config)` function to jit and vmap yourself.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import kl_rl.kl` does not pull in the envs and agents.
    if name in ("run", "resolve_config", "RunResult"):
        from kl_rl import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'kl_rl' has no attribute {name!r}")
