"""Config loading: _base_ inheritance, overrides, strict validation, dump round trip."""

import pytest
import yaml

from mtl.config.load import build_config, config_to_dict, dump_config, load_config, parse_override
from mtl.core.errors import UserError


def write(path, text):
    path.write_text(text)
    return path


def test_base_inheritance_deep_merges_and_child_wins(tmp_path):
    write(tmp_path / "base.yaml", "optim: {lr: 0.1, momentum: 0.5}\ndata: {batch_size: 8}\n")
    (tmp_path / "sub").mkdir()
    child = write(tmp_path / "sub" / "child.yaml", "_base_: ../base.yaml\noptim: {lr: 0.01}\n")
    cfg = build_config(*load_config(child))
    assert cfg.optim.lr == 0.01 and cfg.optim.momentum == 0.5 and cfg.data.batch_size == 8


def test_delete_replaces_a_base_mapping_instead_of_merging(tmp_path):
    write(tmp_path / "base.yaml", "tasks: {label: {head: {name: grid, options: {bins: [1, 8], stage: stage3}}}}\n")
    merged = write(tmp_path / "merged.yaml", "_base_: base.yaml\ntasks: {label: {head: {name: linear}}}\n")
    replaced = write(
        tmp_path / "replaced.yaml", "_base_: base.yaml\ntasks: {label: {head: {_delete_: true, name: linear}}}\n"
    )
    assert load_config(merged)[0]["tasks"]["label"]["head"]["options"] == {"bins": [1, 8], "stage": "stage3"}
    assert load_config(replaced)[0]["tasks"]["label"]["head"] == {"name": "linear"}
    assert build_config(*load_config(replaced)).tasks["label"].head.options == {}
    alone = write(tmp_path / "alone.yaml", "optim: {_delete_: true, lr: 0.5}\n")  # no base: the key just goes
    assert load_config(alone)[0]["optim"] == {"lr": 0.5}
    kept = write(tmp_path / "kept.yaml", "_base_: base.yaml\ntasks: {label: {head: {_delete_: false, name: x}}}\n")
    assert load_config(kept)[0]["tasks"]["label"]["head"]["options"]["bins"] == [1, 8]


def test_delete_must_be_true_or_false(tmp_path):
    write(tmp_path / "base.yaml", "optim: {lr: 0.1}\n")
    bad = write(tmp_path / "bad.yaml", "_base_: base.yaml\noptim: {_delete_: yes please, lr: 0.2}\n")
    with pytest.raises(UserError, match="_delete_ under optim must be true .* or false, got 'yes please'"):
        load_config(bad)


def test_base_list_applies_in_order(tmp_path):
    write(tmp_path / "a.yaml", "optim: {lr: 0.1}\ntrain: {epochs: 3}\n")
    write(tmp_path / "b.yaml", "optim: {lr: 0.2}\n")
    child = write(tmp_path / "c.yaml", "_base_: [a.yaml, b.yaml]\n")
    cfg = build_config(*load_config(child))
    assert cfg.optim.lr == 0.2 and cfg.train.epochs == 3


def test_overrides_are_typed_as_yaml(tmp_path):
    path = write(tmp_path / "c.yaml", "name: x\n")
    cfg = build_config(
        *load_config(
            path,
            [
                "optim.lr=0.01",
                "train.epochs=3",
                "model.freeze=all",
                "optim.nesterov=true",
                "model.weights=null",
                "sched.milestones=[3, 6]",
            ],
        )
    )
    assert cfg.optim.lr == 0.01 and cfg.train.epochs == 3 and cfg.model.freeze == "all"
    assert cfg.optim.nesterov is True and cfg.model.weights is None and cfg.sched.milestones == [3, 6]


def test_int_accepted_where_float_expected(tmp_path):
    cfg = build_config(*load_config(write(tmp_path / "c.yaml", "optim: {lr: 1}\n")))
    assert isinstance(cfg.optim.lr, float)


def test_unknown_key_names_key_file_and_close_matches(tmp_path):
    path = write(tmp_path / "c.yaml", "optim: {lrr: 0.1}\n")
    with pytest.raises(UserError) as e:
        build_config(*load_config(path))
    msg = str(e.value)
    assert "optim.lrr" in msg and "c.yaml" in msg and "lr" in msg and "\n" not in msg


def test_unknown_key_from_base_names_the_base_file(tmp_path):
    write(tmp_path / "base.yaml", "train: {epohcs: 2}\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\n")
    with pytest.raises(UserError, match=r"train\.epohcs.*base\.yaml.*epochs"):
        build_config(*load_config(child))


def test_unknown_override_key_says_command_line(tmp_path):
    path = write(tmp_path / "c.yaml", "{}\n")
    with pytest.raises(UserError, match="command-line overrides"):
        build_config(*load_config(path, ["data.batchsize=3"]))


