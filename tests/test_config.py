"""The config front end: precedence, strictness and error messages users rely on."""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml

from rat.config import ConfigError, config_to_dict, dump_config
from rat.train.spec import TrainSpec, make_train_config, threat_models

REPO = Path(__file__).resolve().parents[1]


def _yaml(tmp_path: Path, content: dict, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(content))
    return str(path)


def test_defaults_then_yaml_then_cli(tmp_path):
    assert make_train_config([])["training.epochs"] == 1
    first = _yaml(tmp_path, {"training": {"epochs": 3, "batch_size": 8}, "adv": {"attack": "apgd"}}, "a.yaml")
    second = _yaml(tmp_path, {"training": {"epochs": 4}}, "b.yaml")
    config = make_train_config(["-C", first, "--config-file", second, "--adv.attack", "fgsm"])
    assert config["training.epochs"] == 4  # the later file wins
    assert config["training.batch_size"] == 8  # kept from the first file
    assert config["adv.attack"] == "fgsm"  # the flag wins over both files
    assert make_train_config(["-C", first, "--training.epochs", "7"])["training.epochs"] == 7


def test_dotted_keys_in_yaml_are_accepted(tmp_path):
    config = make_train_config(["-C", _yaml(tmp_path, {"lr": {"lr": 0.5}, "adv.norm": "L2"})])
    assert config["lr.lr"] == 0.5 and config["adv.norm"] == "L2"


def test_unknown_yaml_key_is_rejected_with_its_name(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'training\.epoch'.*did you mean 'training\.epochs'"):
        make_train_config(["-C", _yaml(tmp_path, {"training": {"epoch": 3}})])
    with pytest.raises(ConfigError, match=r"unknown key 'nosuchsection\.x'"):
        make_train_config(["-C", _yaml(tmp_path, {"nosuchsection": {"x": 1}})])


def test_binary_config_file_is_refused_by_name(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match=r"config file .*model\.pt is not a text file"):
        make_train_config(["-C", str(path)])


def test_unknown_flag_is_rejected():
    with pytest.raises(SystemExit) as excinfo:
        make_train_config(["--training.epoch", "3"])
    assert excinfo.value.code == 2


@pytest.mark.parametrize(("argv", "message"), [
    (["--training.epochs", "1.5"], "training.epochs='1.5' is not an int"),
    (["--training.epochs", "0"], "training.epochs"),
    (["--ema.enabled", "true"], "ema.enabled='true' is not 0 or 1"),
    (["--adv.attack", "cw"], "adv.attack='cw'"),
    (["--adv.norm", "Linf,L3"], "adv.norm='Linf,L3'"),
    (["--adv.eps", "-1"], "adv.eps='-1' is not comma-separated numbers > 0"),
    (["--adv.n_iter", "0"], "adv.n_iter='0' is not comma-separated ints >= 1"),
    (["--training.precision", "fp8"], "training.precision"),
    (["--adv.norm", "Linf,L1", "--adv.n_iter", "1,2,3"], "adv.n_iter has 3 values for 2 norms"),
    (["--adv.norm", "Linf,L1", "--adv.eps", "0.0157"], "adv.eps gives one radius for the norms Linf,L1"),
    (["--resolution.min_res", "256", "--resolution.max_res", "224"], "min_res must not exceed"),
])
def test_bad_values_name_the_parameter(argv, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        make_train_config(argv)


def test_flag_zero_means_off(tmp_path):
    """fastargs' bool turns "0" into True; rat's 0/1 flags must not."""
    assert make_train_config(["--ema.enabled", "0"])["ema.enabled"] == 0
    assert make_train_config(["-C", _yaml(tmp_path, {"ema": {"enabled": 1}})])["ema.enabled"] == 1


def test_environment_variables_are_not_read(monkeypatch):
    monkeypatch.setenv("training.epochs", "9")
    assert make_train_config([])["training.epochs"] == 1


def test_dumped_config_reloads_identically(tmp_path):
    config = make_train_config(["--adv.attack", "apgd", "--adv.norm", "Linf,L1", "--training.epochs", "3"])
    dump_config(config_to_dict(config), tmp_path / "params.json")
    reloaded = make_train_config(["-C", str(tmp_path / "params.json")])
    assert config_to_dict(reloaded) == config_to_dict(config)
    assert json.loads((tmp_path / "params.json").read_text())["adv"]["norm"] == "Linf,L1"


def test_configs_are_isolated():
    make_train_config(["--training.epochs", "5"])
    assert make_train_config([])["training.epochs"] == 1


def test_threat_models_defaults_and_lists():
    assert threat_models("Linf", "", "2") == [("Linf", 4 / 255, 2)]
    assert threat_models("Linf,L1", "", "2") == [("Linf", 4 / 255, 2), ("L1", 75.0, 2)]
    assert threat_models("Linf,L1", "0.0313,255", "2,5") == [("Linf", 0.0313, 2), ("L1", 255.0, 5)]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_key_is_declared(path):
    make_train_config(["-C", str(path)])


def test_train_spec_is_the_resolved_config_typed_and_frozen(tmp_path):
    """The trainer's spec: the same values, sections and key order as the resolved config (params.json, the config
    that checkpoints record and resumes compare), each value of its field's type, frozen, and replayed by
    ``-C params.json``."""
    yaml_file = _yaml(tmp_path, {"lr": {"lr": 1}, "training": {"epochs": 3}, "adv": {"norm": ["Linf", "L1"]}})
    config = make_train_config(["-C", yaml_file, "--adv.attack", "apgd", "--ema.enabled", "1"])
    spec = TrainSpec.from_config(config)
    resolved = config_to_dict(config)
    assert spec.to_dict() == resolved
    assert [list(v) for v in spec.to_dict().values()] == [list(v) for v in resolved.values()]
    assert list(spec.to_dict()) == list(resolved)
    assert (spec.training.epochs, spec.ema.enabled, spec.adv.norm, spec.lr.lr) == (3, 1, "Linf,L1", 1.0)
    for section in dataclasses.fields(spec):
        values = getattr(spec, section.name)
        for name, kind in typing.get_type_hints(type(values)).items():
            assert type(getattr(values, name)) is kind, f"{section.name}.{name}"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.training.epochs = 4
    dump_config(spec.to_dict(), tmp_path / "params.json")
    assert TrainSpec.from_config(make_train_config(["-C", str(tmp_path / "params.json")])) == spec
