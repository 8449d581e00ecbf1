"""Config machinery: static vs traced fields, docstrings, parsing, presets."""

import dataclasses
import math

import jax
import pytest

import kl_rl
from kl_rl import config as config_lib
from kl_rl.agents import ALGOS, PPOConfig
from kl_rl.errors import ConfigError
from kl_rl.presets import PRESETS


def test_traced_fields_are_leaves_and_static_fields_are_structure():
    config = PPOConfig()
    leaves = jax.tree.leaves(config)
    traced = [f.name for f in dataclasses.fields(PPOConfig) if not config_lib.is_static(PPOConfig, f.name)]
    # Every traced field is one leaf, but env_params: a dict with one leaf per env param (none by default).
    assert len(leaves) == len(traced) - 1
    with_params = config.replace(env_params={"gravity": 9.8, "tau": 0.02})
    assert len(jax.tree.leaves(with_params)) == len(traced) + 1
    # The env params' names are structure and their values leaves: a sweep over values is one program.
    assert jax.tree.structure(with_params) == jax.tree.structure(
        with_params.replace(env_params={"gravity": 20.0, "tau": 0.01})
    )
    assert jax.tree.structure(with_params) != jax.tree.structure(config)
    for name in ("lr", "clip_eps", "gamma", "gae_lambda", "ent_coef", "vf_coef", "target_kl", "kl_coef"):
        assert name in traced
    for name in ("num_envs", "num_steps", "hidden_sizes", "update_epochs", "num_minibatches", "total_steps"):
        assert config_lib.is_static(PPOConfig, name)
    # Changing a traced value keeps the treedef, so a jitted train does not recompile.
    assert jax.tree.structure(config) == jax.tree.structure(config.replace(lr=1.0))
    assert jax.tree.structure(config) != jax.tree.structure(config.replace(num_envs=8))


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_every_field_has_a_docstring(algo):
    cls = ALGOS[algo].config
    docs = config_lib.field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert missing == []


def test_parse_values_by_type():
    assert config_lib.parse_value("n", "1e5", int) == 100_000
    assert config_lib.parse_value("lr", "3e-4", float) == pytest.approx(3e-4)
    assert config_lib.parse_value("b", "false", bool) is False
    assert config_lib.parse_value("h", "64,32", tuple[int, ...]) == (64, 32)
    assert config_lib.parse_value("h", [16], tuple[int, ...]) == (16,)
    for text, typ in (("1.5", int), ("abc", float), ("nan", float), ("maybe", bool), (True, int)):
        with pytest.raises(ConfigError):
            config_lib.parse_value("x", text, typ)


@pytest.mark.parametrize(
    "value", ["inf", "-inf", "nan", "NaN", "Infinity", "-INFINITY", " +inf ", math.inf, -math.inf, math.nan]
)
def test_non_finite_floats_are_config_errors_naming_the_field(value):
    with pytest.raises(ConfigError, match=r"^ent_coef must be a finite number, got "):
        config_lib.parse_value("ent_coef", value, float)
    with pytest.raises(ConfigError, match=r"^ent_coef must be a finite number, got "):
        config_lib.build(PPOConfig, {"ent-coef": value})


@pytest.mark.parametrize(
    "name, text",
    [
        ("c.yaml", "ent_coef: .inf\n"),
        ("c.yaml", "ent_coef: -.Inf\n"),
        ("c.yaml", "ent_coef: .nan\n"),
        ("c.toml", "ent_coef = inf\n"),
        ("c.toml", "ent_coef = -nan\n"),
        ("c.json", '{"ent_coef": Infinity}'),
    ],
)
def test_non_finite_values_in_config_files_are_config_errors(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"^ent_coef must be a finite number"):
        config_lib.build(PPOConfig, config_lib.load_file(path))


def test_run_refuses_a_non_finite_override_before_compiling():
    with pytest.raises(ConfigError, match=r"^lr must be a finite number, got inf$"):
        kl_rl.run("ppo", "CartPole-v1", lr=float("inf"))


def test_build_rejects_unknown_names_with_a_hint():
    with pytest.raises(ConfigError, match="unknown hyperparameter 'clip'"):
        config_lib.build(PPOConfig, {"clip": "0.1"})
    assert config_lib.build(PPOConfig, {"clip-eps": "0.1"}).clip_eps == pytest.approx(0.1)


@pytest.mark.parametrize("key", sorted(PRESETS))
def test_presets_name_real_fields_and_validate(key):
    from kl_rl import envs

    algo, env_id = key
    config = config_lib.build(ALGOS[algo].config, PRESETS[key])
    config.validate(envs.make(env_id).action_space)
