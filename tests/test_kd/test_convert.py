"""VOC and YOLO -> COCO converters (kd/data/convert.py): round trips from a known COCO set, and bad input."""
import json

import numpy as np
import pytest
from PIL import Image

from gkd.core.errors import GkdError
from gkd.kd.data import load_coco, voc_to_coco, yolo_to_coco
from gkd.kd.data.convert import read_class_names

# The known COCO set: integer boxes (VOC stores integer pixel indices), one covering the whole image.
CLASSES = ["cat", "dog", "bird"]
IMAGES = [("img_a", 64, 48), ("img_b", 50, 70), ("img_c", 40, 30)]  # name, width, height
BOXES = {  # image -> [(class, x, y, w, h, difficult)]
    "img_a": [("cat", 4, 6, 20, 10, False), ("dog", 30, 20, 34, 28, True)],
    "img_b": [("bird", 0, 0, 50, 70, False), ("cat", 10, 12, 5, 7, False)],
    "img_c": [],
}


def _image(path, w, h):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(path)


# --------------------------------------------------------------------------------------------------------------
# VOC


def _voc_xml(name, w, h, objects, filename=True):
    objs = "".join(
        f"<object><name>{c}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{int(d)}</difficult>"
        f"<bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + bw}</xmax><ymax>{y + bh}</ymax></bndbox>"
        f"</object>" for c, x, y, bw, bh, d in objects)
    fn = f"<filename>{name}.jpg</filename>" if filename else ""
    return (f"<annotation><folder>VOC</folder>{fn}<size><width>{w}</width><height>{h}</height><depth>3</depth>"
            f"</size>{objs}</annotation>")


def make_voc(root):
    """Write the known set as a Pascal VOC folder (1-based inclusive pixel coordinates)."""
    (root / "Annotations").mkdir(parents=True)
    for name, w, h in IMAGES:
        _image(root / "JPEGImages" / f"{name}.jpg", w, h)
        (root / "Annotations" / f"{name}.xml").write_text(_voc_xml(name, w, h, BOXES[name]))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("img_b\nimg_c\n")
    return root


def _boxes_by_file(coco):
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {i["id"]: i["file_name"] for i in coco["images"]}
    out = {}
    for a in coco["annotations"]:
        out.setdefault(files[a["image_id"]], []).append((names[a["category_id"]], *a["bbox"]))
    return out


def test_voc_round_trip_within_a_pixel(tmp_path):
    root = make_voc(tmp_path / "voc")
    coco = voc_to_coco(root, difficult="keep")
    assert [c["name"] for c in coco["categories"]] == sorted(CLASSES)
    assert [(i["file_name"], i["width"], i["height"]) for i in coco["images"]] == \
        [(f"{n}.jpg", w, h) for n, w, h in IMAGES]
    got = _boxes_by_file(coco)
    for name, _, _ in IMAGES:
        want = [(c, x, y, w, h) for c, x, y, w, h, _ in BOXES[name]]
        have = got.get(f"{name}.jpg", [])
        assert [b[0] for b in have] == [b[0] for b in want]
        assert np.allclose([b[1:] for b in have], [b[1:] for b in want], atol=1.0) if want else have == []
    # exact, in fact: xmin=1, xmax=W spans the whole image
    assert got["img_b.jpg"][0] == ("bird", 0.0, 0.0, 50.0, 70.0)
    index = load_coco(_write(tmp_path, coco), image_root=root / "JPEGImages", check_images=True)
    assert index.dropped == 0 and len(index.images) == 3


def _write(tmp_path, coco, name="out.json"):
    p = tmp_path / name
    p.write_text(json.dumps(coco))
    return p


def test_voc_difficult_policies(tmp_path):
    root = make_voc(tmp_path / "voc")
    ignore = voc_to_coco(root)
    crowd = {a["category_id"]: a["iscrowd"] for a in ignore["annotations"] if a["image_id"] == 1}
    dog = next(c["id"] for c in ignore["categories"] if c["name"] == "dog")
    assert crowd[dog] == 1 and sum(a["iscrowd"] for a in ignore["annotations"]) == 1
    assert [a["attributes"]["difficult"] for a in ignore["annotations"]].count(True) == 1
    assert len(voc_to_coco(root, difficult="drop")["annotations"]) == 3
    assert all(a["iscrowd"] == 0 for a in voc_to_coco(root, difficult="keep")["annotations"])


def test_voc_split_and_class_order(tmp_path):
    root = make_voc(tmp_path / "voc")
    coco = voc_to_coco(root, split="train", classes=["dog", "cat", "bird"])
    assert [i["file_name"] for i in coco["images"]] == ["img_b.jpg", "img_c.jpg"]
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "dog"), (2, "cat"), (3, "bird")]
    assert sorted(a["category_id"] for a in coco["annotations"]) == [2, 3]
    with pytest.raises(GkdError, match=r"img_a\.xml: object 1 is 'cat', not one of the classes dog, bird"):
        voc_to_coco(root, classes=["dog", "bird"])
    with pytest.raises(GkdError, match=r"ImageSets/Main/val\.txt: split file not found"):
        voc_to_coco(root, split="val")


