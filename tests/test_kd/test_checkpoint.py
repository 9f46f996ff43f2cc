import dataclasses

import pytest
import torch

from gkd.core.errors import GkdError
from gkd.kd.checkpoint import detector_checkpoint, load_checkpoint, load_detector, save_checkpoint
from gkd.kd.config import ModelConfig
from gkd.kd.models.detectors import build_detector

CFG = ModelConfig(arch="faster_rcnn", backbone="resnet18", min_size=64, max_size=64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = build_detector(CFG, 3)
    path = tmp_path_factory.mktemp("ck") / "model.pt"
    save_checkpoint(detector_checkpoint(model, CFG, ["a", "b", "c"], [1, 5, 9]), path)
    return model, path


def test_roundtrip_restores_weights_and_metadata(saved):
    model, path = saved
    loaded, info = load_detector(path)
    assert info["classes"] == ["a", "b", "c"] and info["category_ids"] == [1, 5, 9]
    assert info["model_config"].num_classes == 3 and info["model_config"].backbone == "resnet18"
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert not loaded.training


def test_declared_architecture_must_match(saved):
    _, path = saved
    with pytest.raises(GkdError, match="resnet18 model, the config declares faster_rcnn/resnet34"):
        load_detector(path, dataclasses.replace(CFG, backbone="resnet34"))
    with pytest.raises(GkdError, match="checkpoint has 3 classes, the dataset has 4"):
        load_detector(path, CFG, num_classes=4)


def test_plain_state_dict_needs_and_checks_architecture(saved, tmp_path):
    model, _ = saved
    sd_path = tmp_path / "tv.pth"
    torch.save(model.state_dict(), sd_path)
    loaded, info = load_detector(sd_path, CFG, num_classes=3)
    assert info["classes"] is None
    assert torch.equal(next(iter(loaded.state_dict().values())), next(iter(model.state_dict().values())))
    with pytest.raises(GkdError, match="carries no architecture"):
        load_detector(sd_path)
    with pytest.raises(GkdError, match="class count differs: 'roi_heads.box_predictor"):
        load_detector(sd_path, CFG, num_classes=5)
    with pytest.raises(GkdError, match="weights do not fit this architecture"):
        load_detector(sd_path, dataclasses.replace(CFG, arch="retinanet"), num_classes=3)


def test_corrupt_truncated_and_code_carrying_files_refused(saved, tmp_path):
    _, path = saved
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(GkdError, match="trunc.pt: not a readable checkpoint"):
        load_checkpoint(trunc)
    with pytest.raises(GkdError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": EvilThing()}, evil)
    with pytest.raises(GkdError, match="evil.pt: refused to load"):
        load_checkpoint(evil)


class EvilThing:
    pass


@pytest.mark.parametrize("content", [b"just some text\n", b"", b"\x00\x01binary"])
def test_a_file_that_is_not_a_torch_file_says_so(tmp_path, content):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(GkdError, match=r"notes.pt: not a torch checkpoint \(expected a file written by torch.save"):
        load_checkpoint(path)


def test_save_is_atomic_no_temp_left(tmp_path):
    save_checkpoint({"x": torch.ones(2)}, tmp_path / "a.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    (tmp_path / "b.pt").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        save_checkpoint({"x": Boom()}, tmp_path / "b.pt")
    assert (tmp_path / "b.pt").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]


def test_torchvision_frozen_bn_weights_load_into_bn_model(tmp_path):
    torch.manual_seed(1)
    tv = build_detector(dataclasses.replace(CFG, norm="frozen_bn"), 3)
    path = tmp_path / "tv_frozen.pth"
    torch.save(tv.state_dict(), path)
    loaded, _ = load_detector(path, CFG, num_classes=3)  # CFG uses trainable BatchNorm
    own = loaded.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in tv.state_dict().items())
    assert any(k.endswith("num_batches_tracked") for k in own)


def test_another_head_width_is_not_called_a_class_count_difference(tmp_path):
    from gkd.kd.checkpoint import load_state_into
    from gkd.kd.config import ModelConfig
    from gkd.kd.models.detectors import build_detector

    narrow = ModelConfig(backbone="resnet18", min_size=64, max_size=64, fpn_channels=64, box_head_dim=64)
    wide = ModelConfig(backbone="resnet18", min_size=64, max_size=64, fpn_channels=64, box_head_dim=128)
    state = build_detector(narrow, 3).state_dict()
    with pytest.raises(GkdError) as err:
        load_state_into(build_detector(wide, 3), state, "t.pt", "faster_rcnn")
    assert "class count" not in str(err.value) and "model.box_head_dim" in str(err.value)
    with pytest.raises(GkdError, match="class count differs"):
        load_state_into(build_detector(narrow, 5), state, "t.pt", "faster_rcnn")
