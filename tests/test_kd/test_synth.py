"""The embedded synthetic dataset (kd/data/synth.py): determinism, structure, hard cases, argument checks."""
import json

import numpy as np
import pytest

from gkd.core.errors import GkdError
from gkd.kd.data import SYNTH_CLASSES, generate_synthetic, load_coco, render_image
from gkd.kd.data.synth import MIN_VISIBLE, OCCLUDED_ABOVE, SMALL_AREA


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = _files_after(tmp_path / "a", seed=5)
    b = _files_after(tmp_path / "b", seed=5)
    assert set(a) == {"README.txt", "meta.json", "train.json", "val.json"} | {f"images/{i:06d}.png" for i in range(6)}
    assert a == b
    c = _files_after(tmp_path / "c", seed=6)
    assert set(c) == set(a)
    assert all(a[f] != c[f] for f in a if f.startswith("images/"))
    # image i depends on (seed, i) only: a longer dataset starts with the same images
    d = _files_after(tmp_path / "d", seed=5, n=8)
    assert all(d[f] == a[f] for f in a if f.startswith("images/"))


def _files_after(out, seed, n=6):
    generate_synthetic(out, n_images=n, seed=seed, image_size=64, val_fraction=0.34)
    return _files(out)


def test_splits_load_as_coco_with_attributes(tmp_path):
    meta = generate_synthetic(tmp_path, n_images=10, seed=0, image_size=96, val_fraction=0.2)
    train = load_coco(tmp_path / "train.json", check_images=True)
    val = load_coco(tmp_path / "val.json", check_images=True)
    assert train.image_root == tmp_path / "images"
    assert train.classes == val.classes == list(SYNTH_CLASSES) and len(SYNTH_CLASSES) >= 5
    assert (len(train.images), len(val.images)) == (8, 2) and train.dropped == val.dropped == 0
    assert not {i["id"] for i in train.images} & {i["id"] for i in val.images}
    for index in (train, val):
        for img in index.images:
            anns = index.anns_by_image[img["id"]]
            assert 3 <= len(anns) <= 8
            for a in anns:
                at = a["attributes"]
                assert all(type(at[k]) is bool for k in ("small", "occluded", "blurred", "noisy", "low_contrast"))
                assert at["small"] == (a["bbox"][2] * a["bbox"][3] < SMALL_AREA)
                assert MIN_VISIBLE <= at["visible"] <= 1.0
                assert at["occluded"] == (1.0 - at["visible"] > OCCLUDED_ABOVE)
    assert meta["seed"] == 0 and meta["classes"] == list(SYNTH_CLASSES)
    saved = json.loads((tmp_path / "meta.json").read_text())
    assert saved["generator_version"] == meta["generator_version"] and saved["stats"]["val"]["images"] == 2
    assert "seed 0" in (tmp_path / "README.txt").read_text()