@pytest.mark.parametrize("xml, expected", [
    ("<annotation><filename>img_a.jpg</filename><object>", r"img_a\.xml: malformed XML at line 1"),
    ("<annotation>\n<filename>img_a.jpg</filename>\n<object><name>cat</name></object>\n</annotation>",
     r"img_a\.xml: object 1 \('cat'\): missing <bndbox>"),
    ("<annotation><filename>img_a.jpg</filename><object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
     "<xmax>5</xmax></bndbox></object></annotation>", r"img_a\.xml: object 1 \('cat'\): missing <ymax>"),
    ("<annotation><filename>img_a.jpg</filename><object><name>cat</name><bndbox><xmin>a</xmin><ymin>1</ymin>"
     "<xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>", r"img_a\.xml: .*'a' is not a number"),
    ("<annotation><filename>gone.jpg</filename></annotation>", r"img_a\.xml: its image .*gone\.jpg does not exist"),
    ("<html></html>", r"img_a\.xml: root element is <html>"),
])
def test_voc_bad_xml_names_the_file(tmp_path, xml, expected):
    root = make_voc(tmp_path / "voc")
    (root / "Annotations" / "img_a.xml").write_text(xml)
    with pytest.raises(GkdError, match=expected) as exc:
        voc_to_coco(root)
    assert "\n" not in str(exc.value)


def test_voc_size_read_from_image_when_missing(tmp_path):
    root = make_voc(tmp_path / "voc")
    (root / "Annotations" / "img_c.xml").write_text("<annotation><filename>img_c.jpg</filename></annotation>")
    coco = voc_to_coco(root)
    assert coco["images"][2]["width"] == 40 and coco["images"][2]["height"] == 30


# --------------------------------------------------------------------------------------------------------------
# YOLO


def make_yolo(root, boxes=None):
    """Write the known set as YOLO: images/<split>/x.png + labels/<split>/x.txt, normalised cx cy w h."""
    boxes = BOXES if boxes is None else boxes
    for name, w, h in IMAGES:
        _image(root / "images" / "sub" / f"{name}.png", w, h)
        if name == "img_c":
            continue  # no label file: a background image
        lines = [f"{CLASSES.index(c)} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}"
                 for c, x, y, bw, bh, _ in boxes[name]]
        p = root / "labels" / "sub" / f"{name}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join(lines) + "\n")
    (root / "names.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "data.yaml").write_text("path: .\ntrain: images\nnc: 3\nnames:\n  0: cat\n  1: dog\n  2: bird\n")
    return root


@pytest.mark.parametrize("names", ["names.txt", "data.yaml", "list"])
def test_yolo_round_trip_within_a_pixel(tmp_path, names):
    root = make_yolo(tmp_path / "yolo")
    coco = yolo_to_coco(root / "images", root / "labels", names=CLASSES if names == "list" else root / names)
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "cat"), (2, "dog"), (3, "bird")]
    assert [(i["file_name"], i["width"], i["height"]) for i in coco["images"]] == \
        [(f"sub/{n}.png", w, h) for n, w, h in IMAGES]
    got = _boxes_by_file(coco)
    for name, _, _ in IMAGES:
        want = [(c, x, y, w, h) for c, x, y, w, h, _ in BOXES[name]]
        have = got.get(f"sub/{name}.png", [])
        assert [b[0] for b in have] == [b[0] for b in want]
        if want:
            assert np.abs(np.array([b[1:] for b in have]) - np.array([b[1:] for b in want])).max() < 1.0
    index = load_coco(_write(tmp_path, coco), image_root=root / "images", check_images=True)
    assert index.dropped == 0 and index.anns_by_image[3] == []


def test_yolo_segment_lines_become_boxes_and_exif_sizes_are_displayed_sizes(tmp_path):
    img = tmp_path / "images" / "r.jpg"
    img.parent.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40x20, displayed 20x40
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(img, exif=exif.tobytes())
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "r.txt").write_text("0 0.1 0.25 0.6 0.25 0.6 0.75 0.1 0.75\n")
    coco = yolo_to_coco(tmp_path / "images", tmp_path / "labels", names=["thing"])
    assert (coco["images"][0]["width"], coco["images"][0]["height"]) == (20, 40)
    assert coco["annotations"][0]["bbox"] == pytest.approx([2.0, 10.0, 10.0, 20.0])


