"""A run's sources: the finished runs it draws on, besides its own config and seeds.

- `reference`: a run folder whose final policy is the frozen reference a KL penalty pulls toward
  (kickstarting, RLHF's penalty; the anchor itself lives in `kl_rl.reference`);
- `init_from`: a run folder whose parameters and normalizers the run starts from (fine-tuning).

`resolve_sources` loads and checks them once per command; `RunSources.setup` gives each item (a
seed, a grid point's seed, a trial's seed) its part. A run folder records each source's folder,
update and the sha256 of its parameters, so a resumed run can tell whether it changed.
"""

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from kl_rl import config as config_lib
from kl_rl import envs
from kl_rl.agents import SEQUENCE_ALGOS, algo_spec
from kl_rl.errors import ConfigError
from kl_rl.runfolder import LoadedRun, load, ref_spec_from_record
from kl_rl.reference import RefSpec, Reference
from kl_rl.train import Setup, StartFrom


@dataclasses.dataclass
class RunSources:
    """A run's frozen reference policy and the run it starts from (`reference`, `init_from`).

    Resolved once per command by `resolve_sources`; `setup` gives each item (a seed, or a grid
    point's seed) its reference and starting parameters: the source run's seed `s mod n` for
    item seed s, or `reference_seed`.
    """

    reference: RefSpec | None = None
    """The reference policy's network, or None."""
    records: dict[str, Any] = dataclasses.field(default_factory=dict)
    """{"reference": ..., "init_from": ...}: the source run folder, its update, the seeds used and
    the sha256 of its parameters, as config.json, summary.json and the checkpoints keep them."""
    _reference_run: LoadedRun | None = None
    _start_run: LoadedRun | None = None
    _reference_seed: int | None = None

    @property
    def cache_key(self) -> tuple:
        """What the sources change in the compiled programs: the reference's network, and
        whether init takes starting parameters."""
        ref = None if self.reference is None else (self.reference.algo, config_lib.to_dict(self.reference.config))
        return (json.dumps(ref, sort_keys=True, default=str), "init_from" in self.records)

    def setup(self, item_seeds: list[int]) -> Setup | None:
        """init's per-item Setup (leading items axis), or None when the run has no sources.

        A resumed run does not call this: its reference is in its checkpoint.
        """
        if self.reference is None and "init_from" not in self.records:
            return None
        reference = start = None
        if self.reference is not None:
            loaded = self._reference_run or _reload(self.records["reference"], "reference")
            picks = [self._reference_seed if self._reference_seed is not None else loaded.seeds[s % len(loaded.seeds)]
                     for s in item_seeds]  # fmt: skip
            rows = np.asarray([loaded.seeds.index(p) for p in picks])
            reference = Reference(
                agent=jax.tree.map(lambda x: x[rows], loaded.state.agent),
                obs_norm=jax.tree.map(lambda x: x[rows], loaded.state.collector.obs_norm),
            )
        if "init_from" in self.records:
            loaded = self._start_run or _reload(self.records["init_from"], "init_from")
            rows = np.asarray([s % len(loaded.seeds) for s in item_seeds])
            collector = loaded.state.collector
            start = StartFrom(
                params=jax.tree.map(lambda x: x[rows], loaded.state.agent.params),
                obs_norm=jax.tree.map(lambda x: x[rows], collector.obs_norm),
                reward_norm=jax.tree.map(lambda x: x[rows], collector.reward_norm),
            )
        return Setup(reference=reference, start=start)


