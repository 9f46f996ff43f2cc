"""torchvision COCO detection weights (91 class slots) as initialisation and as teacher, on state dicts with
torchvision's exact key names and shapes, built locally with weights=None (nothing is downloaded)."""
import pytest
import torch

from gkd.core.errors import GkdError
from gkd.kd.checkpoint import load_state_into
from gkd.kd.config import ModelConfig, RunConfig
from gkd.kd.models.coco_transfer import coco_slots_for
from gkd.kd.models.detectors import build_detector

COCO_CLASSES = ["dog", "person", "traffic_light", "motorbike"]  # COCO slots 18, 1, 10, 4 (motorbike: VOC's name)
SLOTS = [0, 18, 1, 10, 4]


@pytest.fixture(scope="module")
def torchvision_states(tmp_path_factory):
    import torchvision

    root = tmp_path_factory.mktemp("tv")
    torch.manual_seed(0)
    out = {}
    for arch, ctor in (("faster_rcnn", torchvision.models.detection.fasterrcnn_resnet50_fpn),
                       ("retinanet", torchvision.models.detection.retinanet_resnet50_fpn)):
        state = ctor(weights=None, weights_backbone=None).state_dict()
        path = root / f"{arch}_coco.pth"
        torch.save(state, path)
        out[arch] = (state, path)
    return out


def _cfg(arch):
    return ModelConfig(arch=arch, backbone="resnet50", min_size=128, max_size=128)


def test_names_map_to_coco_slots_and_ids_are_not_trusted():
    assert coco_slots_for(COCO_CLASSES) == (SLOTS[1:], "by name")
    slots, why = coco_slots_for(["circle", "person"])
    assert slots is None and "circle" in why


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_coco_classes_transfer_every_tensor_with_the_heads_cut_to_the_dataset(torchvision_states, arch):
    state, path = torchvision_states[arch]
    model = build_detector(_cfg(arch), len(COCO_CLASSES))
    report = load_state_into(model, state, str(path), arch, classes=COCO_CLASSES)
    assert report.startswith(f"transferred {len(state)} of {len(state)} tensors") and "re-initialised: none" in report
    own = model.state_dict()
    if arch == "faster_rcnn":
        assert torch.equal(own["roi_heads.box_predictor.cls_score.weight"],
                           state["roi_heads.box_predictor.cls_score.weight"][SLOTS])
        rows = [4 * s + j for s in SLOTS for j in range(4)]
        assert torch.equal(own["roi_heads.box_predictor.bbox_pred.weight"],
                           state["roi_heads.box_predictor.bbox_pred.weight"][rows])
    else:
        rows = [a * 91 + s for a in range(9) for s in SLOTS]
        assert torch.equal(own["head.classification_head.cls_logits.weight"],
                           state["head.classification_head.cls_logits.weight"][rows])
    assert torch.equal(own["backbone.body.layer1.0.conv1.weight"], state["backbone.body.layer1.0.conv1.weight"])


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_other_classes_reinitialise_the_heads_for_an_initialisation(torchvision_states, arch, tmp_path, caplog):
    from gkd.kd.train import build_model

    state, path = torchvision_states[arch]
    cfg = RunConfig(model=ModelConfig(arch=arch, backbone="resnet50", min_size=128, max_size=128, weights=str(path)))
    torch.manual_seed(1)
    fresh = build_detector(cfg.model, 2).state_dict()
    torch.manual_seed(1)
    with caplog.at_level("INFO", logger="gkd"):
        model = build_model(cfg, 2, ["circle", "square"])
    line = next(r.message for r in caplog.records if "initialised from" in r.message)
    assert "re-initialised: " in line and "no COCO category named ['circle', 'square']" in line
    assert f"transferred {len(state) - (4 if arch == 'faster_rcnn' else 2)} of {len(state)} tensors" in line
    own = model.state_dict()
    head = "roi_heads.box_predictor.cls_score.weight" if arch == "faster_rcnn" else \
        "head.classification_head.cls_logits.weight"
    assert torch.equal(own[head], fresh[head])  # the model's own initialisation, not COCO's rows
    body = "backbone.body.layer2.0.conv1.weight"
    assert torch.equal(own[body], state[body])


def test_a_coco_teacher_is_accepted_for_coco_classes_and_refused_otherwise(torchvision_states):
    from gkd.kd.distill.config import TeacherConfig
    from gkd.kd.distill.run import load_teacher

    _, path = torchvision_states["faster_rcnn"]
    student = ModelConfig(backbone="resnet18", min_size=128, max_size=128, fpn_channels=64, box_head_dim=128)
    tcfg = TeacherConfig(checkpoint=str(path), arch="faster_rcnn", backbone="resnet50")
    teacher = load_teacher(tcfg, COCO_CLASSES, student)  # widths read off the state dict: 256 and 1024
    assert teacher.roi_heads.box_predictor.cls_score.out_features == len(COCO_CLASSES) + 1
    assert teacher.backbone.out_channels == 256
    with pytest.raises(GkdError, match=r"cannot teach these classes \(no COCO category named \['circle'"):
        load_teacher(tcfg, ["circle", "square"], student)