@pytest.mark.parametrize("line, expected", [
    ("0 0.5 0.5 0.2", r"a\.txt:2: 4 values; expected 'class cx cy w h'"),
    ("5 0.5 0.5 0.2 0.2", r"a\.txt:2: class '5' is not a class index 0\.\.1"),
    ("0 50 40 20 10", r"a\.txt:2: coordinates 50 40 20 10 are not normalised"),
    ("0 0.5 x 0.2 0.2", r"a\.txt:2: '0 0\.5 x 0\.2 0\.2' has a non-number"),
    ("1.5 0.5 0.5 0.2 0.2", r"a\.txt:2: class '1\.5'"),
])
def test_yolo_bad_label_line_names_file_and_line(tmp_path, line, expected):
    _image(tmp_path / "images" / "a.png", 10, 10)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text(f"0 0.5 0.5 0.2 0.2\n{line}\n")
    with pytest.raises(GkdError, match=expected):
        yolo_to_coco(tmp_path / "images", tmp_path / "labels", names=["a", "b"])


@pytest.mark.parametrize("name, text, expected", [
    ("data.yaml", "names: [a, b]\nnc: 3\n", "nc is 3 but 'names' has 2"),
    ("data.yaml", "names: [a, b\n", "invalid YAML at line"),
    ("data.yaml", "names:\n  0: a\n  2: b\n", "expected the class indices 0..1"),
    ("data.yaml", "train: x\n", "'names' is None"),
    ("names.txt", "\n\n", "no class names"),
    ("names.txt", "a\nb\na\n", r"class name\(s\) \['a'\] appear more than once"),
])
def test_bad_class_name_files(tmp_path, name, text, expected):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(GkdError, match=expected) as exc:
        read_class_names(p)
    assert str(exc.value).startswith(str(p))


def test_yolo_missing_folders_and_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(GkdError, match="no images"):
        yolo_to_coco(tmp_path / "images", tmp_path / "labels", names=["a"])
    with pytest.raises(GkdError, match="labels folder not found"):
        yolo_to_coco(tmp_path / "images", tmp_path / "nope", names=["a"])


def test_voc_labels_in_other_folders_convert_the_same(tmp_path):
    """annotations/*.xml + images/*.jpg (the common layout) gives the same COCO boxes as a VOC root."""
    voc = make_voc(tmp_path / "voc")
    other = tmp_path / "mine"
    (other / "annotations").mkdir(parents=True)
    (other / "images").mkdir()
    for name, _, _ in IMAGES:
        (other / "annotations" / f"{name}.xml").write_bytes((voc / "Annotations" / f"{name}.xml").read_bytes())
        (other / "images" / f"{name}.jpg").write_bytes((voc / "JPEGImages" / f"{name}.jpg").read_bytes())
    a = voc_to_coco(voc)
    b = voc_to_coco(None, annotations_dir=other / "annotations", images_dir=other / "images")
    assert _boxes_by_file(a) == _boxes_by_file(b) and a["categories"] == b["categories"]
    with pytest.raises(GkdError, match="--split train: needs VOC_ROOT"):
        voc_to_coco(None, split="train", annotations_dir=other / "annotations", images_dir=other / "images")
    with pytest.raises(GkdError, match="give the VOC root, or both"):
        voc_to_coco(None, annotations_dir=other / "annotations")


def _many_images(root, n=40):
    """``n`` images; class 'rare' on 4 of them, 'common' on the rest, 3 without boxes."""
    images, anns = [], []
    for i in range(n):
        _image(root / "images" / f"{i:03d}.png", 32, 32)
        images.append({"id": i + 1, "file_name": f"{i:03d}.png", "width": 32, "height": 32})
        if i < n - 3:
            cat = 2 if i % 10 == 0 else 1
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "bbox": [2, 2, 10, 10],
                         "area": 100, "iscrowd": 0})
    path = root / "all.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "common"}, {"id": 2, "name": "rare"}]}))
    return path


def test_split_is_seeded_stratified_and_a_dataset_folder(tmp_path):
    from gkd.kd.data.split import split_coco

    src = _many_images(tmp_path / "src")
    rep = split_coco(src, tmp_path / "a", val_fraction=0.25, seed=3)
    assert rep["train"] + rep["val"] == 40 and rep["val"] == 1 + 8 + 1  # rare 4 -> 1, common 33 -> 8, none 3 -> 1
    train, val = load_coco(tmp_path / "a" / "train.json"), load_coco(tmp_path / "a" / "val.json")
    assert train.classes == val.classes == ["common", "rare"]
    for split in (train, val):  # every class in both splits
        assert {a["category_id"] for anns in split.anns_by_image.values() for a in anns} == {1, 2}
    assert (tmp_path / "a" / "images").resolve() == (tmp_path / "src" / "images").resolve()
    split_coco(src, tmp_path / "b", val_fraction=0.25, seed=3)
    assert (tmp_path / "a" / "val.json").read_text() == (tmp_path / "b" / "val.json").read_text()
    split_coco(src, tmp_path / "c", val_fraction=0.25, seed=4)
    assert (tmp_path / "a" / "val.json").read_text() != (tmp_path / "c" / "val.json").read_text()
    with pytest.raises(GkdError, match="train.json: already exists"):
        split_coco(src, tmp_path / "a", val_fraction=0.25, seed=3)
