"""The one progress bar of `kl-rl train`, `sweep` and `tune`: env steps summed over every item.

The library reports progress through a callback, `progress(env_steps_done, env_steps_total)`;
`Bar` is that callback, drawn with tqdm. It opens at the first report, which comes once the
programs are compiled, so its clock and rate cover training only. Log lines go above it.

    >>> bar = Bar("ppo CartPole-v1")
    >>> kl_rl.run("ppo", "CartPole-v1", seeds=4, progress=bar); bar.close()
"""

from typing import Any


class Bar:
    """A tqdm bar of env steps, called as `bar(done, total)`; `enabled=False` draws nothing."""

    def __init__(self, desc: str, enabled: bool = True):
        self.desc = desc
        self.enabled = enabled
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            import jax
            from tqdm.auto import tqdm

            if jax.process_index() != 0:  # of several processes, process 0 alone draws the bar
                self.enabled = False
                return

            self._bar = tqdm(total=total, initial=done, unit="step", unit_scale=True, desc=self.desc)
            return
        if self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def log(self, line: str) -> None:
        """Prints `line` above the bar instead of through it."""
        if self._bar is not None:
            self._bar.clear()
        print(line, flush=True)
        if self._bar is not None:
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
