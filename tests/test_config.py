"""Config validation: unknown keys, wrong types and bad values name the key path and what was expected."""

import pytest
from pydantic import ValidationError

from alambic.config import RunConfig, Term, apply_overrides, config_from_dict, dump_config, load_config
from alambic.errors import ConfigError

BASE = {
    "teacher": {"model": {"arch": "mlp"}, "train": {"epochs": 1}},
    "student": {"model": {"arch": "mlp", "kwargs": {"hidden": [8]}}},
}


def _config(**changes):
    data = {key: dict(value) for key, value in BASE.items()}
    data.update(changes)
    return data


def test_defaults_are_hinton_kd():
    config = config_from_dict(_config())
    assert [(t.loss, t.weight) for t in config.distill.terms] == [("ce", 0.1), ("kd", 0.9)]
    assert config.distill.terms[1].params == {"temperature": 4.0}


def test_unknown_key_names_its_path():
    with pytest.raises(ConfigError, match=r"distill\.train\.epoch: unknown key"):
        config_from_dict(_config(distill={"train": {"epoch": 3}}))


def test_wrong_type_names_path_and_value():
    with pytest.raises(ConfigError, match=r"distill\.train\.lr: .*got 'fast'"):
        config_from_dict(_config(distill={"train": {"lr": "fast"}}))


def test_non_positive_temperature_is_rejected_before_training():
    terms = [{"loss": "kd", "params": {"temperature": 0}}]
    with pytest.raises(ConfigError, match=r"distill\.terms\.0: temperature must be > 0"):
        config_from_dict(_config(distill={"terms": terms}))


def test_unknown_loss_and_unknown_loss_parameter():
    with pytest.raises(ConfigError, match="unknown loss 'kdd': did you mean kd"):
        config_from_dict(_config(distill={"terms": [{"loss": "kdd"}]}))
    with pytest.raises(ConfigError, match="has no parameter 'temp'"):
        config_from_dict(_config(distill={"terms": [{"loss": "kd", "params": {"temp": 2}}]}))


def test_teacher_needs_a_checkpoint_or_a_training_budget():
    data = _config(teacher={"model": {"arch": "mlp"}})
    with pytest.raises(ConfigError, match="teacher: give model.checkpoint"):
        config_from_dict(data)


def test_baseline_cannot_use_a_teacher_loss():
    with pytest.raises(ConfigError, match="baseline trains without a teacher"):
        config_from_dict(_config(baseline={"terms": [{"loss": "kd"}]}))


def test_overrides_parse_yaml_values_and_index_lists():
    config = config_from_dict(
        _config(), ["distill.train.epochs=7", "distill.terms.1.params.temperature=20", "seed=3"]
    )
    assert config.distill.train.epochs == 7
    assert config.distill.terms[1].params["temperature"] == 20
    assert config.seed == 3
    with pytest.raises(ConfigError, match="expects key.path=value"):
        apply_overrides({}, ["seed"])
    with pytest.raises(ConfigError, match="out of range"):
        config_from_dict(_config(), ["distill.terms.5=1"])


def test_yaml_errors_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)


def test_dump_round_trips(tmp_path):
    config = config_from_dict(_config())
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_every_recipe_validates():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("**/*.yaml"))
    assert len(recipes) >= 3
    for recipe in recipes:
        assert isinstance(load_config(recipe), RunConfig), recipe
        assert recipe.read_text().startswith("# alambic "), (
            f"{recipe.name} must start with the command that runs it"
        )


def test_every_image_loss_has_a_method_recipe_on_both_cifar_pairs():
    from pathlib import Path

    from alambic.losses import list_losses

    root = Path(__file__).resolve().parents[1] / "recipes"
    for pair in ("cifar10-resnet56-resnet20", "cifar10-resnet32x4-resnet8x4"):
        used = {
            term.loss for recipe in (root / pair).glob("*.yaml") for term in load_config(recipe).distill.terms
        }
        vision = {spec.name for spec in list_losses() if spec.inputs in ("logits", "features", "embeddings")}
        missing = vision - used
        assert not missing, f"{pair} has no recipe using {sorted(missing)}"


def test_extends_merges_mappings_and_replaces_lists(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "name: base\nteacher: {model: {arch: mlp}, train: {epochs: 2}}\nstudent: {model: {arch: mlp}}\n"
        "distill: {terms: [{loss: ce}, {loss: kd}], train: {epochs: 3, lr: 0.2}}\n"
    )
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\nname: child\ndistill: {terms: [{loss: dist}], train: {epochs: 5}}\n"
    )
    config = load_config(tmp_path / "child.yaml", overrides=["distill.train.lr=0.3"])
    assert config.name == "child" and config.teacher.train.epochs == 2
    assert [term.loss for term in config.distill.terms] == ["dist"]  # lists are replaced, not merged
    assert config.distill.train.epochs == 5 and config.distill.train.lr == 0.3
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\nname: x\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_multi_feature_terms_take_lists_and_single_feature_terms_do_not():
    term = Term(loss="fsp", student=["layer1", "layer2"], teacher=["layer1", "layer2"])
    assert term.name == "fsp:layer1..layer2"
    with pytest.raises(ValidationError, match="lists of features"):
        Term(loss="fsp", student="layer1", teacher="layer1")
    with pytest.raises(ValidationError, match="one length"):
        Term(loss="review_kd", student=["a", "b"], teacher=["a"])
    with pytest.raises(ValidationError, match="one module path, not a list"):
        Term(loss="fitnet", student=["a"], teacher=["a"])


def test_term_name_for_feature_terms():
    assert Term(loss="kd").name == "kd"
    assert Term(loss="logit_mse", student="fc").name == "logit_mse:fc"


def test_stage_augmentation_needs_data_augmentation():
    with pytest.raises(ConfigError, match="data.augment is false"):
        config_from_dict(_config(distill={"train": {"augment": True}}))
    config = config_from_dict(_config(data={"augment": True}, distill={"train": {"augment": False}}))
    assert config.distill.train.augment is False and config.teacher.train.augment is None


def test_group_by_length_turns_dynamic_padding_on_from_a_file_and_from_set():
    for config in (
        config_from_dict(_config(data={"group_by_length": True, "dynamic_padding": False})),
        config_from_dict(
            _config(), ["data.group_by_length=true"]
        ),  # over the resolved dynamic_padding: false
    ):
        assert config.data.group_by_length is True and config.data.dynamic_padding is True
    assert config_from_dict(_config()).data.dynamic_padding is False


@pytest.mark.parametrize("override", ["name.foo=1", "distill.terms.x.weight=1", "distill.terms.9.weight=1"])
def test_overrides_that_do_not_fit_the_config_are_one_line_errors(override):
    with pytest.raises(ConfigError, match="--set"):
        config_from_dict(_config(), [override])