def params_sha256(tree: Any) -> str:
    """sha256 of a pytree's arrays (dtype, shape and bytes, leaf by leaf): a run's identity."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        array = np.asarray(leaf)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _source_record(loaded: LoadedRun, run_dir: Any, tree: Any) -> dict[str, Any]:
    return {
        "run": str(Path(run_dir).absolute()),
        "update": loaded.update,
        "algo": loaded.algo,
        "seeds": loaded.seeds,
        "params_sha256": params_sha256(tree),
    }


def _load_source(run_dir: Any, field: str, env: str, env_path: str) -> LoadedRun:
    """A finished run of `env` to draw on, or a ConfigError naming the option (`field`) and the fix."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"{{{field}}} {str(path)!r} does not exist; give the folder of a kl-rl train run", field)
    loaded = load(path)
    if loaded.env_id != env:
        raise ConfigError(
            f"{{{field}}} {str(path)!r} is a run on {loaded.env_id}, not {env}; give a run of {env}", field
        )
    ours = envs.make(env, env_path)
    if getattr(loaded.config, "images", False):
        ours = envs.with_images(ours, env)  # a conv net's run sees the images unflattened
    theirs = loaded.trainer.vec_env
    if theirs.observation_space != ours.observation_space or theirs.action_space != ours.action_space:
        raise ConfigError(
            f"{{{field}}} {str(path)!r} acts on other spaces ({theirs.observation_space}, {theirs.action_space}) "
            f"than {env} here ({ours.observation_space}, {ours.action_space}); give a run of the same env",
            field,
        )
    return loaded


def _reload(record: dict[str, Any], field: str) -> LoadedRun:
    """The run a record names, checked to be the one the record was made from."""
    loaded = load(record["run"], record["update"]) if Path(record["run"]).is_dir() else None
    tree = None if loaded is None else _source_tree(loaded, field)
    if loaded is None or params_sha256(tree) != record["params_sha256"]:
        raise ConfigError(
            f"{{{field}}} {record['run']!r} is gone or has changed since this run began (its parameters' sha256 "
            "differs); restore that run folder, or start a new run",
            field,
        )
    return loaded


def _source_tree(loaded: LoadedRun, field: str) -> Any:
    """What a reference (policy and normalizer) or a starting run (parameters and normalizers) takes."""
    collector = loaded.state.collector
    if field == "reference":
        return (loaded.state.agent, collector.obs_norm)
    return (loaded.state.agent.params, collector.obs_norm, collector.reward_norm)


def resolve_sources(
    algo: str,
    env: str,
    config: Any,
    reference: str | os.PathLike | dict | None = None,
    reference_seed: int | None = None,
    init_from: str | os.PathLike | dict | None = None,
    env_path: str = "auto",
) -> RunSources:
    """Loads and checks a run's reference policy and starting parameters.

    Args:
      algo, env, config: the run's.
      reference: a run folder of the same env whose final policy is the frozen reference; or
        the record a run folder keeps of it (resuming), which is reloaded only if needed.
      reference_seed: the reference run's seed every item uses; default: item seed s uses the
        reference's seed s mod n.
      init_from: a run folder of the same env and policy network whose parameters and
        normalizers the run starts from (item seed s takes its seed s mod n); or its record.

    Raises:
      ConfigError: a missing folder, another env or spaces, a reference option without
        `reference`, an algo with no use for a reference, networks that do not match.
    """
    sources = RunSources(_reference_seed=reference_seed)
    spec = algo_spec(algo)
    fields = {f.name for f in dataclasses.fields(spec.config)}
    if reference is None:
        if algo == "dpo":
            raise ConfigError(
                "online DPO needs {reference} RUN_DIR: its implicit reward is beta log(pi / pi_ref)", "reference"
            )
        if reference_seed is not None:
            raise ConfigError("{reference_seed} needs {reference} RUN_DIR", "reference_seed", "reference")
        used = config.uses_reference_options() if hasattr(config, "uses_reference_options") else []
        if used:
            names = ", ".join("{" + n + "}" for n in used)
            raise ConfigError(
                f"{names} set a penalty toward a reference policy; give it with {{reference}} RUN_DIR",
                *used,
                "reference",
            )
    else:
        if "ref_kl_coef" not in fields or algo == "sft":
            raise ConfigError(
                f"{{algo}} {algo} has no KL penalty toward a reference; use ppo, vpg, trpo, cem, grpo, rloo, ppo-lm "
                "or dpo",
                "algo",
            )
        if isinstance(reference, dict):
            record = reference
            sources.reference = ref_spec_from_record(record)
            sources._reference_seed = record.get("reference_seed")
        else:
            loaded = _load_source(reference, "reference", env, env_path)
            if reference_seed is not None and reference_seed not in loaded.seeds:
                raise ConfigError(
                    f"{{reference_seed}} {reference_seed} is not a seed of {str(reference)!r} (it has {loaded.seeds})",
                    "reference_seed",
                )
            record = _source_record(loaded, reference, _source_tree(loaded, "reference"))
            record.update(reference_seed=reference_seed, config=config_lib.to_dict(loaded.config))
            sources.reference = RefSpec(loaded.algo, loaded.config)
            sources._reference_run = loaded
            if config.rollout.init_from_reference:
                _check_policy_start(algo, config, loaded, reference)
        sources.records["reference"] = record
    if init_from is not None:
        if isinstance(init_from, dict):
            sources.records["init_from"] = init_from
        else:
            loaded = _load_source(init_from, "init_from", env, env_path)
            _check_start(algo, config, loaded, init_from)
            sources.records["init_from"] = _source_record(loaded, init_from, _source_tree(loaded, "init_from"))
            sources._start_run = loaded
    return sources