def test_hard_cases_and_every_class_occur():
    flags = {k: 0 for k in ("small", "occluded", "blurred", "noisy", "low_contrast")}
    labels, n = set(), 0
    tiny_side = []
    for i in range(40):
        pixels, objects = render_image(1, i, 256)
        assert pixels.shape == (256, 256, 3) and pixels.dtype == np.uint8
        for o in objects:
            n += 1
            labels.add(o["label"])
            x, y, w, h = o["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 256 and y + h <= 256 and w >= 3 and h >= 3
            tiny_side.append(max(w, h))
            for k in flags:
                flags[k] += o[k]
    assert labels == set(range(len(SYNTH_CLASSES)))
    assert min(tiny_side) < 16  # small objects (< 16 px) at the default size
    for k, v in flags.items():
        assert 0.03 < v / n < 0.6, f"{k}: {v}/{n}"


def test_boxes_are_tight_around_the_drawn_shapes():
    # owner[y, x] = index of the object whose (unblurred) shape shows at that pixel: a box must hold all of its
    # object's visible pixels, and for an unoccluded object be exactly their bounding box.
    n_full = 0
    for i in range(6):
        _, objects, owner = render_image(3, i, 128, return_owner=True)
        for k, o in enumerate(objects):
            ys, xs = np.nonzero(owner == k)
            x, y, w, h = o["bbox"]
            assert x <= xs.min() and xs.max() < x + w and y <= ys.min() and ys.max() < y + h
            assert len(xs) / o["area"] == pytest.approx(o["visible"], abs=1e-3)
            if o["visible"] == 1.0:
                n_full += 1
                assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == o["bbox"]
    assert n_full >= 10


@pytest.mark.parametrize("kwargs, expected", [
    ({"n_images": 1}, "n_images is 1"),
    ({"val_fraction": 0.0}, "val_fraction is 0.0"),
    ({"val_fraction": 1.0}, "val_fraction is 1.0"),
    ({"image_size": 16}, "image_size is 16"),
    ({"seed": -1}, "seed is -1"),
])
def test_bad_arguments(tmp_path, kwargs, expected):
    args = {"n_images": 4, "seed": 0, "image_size": 64, "val_fraction": 0.25, **kwargs}
    with pytest.raises(GkdError, match=expected):
        generate_synthetic(tmp_path / "out", **args)


def test_refuses_to_overwrite_another_dataset(tmp_path):
    (tmp_path / "train.json").write_text("{}")
    with pytest.raises(GkdError, match="train.json: exists and is not a gkd synthetic dataset"):
        generate_synthetic(tmp_path, n_images=4, seed=0, image_size=64, val_fraction=0.25)
    assert (tmp_path / "train.json").read_text() == "{}"
    # a previous synthetic dataset is regenerated in place
    generate_synthetic(tmp_path / "s", n_images=4, seed=0, image_size=64, val_fraction=0.25)
    generate_synthetic(tmp_path / "s", n_images=4, seed=1, image_size=64, val_fraction=0.25)
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["seed"] == 1


def test_never_writes_into_a_folder_of_someone_elses_files(tmp_path):
    """A folder with the user's images but no train.json is not ours: nothing is overwritten (images/000000.png
    was, before), and gkd run data_root=... on a folder whose JSON has another name stops the same way."""
    user = tmp_path / "mine"
    (user / "images").mkdir(parents=True)
    (user / "images" / "000000.png").write_bytes(b"my photo")
    (user / "labels.json").write_text("{}")
    with pytest.raises(GkdError, match="holds files that are not gkd's synthetic data"):
        generate_synthetic(user, n_images=4, seed=0, image_size=64, val_fraction=0.25)
    assert (user / "images" / "000000.png").read_bytes() == b"my photo"
    assert sorted(p.name for p in user.rglob("*")) == ["000000.png", "images", "labels.json"]

    from gkd.pipeline import run_pipeline
    from gkd.run_config import load_pipeline_config

    cfg = load_pipeline_config(None, [f"data_root={user}", f"runs_dir={tmp_path / 'runs'}", "precisions=[]"])
    with pytest.raises(GkdError, match="holds files that are not gkd's synthetic data"):
        run_pipeline(cfg)
    assert (user / "images" / "000000.png").read_bytes() == b"my photo"


def test_cluttered_preset_is_the_first_world_byte_for_byte():
    """``preset="cluttered"`` draws what generator version 1 drew before presets existed (hash recorded from that
    code): the study's recorded numbers stay reproducible."""
    import hashlib

    h = hashlib.sha256()
    for i in range(5):
        pixels, objects = render_image(3, i, 160, preset="cluttered")
        h.update(pixels.tobytes())
        h.update(repr([o["bbox"] for o in objects]).encode())
    assert h.hexdigest() == "0087e6ad50873c6d46fa861d8129e9bdf0c52e340fb34490073da1e35eedf20c"


def test_clean_preset_has_fewer_small_objects_and_keeps_every_hard_case():
    def shares(preset):
        objs = [o for i in range(60) for o in render_image(5, i, 160, preset=preset)[1]]
        return {k: sum(o[k] for o in objs) / len(objs) for k in ("small", "occluded", "blurred", "noisy",
                                                                  "low_contrast")}

    clean, cluttered = shares("clean"), shares("cluttered")
    assert clean["small"] < 0.75 * cluttered["small"]
    assert all(v > 0.02 for v in clean.values()), clean  # the hard cases stay in the default world


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(GkdError, match="synthetic preset 'noisy': expected one of clean, cluttered"):
        generate_synthetic(tmp_path, n_images=4, preset="noisy")


def test_every_config_preset_is_a_world_and_the_quick_world_is_easy(tmp_path):
    """The config's preset names and the generator's worlds are one list; the quick world (gkd run --quick) has 3
    classes, 1-3 objects, none small and no hard case."""
    from gkd.kd.config import SYNTH_PRESETS
    from gkd.kd.data.synth import PRESETS

    assert tuple(PRESETS) == SYNTH_PRESETS
    info = generate_synthetic(tmp_path / "q", n_images=30, image_size=96, preset="quick", progress=False)
    assert info["classes"] == ["circle", "triangle", "cross"]
    counts = [len(render_image(0, i, 96, preset="quick")[1]) for i in range(30)]
    assert min(counts) >= 1 and max(counts) <= 3
    objects = [o for i in range(30) for o in render_image(0, i, 96, preset="quick")[1]]
    assert not any(o[k] for o in objects for k in ("small", "blurred", "noisy", "low_contrast"))
    assert {o["label"] for o in objects} == {0, 1, 2}


def test_regenerating_replaces_the_previous_dataset_entirely(tmp_path):
    """A smaller dataset generated where a larger one was: no image of the old one stays beside the new one's."""
    from gkd.kd.data import generate_synthetic

    generate_synthetic(tmp_path, n_images=12, seed=0, image_size=64)
    generate_synthetic(tmp_path, n_images=4, seed=1, image_size=64)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    again = tmp_path.parent / f"{tmp_path.name}-fresh"
    generate_synthetic(again, n_images=4, seed=1, image_size=64)
    for name in ("train.json", "val.json", "images/000003.png"):
        assert (tmp_path / name).read_bytes() == (again / name).read_bytes(), name
