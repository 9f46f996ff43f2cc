import pytest

from gkd.core.config import apply_overrides, dump_config, to_dict
from gkd.core.errors import GkdError
from gkd.kd.config import RunConfig, load_config


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_nested_values(tmp_path):
    cfg = load_config(write(tmp_path, "name: t\nmodel:\n  backbone: resnet18\ntrain:\n  steps: [3, 5]\n  lr: 1\n"))
    assert cfg.name == "t" and cfg.model.backbone == "resnet18"
    assert cfg.train.steps == (3, 5) and isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert cfg.model.arch == "faster_rcnn"  # default kept


def test_typo_in_key_names_key_and_allowed(tmp_path):
    p = write(tmp_path, "train:\n  epoch: 3\n")
    with pytest.raises(GkdError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "train.epoch" in msg and "epochs" in msg and "\n" not in msg


def test_wrong_type_and_bad_choice(tmp_path):
    with pytest.raises(GkdError, match=r"train.epochs' must be int, got 'three'"):
        load_config(write(tmp_path, "train:\n  epochs: three\n"))
    with pytest.raises(GkdError, match=r"model.backbone' must be one of .*resnet18.*got 'resnet19'"):
        load_config(write(tmp_path, "model:\n  backbone: resnet19\n"))
    with pytest.raises(GkdError, match="must be bool"):
        load_config(write(tmp_path, "train:\n  amp: 3\n"))


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(GkdError, match="invalid YAML at line"):
        load_config(write(tmp_path, "train: [1, 2\n"))
    with pytest.raises(GkdError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(GkdError, match="must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  epochs: 3\n"),
                      ["train.epochs=5", "train.grad_clip=null", "train.steps=[1,2]", "model.weights=w.pt"])
    assert cfg.train.epochs == 5 and cfg.train.grad_clip is None and cfg.train.steps == (1, 2)
    assert cfg.model.weights == "w.pt"
    with pytest.raises(GkdError, match="key=value"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(GkdError, match="unknown key 'train.epochz'"):
        load_config(None, ["train.epochz=1"])


def test_base_inheritance_and_roundtrip(tmp_path):
    write(tmp_path, "train:\n  epochs: 7\n  lr: 0.1\n", "base.yaml")
    child = write(tmp_path, "_base_: base.yaml\ntrain:\n  lr: 0.5\n")
    cfg = load_config(child)
    assert cfg.train.epochs == 7 and cfg.train.lr == 0.5
    out = dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(out)
    assert again == cfg and to_dict(again) == to_dict(cfg)
    assert isinstance(again, RunConfig)


def test_config_differences_lists_every_differing_leaf_by_dotted_key():
    from gkd.core.config import config_differences

    old = {"model": {"backbone": "resnet18", "anchor_sizes": [8, 16]}, "train": {"lr": 0.01, "epochs": 2}}
    new = {"model": {"backbone": "resnet18", "anchor_sizes": [8, 32]}, "train": {"lr": 0.02, "epochs": 2},
           "seed": 1}
    assert config_differences(old, new) == [("model.anchor_sizes", [8, 16], [8, 32]), ("seed", None, 1),
                                            ("train.lr", 0.01, 0.02)]
    assert config_differences(old, old) == []


def test_overrides_never_modify_the_defaults_they_are_applied_to():
    from gkd.core.config import apply_overrides, merge_dicts

    defaults = {"train": {"epochs": 2, "steps": [1]}}
    merged = merge_dicts(defaults, {"model": {"arch": "retinanet"}})
    apply_overrides(merged, ["train.epochs=5"])["train"]["steps"].append(9)
    merged["train"]["steps"].append(7)
    assert defaults == {"train": {"epochs": 2, "steps": [1]}}


@pytest.mark.parametrize("raw, value", [
    ("#ckpts/t.pt", "#ckpts/t.pt"), ("data/a: b", "data/a: b"), ("null", None), ("~", None), ("2", 2),
    ("[8, 11]", [8, 11]), ("{a: 1}", {"a": 1}), ("0.5", 0.5), ("'quoted: yes'", "quoted: yes"), ("a #b", "a #b"),
])
def test_override_values_stay_what_was_typed_where_yaml_would_change_them(raw, value):
    from gkd.core.config import parse_override_value

    assert parse_override_value(raw) == value


def test_exponent_floats_and_did_you_mean(tmp_path):
    cfg = load_config(None, ["train.lr=1e-4"])
    assert cfg.train.lr == 1e-4
    (tmp_path / "c.yaml").write_text("train:\n  lr: 2e-3\n  epochz: 3\n")
    with pytest.raises(GkdError, match=r"unknown key 'train.epochz'; did you mean 'train.epochs'\?"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "'train.lr' must be > 0, got -1.0"),
    ("train.batch_size=0", "'train.batch_size' must be >= 1, got 0"),
    ("train.epochs=0", "'train.epochs' must be >= 1, got 0"),
    ("train.epochs=-3", "'train.epochs' must be >= 1, got -3"),
    ("train.momentum=1.5", "'train.momentum' must be >= 0 and < 1, got 1.5"),
    ("train.steps=[8,-1]", "'train.steps' must be >= 0, got -1"),
    ("model.score_thresh=1", "'model.score_thresh' must be >= 0 and < 1, got 1.0"),
    ("model.min_size=0", "'model.min_size' must be >= 16, got 0"),
    ("eval.max_dets=0", "'eval.max_dets' must be >= 1, got 0"),
])
def test_numeric_keys_are_range_checked(override, message):
    with pytest.raises(GkdError) as err:
        load_config(None, [override])
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1


def test_distill_ranges_and_every_shipped_config_is_in_range():
    from gkd.kd import CONFIG_DIR
    from gkd.kd.distill.config import DistillRunConfig

    with pytest.raises(GkdError, match="'distill.temperature' must be > 0, got 0.0"):
        load_config(None, ["distill.temperature=0"], cls=DistillRunConfig)
    with pytest.raises(GkdError, match="'distill.pgm.num_prototypes' must be >= 1, got 0"):
        load_config(None, ["distill.pgm.num_prototypes=0"], cls=DistillRunConfig)
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        load_config(path, cls=DistillRunConfig if "distill" in path.read_text() else RunConfig)