def _check_policy_start(algo: str, config: Any, loaded: LoadedRun, run_dir: Any) -> None:
    """ConfigError unless a token-task agent can start from the reference's policy (same shapes)."""
    vec = loaded.trainer.vec_env
    target = jax.eval_shape(algo_spec(algo).make(config, vec.observation_space, vec.action_space).init,
                            jax.random.key(0))  # fmt: skip
    source = getattr(loaded.state.agent, "params", {})
    mine = jax.tree.map(lambda x: x.shape, target.params["policy"])
    if "policy" not in source or jax.tree.map(lambda x: x.shape[1:], source["policy"]) != mine:
        c = loaded.config
        raise ConfigError(
            f"{{reference}} {str(run_dir)!r} has another policy network (layers {getattr(c, 'layers', '-')}, width "
            f"{getattr(c, 'width', '-')}, heads {getattr(c, 'heads', '-')}); "
            "give the same {layers}/{width}/{heads} "
            "or {init_from_reference} false",
            "reference",
            "layers",
            "width",
            "heads",
            "init_from_reference",
        )


def _check_start(algo: str, config: Any, loaded: LoadedRun, run_dir: Any) -> None:
    """ConfigError unless the run `loaded` has parameters of the shapes this run's agent has."""
    vec = loaded.trainer.vec_env
    target = jax.eval_shape(algo_spec(algo).make(config, vec.observation_space, vec.action_space).init,
                            jax.random.key(0))  # fmt: skip
    source = loaded.state.agent
    if not hasattr(target, "params") or not hasattr(source, "params"):
        raise ConfigError(
            f"{{init_from}} copies an actor-critic's parameters; {algo} from a {loaded.algo} run cannot "
            "(use ppo, vpg or trpo for both)",
            "init_from",
        )
    shapes = jax.tree.map(lambda x: x.shape, target.params)
    theirs = jax.tree.map(lambda x: x.shape[1:], source.params)
    if shapes != theirs and algo in SEQUENCE_ALGOS:
        c = loaded.config
        raise ConfigError(
            f"{{init_from}} {str(run_dir)!r} has another transformer (layers {c.layers}, width {c.width}, heads "
            f"{c.heads}); give the same {{layers}}/{{width}}/{{heads}}",
            "init_from", "layers", "width", "heads",
        )  # fmt: skip
    if shapes != theirs:
        raise ConfigError(
            f"{{init_from}} {str(run_dir)!r} has networks of other shapes (hidden sizes "
            f"{tuple(loaded.config.hidden_sizes)}, this run {tuple(config.hidden_sizes)}); "
            "give the same {hidden_sizes}",
            "init_from",
            "hidden_sizes",
        )
    if (loaded.config.activation, loaded.config.distribution) != (config.activation, config.distribution):
        raise ConfigError(
            f"{{init_from}} {str(run_dir)!r} has {loaded.config.activation} networks with a "
            f"{loaded.config.distribution} policy; give {{activation}} {loaded.config.activation} "
            f"{{distribution}} {loaded.config.distribution}",
            "init_from",
            "activation",
            "distribution",
        )
    if bool(loaded.config.normalize_obs) != bool(config.normalize_obs):
        raise ConfigError(
            f"{{init_from}} {str(run_dir)!r} was trained with normalize_obs={loaded.config.normalize_obs}; "
            f"its parameters expect that input, so give {{normalize_obs}} {loaded.config.normalize_obs}",
            "init_from",
            "normalize_obs",
        )