def test_wrong_type_is_an_error(tmp_path):
    path = write(tmp_path / "c.yaml", "train: {epochs: many}\n")
    with pytest.raises(UserError, match=r"train\.epochs.*integer"):
        build_config(*load_config(path))
    with pytest.raises(UserError, match=r"optim\.nesterov.*true or false"):
        build_config(*load_config(path, ["train.epochs=2", "optim.nesterov=3"]))


def test_yaml_on_off_words_are_the_strings_they_look_like(tmp_path):
    # YAML 1.1 reads off/on as booleans; string settings take them as the words
    path = write(tmp_path / "c.yaml", "train: {amp: off, channels_last: off, cache_features: on}\n")
    cfg = build_config(*load_config(path, ["train.nonfinite=off"]))
    assert (cfg.train.amp, cfg.train.channels_last, cfg.train.cache_features, cfg.train.nonfinite) == (
        "off",
        "off",
        "on",
        "off",
    )
    with pytest.raises(UserError, match="train.amp must be auto, bf16 or off, got 'on'"):
        build_config(*load_config(path, ["train.amp=on"]))
    assert build_config(*load_config(path, ["train.progress=off"])).train.progress is False  # booleans stay booleans


def test_missing_required_value(tmp_path):
    path = write(tmp_path / "c.yaml", "train: {unfreeze: [{epoch: 2}]}\n")
    with pytest.raises(UserError, match=r"missing required config value 'train\.unfreeze\.0\.modules'"):
        build_config(*load_config(path))


def test_value_check(tmp_path):
    with pytest.raises(UserError, match="epochs must be >= 1"):
        build_config(*load_config(write(tmp_path / "c.yaml", "train: {epochs: 0}\n")))


def test_head_shorthand_and_task_defaults(tmp_path):
    path = write(tmp_path / "c.yaml", "tasks: {label: {head: mlp, type: binary}}\n")
    cfg = build_config(*load_config(path))
    assert cfg.tasks["label"].head.name == "mlp" and cfg.tasks["label"].head.hidden == 512
    assert cfg.tasks["label"].type == "binary"
    # target and head default to None here; the experiment infers them from the data set
    assert cfg.tasks["label"].target is None
    assert build_config(*load_config(write(tmp_path / "d.yaml", "tasks: {label: {}}\n"))).tasks["label"].head is None


def test_hooks_are_names_or_name_and_options(tmp_path):
    path = write(tmp_path / "c.yaml", "train: {hooks: [early_stopping, {name: mine, options: {every: 2}}]}\n")
    hooks = build_config(*load_config(path)).train.hooks
    assert [(h.name, h.options) for h in hooks] == [("early_stopping", {}), ("mine", {"every": 2})]
    assert build_config(*load_config(path, ["train.hooks=[]"])).train.hooks == []
    with pytest.raises(UserError, match=r"missing required config value 'train\.hooks\.0\.name'"):
        build_config(*load_config(write(tmp_path / "d.yaml", "train: {hooks: [{options: {every: 2}}]}\n")))
    with pytest.raises(UserError, match=r"'train\.hooks\.0\.options' .* must be a mapping"):
        build_config(*load_config(write(tmp_path / "e.yaml", "train: {hooks: [{name: x, options: 3}]}\n")))


@pytest.mark.parametrize("item", ["optim.lr", "=3", "a..b=1", "x=[1,"])
def test_bad_override_syntax(item):
    with pytest.raises(UserError, match="bad override"):
        parse_override(item)


def test_missing_file_bad_yaml_and_non_mapping(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="cannot parse"):
        load_config(write(tmp_path / "bad.yaml", "a: [1, 2\n"))
    with pytest.raises(UserError, match="mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(UserError, match="not found.*_base_"):
        load_config(write(tmp_path / "b.yaml", "_base_: missing.yaml\n"))


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(UserError, match="inherits from itself"):
        load_config(tmp_path / "a.yaml")


def test_unsafe_yaml_tags_are_refused(tmp_path):
    path = write(tmp_path / "c.yaml", "name: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(UserError, match="cannot parse"):
        load_config(path)


def test_dump_round_trip(tmp_path):
    path = write(tmp_path / "c.yaml", "optim: {lr: 0.5, lr_mult: {encoder: 0.1}}\nmodel: {freeze: {until: layer3}}\n")
    cfg = build_config(*load_config(path, ["train.epochs=4"]))
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = build_config(*load_config(tmp_path / "resolved.yaml"))
    assert config_to_dict(again) == config_to_dict(cfg)
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["train"]["epochs"] == 4


def test_every_shipped_config_validates():
    from pathlib import Path

    from mtl.config.stages import stage_configs

    configs = sorted(Path(__file__).parents[2].glob("configs/*.yaml"))
    assert configs, "no configs shipped"
    for path in configs:
        raw, sources = load_config(path)
        build_config(raw, sources)
        stage_configs(raw, sources)
