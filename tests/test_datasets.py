"""Evaluation dataset readers (index/datasets.py): every layout on a tiny tree made here, the real
shared voc-sample / camvid-val folders read-only, and the label maps against their references."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index.datasets import DatasetSpec, EvalItem, dataset_spec, list_datasets, open_dataset, read_mask
from reco.errors import ConfigError, ImageDecodeError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IGNORE = 255

# The IIC / STEGO (src/data.py, Coco.fine_to_coarse) / ReCo (datasets/coco_stuff.py) table, raw
# COCO-Stuff id 0..181 -> coarse id, written out here independently of the data file it checks.
REFERENCE_FINE_TO_COARSE = (
    [9]
    + [11] * 8
    + [8] * 6
    + [7] * 10
    + [6] * 8
    + [10] * 10
    + [5] * 8
    + [2] * 10
    + [3] * 10
    + [0] * 6
    + [1] * 6
    + [4] * 8
    + [
        17,
        17,
        22,
        20,
        20,
        22,
        15,
        25,
        16,
        13,
        12,
        12,
        17,
        17,
        23,
        15,
        15,
        17,
        15,
        21,
        15,
        25,
        13,
        13,
        13,
        13,
        13,
        22,
        26,
        14,
        14,
        15,
        22,
        21,
        21,
        24,
        20,
        22,
        15,
        17,
        16,
        15,
        22,
        24,
        21,
        17,
        25,
        16,
        21,
        17,
        22,
        16,
        21,
        21,
        25,
        21,
        26,
        21,
        24,
        20,
        17,
        14,
        21,
        26,
        15,
        23,
        20,
        21,
        24,
        15,
        24,
        22,
        25,
        15,
        20,
        17,
        17,
        22,
        14,
        18,
        18,
        18,
        18,
        18,
        18,
        18,
        26,
        26,
        19,
        19,
        24,
    ]
)
COCO_UNUSED_RAW = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)  # 1-based 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91


# ----------------------------------------------------------------------------------------------
# fixture helpers


def _png(values, mode: str = "L") -> bytes:
    arr = np.asarray(values)
    if mode == "P":
        img = Image.fromarray(arr.astype(np.uint8), "P")
        img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    elif mode == "I;16":
        img = Image.fromarray(arr.astype(np.uint16))
    else:
        img = Image.fromarray(arr.astype(np.uint8), mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _rgb_png(r, g=None, b=None) -> bytes:
    r = np.asarray(r, dtype=np.uint8)
    g = np.zeros_like(r) if g is None else np.asarray(g, dtype=np.uint8)
    b = np.zeros_like(r) if b is None else np.asarray(b, dtype=np.uint8)
    return _png(np.stack([r, g, b], axis=-1), "RGB")


def _image(fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((2, 4, 3), 120, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _put(root: Path, rel: str, data) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)


def _read(spec: DatasetSpec, item: EvalItem) -> np.ndarray:
    return read_mask(spec, Path(item.mask_uri).read_bytes())


def _check(spec, items, root, ids, masks_expected):
    """ids in order; every item's URIs lie under root; each mask reads as expected."""
    assert [it.id for it in items] == ids
    for it, expected in zip(items, masks_expected, strict=True):
        assert Path(it.image_uri) == Path(root) / it.id
        assert Path(it.image_uri).is_file() and Path(it.mask_uri).is_file()
        got = _read(spec, it)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, np.asarray(expected))


# ----------------------------------------------------------------------------------------------
# registry and specs


def test_list_datasets_names():
    assert list_datasets() == [
        "voc",
        "context59",
        "context60",
        "cocostuff171",
        "cocostuff27",
        "cityscapes19",
        "cityscapes27",
        "kitti-step",
        "ade150",
        "camvid",
    ]


def test_unknown_dataset_is_config_error_listing_names(tmp_path):
    with pytest.raises(ConfigError) as e:
        open_dataset("pascal", tmp_path)
    for name in list_datasets():
        assert name in str(e.value)
    with pytest.raises(ConfigError):
        dataset_spec("cityscapes")


@pytest.mark.parametrize(
    "name,count",
    [
        ("voc", 21),
        ("context59", 59),
        ("context60", 60),
        ("cocostuff171", 171),
        ("cocostuff27", 27),
        ("cityscapes19", 19),
        ("cityscapes27", 27),
        ("kitti-step", 19),
        ("ade150", 150),
        ("camvid", 11),
    ],
)
def test_spec_lut_is_well_formed(name, count):
    spec = dataset_spec(name)
    assert spec.name == name and spec.num_classes == count == len(set(spec.classes))
    lut = spec.lut()
    assert lut.shape == (65536,) and lut.dtype == np.int64
    assert not lut.flags.writeable
    ok = (lut == spec.ignore_index) | ((lut >= 0) & (lut < count))
    assert ok.all()
    assert set(np.unique(lut[lut != IGNORE]).tolist()) == set(range(count))  # every class reachable
    assert (lut[256:] == IGNORE).all()


def test_dataset_spec_rejects_bad_maps():
    with pytest.raises(ValueError):
        DatasetSpec("x", ("a", "b"), ignore_index=1)
    with pytest.raises(ValueError):
        DatasetSpec("x", ("a", "b"), id_map=((0, 0), (0, 1)))
    with pytest.raises(ValueError):
        DatasetSpec("x", ("a", "b"), id_map=((3, 2),))
    identity = DatasetSpec("x", ("a", "b"))
    assert identity.lut()[:3].tolist() == [0, 1, IGNORE]


def test_cocostuff27_table_matches_the_reference_and_covers_all_171():
    fine, coarse = dataset_spec("cocostuff171"), dataset_spec("cocostuff27")
    assert len(REFERENCE_FINE_TO_COARSE) == 182
    lut171, lut27 = fine.lut(), coarse.lut()
    used = [r for r in range(182) if r not in COCO_UNUSED_RAW]
    assert len(used) == 171
    assert [int(lut171[r]) for r in used] == list(range(171))
    for r in COCO_UNUSED_RAW:
        assert lut171[r] == IGNORE and lut27[r] == IGNORE
    # each of the 171 fine classes maps to exactly one of the 27, the reference's one
    assert [int(lut27[r]) for r in used] == [REFERENCE_FINE_TO_COARSE[r] for r in used]
    # things (raw < 91) land in the 12 thing supercategories, stuff in the 15 stuff ones
    assert {int(lut27[r]) for r in used if r < 91} == set(range(12))
    assert {int(lut27[r]) for r in used if r >= 91} == set(range(12, 27))
    names = dict(zip(fine.classes, (coarse.classes[REFERENCE_FINE_TO_COARSE[r]] for r in used)))
    assert names["person"] == "person" and names["giraffe"] == "animal" and names["tv"] == "electronic"
    assert names["tree"] == "plant" and names["sky-other"] == "sky" and names["road"] == "ground"
    assert names["wall-brick"] == "wall" and names["window-blind"] == "window" and names["sea"] == "water"
    assert fine.classes[11] == "stop sign" and fine.classes[-1] == "wood" and fine.classes[80] == "banner"


def test_cityscapes_maps():
    cs19, cs27 = dataset_spec("cityscapes19"), dataset_spec("cityscapes27")
    lut19, lut27 = cs19.lut(), cs27.lut()
    trainid = {
        7: 0,
        8: 1,
        11: 2,
        12: 3,
        13: 4,
        17: 5,
        19: 6,
        20: 7,
        21: 8,
        22: 9,
        23: 10,
        24: 11,
        25: 12,
        26: 13,
        27: 14,
        28: 15,
        31: 16,
        32: 17,
        33: 18,
    }
    assert {i: int(lut19[i]) for i in range(34) if lut19[i] != IGNORE} == trainid
    assert cs19.classes[0] == "road" and cs19.classes[13] == "car" and cs19.classes[18] == "bicycle"
    assert [int(lut27[i]) for i in range(34)] == [IGNORE] * 7 + list(range(27))
    assert cs27.classes[2] == "parking" and cs27.classes[22] == "caravan" and cs27.classes[26] == "bicycle"
    assert dataset_spec("kitti-step").classes == cs19.classes


# ----------------------------------------------------------------------------------------------
# one tiny tree per dataset


def test_voc2012_layout(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    raw_a = [[0, 1, 15, 20], [255, 255, 0, 7]]
    raw_b = [[3, 3, 21, 200], [0, 0, 0, 255]]  # 21, 200: outside the map -> ignore
    for stem, raw in (("2007_000033", raw_a), ("2007_000042", raw_b)):
        _put(root, f"JPEGImages/{stem}.jpg", _image())
        _put(root, f"SegmentationClass/{stem}.png", _png(raw, "P"))
    _put(root, "JPEGImages/2007_000099.jpg", _image())  # in train only
    _put(root, "SegmentationClass/2007_000099.png", _png(raw_a, "P"))
    _put(root, "ImageSets/Segmentation/val.txt", "2007_000042\n2007_000033\n\n")
    _put(root, "ImageSets/Segmentation/train.txt", "2007_000099\n")
    spec, items = open_dataset("voc", root)
    assert spec.num_classes == 21 and spec.classes[15] == "person" and spec.ignore_index == IGNORE
    _check(
        spec,
        items,
        root,
        ["JPEGImages/2007_000042.jpg", "JPEGImages/2007_000033.jpg"],
        [[[3, 3, IGNORE, IGNORE], [0, 0, 0, IGNORE]], [[0, 1, 15, 20], [IGNORE, IGNORE, 0, 7]]],
    )
    # the devkit folder (or its parent) as root: ids stay relative to the root given
    spec2, items2 = open_dataset("voc", tmp_path, split="train")
    assert [it.id for it in items2] == ["VOCdevkit/VOC2012/JPEGImages/2007_000099.jpg"]
    assert spec2 == spec
    with pytest.raises(FileNotFoundError, match=r"trainval\.txt .*\(split lists there: train, val\)"):
        open_dataset("voc", root, split="trainval")


def test_voc_flat_layout_with_grey_and_palette_masks(tmp_path):
    _put(tmp_path, "images/a.jpg", _image())
    _put(tmp_path, "images/b.jpg", _image())
    _put(tmp_path, "masks/a.png", _png([[0, 12, 255, 20]], "P"))
    _put(tmp_path, "masks/b.png", _png([[5, 5, 21, 0]], "L"))
    _put(tmp_path, "masks/orphan.png", _png([[0]], "L"))  # a mask without image is not an item
    _put(tmp_path, ".hidden/x.jpg", _image())
    spec, items = open_dataset("voc", tmp_path, split="val")
    assert "flat" in spec.layout
    _check(spec, items, tmp_path, ["images/a.jpg", "images/b.jpg"], [[[0, 12, IGNORE, 20]], [[5, 5, IGNORE, 0]]])


@pytest.mark.parametrize("name", ["context59", "context60"])
def test_pascal_context_layout(tmp_path, name):
    root = tmp_path / "VOC2010"
    raw = {"2008_000002": [[0, 1, 59, 60]], "2008_000003": [[36, 37, 0, 255]]}
    for stem, values in raw.items():
        _put(root, f"JPEGImages/{stem}.jpg", _image())
        _put(root, f"SegmentationClassContext/{stem}.png", _png(values))
    _put(root, "ImageSets/SegmentationContext/val.txt", "2008_000002\n2008_000003\n")
    spec, items = open_dataset(name, tmp_path)
    ids = ["VOC2010/JPEGImages/2008_000002.jpg", "VOC2010/JPEGImages/2008_000003.jpg"]
    if name == "context59":
        assert spec.num_classes == 59 and spec.classes[0] == "aeroplane" and spec.classes[36] == "person"
        expected = [[[IGNORE, 0, 58, IGNORE]], [[35, 36, IGNORE, IGNORE]]]
    else:
        assert spec.num_classes == 60 and spec.classes[0] == "background" and spec.classes[37] == "person"
        expected = [[[0, 1, 59, IGNORE]], [[36, 37, 0, IGNORE]]]
    _check(spec, items, tmp_path, ids, expected)


def _coco_tree(root: Path) -> None:
    masks = {
        "000000000139": [[0, 11, 12, 90], [91, 168, 181, 255]],
        "000000000285": [[182, 23, 105, 149], [170, 2, 0, 0]],
    }
    for stem, values in masks.items():
        _put(root, f"images/val2017/{stem}.jpg", _image())
        _put(root, f"annotations/val2017/{stem}.png", _png(values))
        _put(root, f"annotations/val2017/{stem}_labelTrainIds.png", _png(np.zeros((2, 4))))  # mmseg output beside
    _put(root, "curated/val2017/Coco164kFull_Stuff_Coarse.txt", "000000000285\n")


def test_cocostuff171_layout(tmp_path):
    _coco_tree(tmp_path)
    spec, items = open_dataset("cocostuff171", tmp_path)
    assert spec.num_classes == 171
    # raw 11 (street sign, unused) -> ignore, 12 stop sign -> 11, 90 unused -> ignore, 91 banner -> 80,
    # 168 tree -> 157, 181 wood -> 170, 182 -> ignore, 23 giraffe -> 22, 105 clouds -> 94, 149 rock -> 138
    _check(
        spec,
        items,
        tmp_path,
        ["images/val2017/000000000139.jpg", "images/val2017/000000000285.jpg"],
        [[[0, IGNORE, 11, IGNORE], [80, 157, 170, IGNORE]], [[IGNORE, 22, 94, 138], [159, 2, 0, 0]]],
    )
    assert spec.classes[157] == "tree" and spec.classes[94] == "clouds" and spec.classes[159] == "wall-brick"


def test_cocostuff27_layout_and_curated_split(tmp_path):
    _coco_tree(tmp_path)
    spec, items = open_dataset("cocostuff27", tmp_path, split="val2017")
    assert spec.num_classes == 27 and spec.classes[9] == "person" and spec.classes[22] == "plant"
    # person -> person 9, stop sign -> outdoor 8, banner -> textile 17, tree -> plant 22, wood -> solid 24,
    # giraffe -> animal 7, clouds -> sky 23, rock -> solid 24, wall-brick -> wall 18, car -> vehicle 11
    _check(
        spec,
        items,
        tmp_path,
        ["images/val2017/000000000139.jpg", "images/val2017/000000000285.jpg"],
        [[[9, IGNORE, 8, IGNORE], [17, 22, 24, IGNORE]], [[IGNORE, 7, 23, 24], [18, 11, 9, 9]]],
    )
    spec_c, items_c = open_dataset("cocostuff27", tmp_path, split="curated-val")
    assert [it.id for it in items_c] == ["images/val2017/000000000285.jpg"] and "curated" in spec_c.layout
    with pytest.raises(FileNotFoundError, match="Coco164kFull_Stuff_Coarse_7"):
        open_dataset("cocostuff27", tmp_path, split="curated7-val")
    with pytest.raises(ConfigError, match="curated-val"):
        open_dataset("cocostuff27", tmp_path, split="test")


def test_cocostuff_only_mmseg_train_ids_is_explained(tmp_path):
    _put(tmp_path, "images/val2017/1.jpg", _image())
    _put(tmp_path, "annotations/val2017/1_labelTrainIds.png", _png([[0]]))
    with pytest.raises(FileNotFoundError, match="labelTrainIds.*raw stuffthingmaps"):
        open_dataset("cocostuff171", tmp_path)


def _cityscapes_tree(root: Path) -> None:
    frames = {
        "frankfurt/frankfurt_000000_000294": [[7, 26, 0, 33], [8, 11, 24, 255]],
        "lindau/lindau_000001_000019": [[9, 29, 30, 6], [23, 21, 34, 31]],
    }
    for frame, values in frames.items():
        _put(root, f"leftImg8bit/val/{frame}_leftImg8bit.png", _image("PNG"))
        _put(root, f"gtFine/val/{frame}_gtFine_labelIds.png", _png(values))
        _put(root, f"gtFine/val/{frame}_gtFine_color.png", _rgb_png([[1, 2, 3, 4]] * 2))
        _put(root, f"gtFine/val/{frame}_gtFine_labelTrainIds.png", _png(np.zeros((2, 4))))


CITYSCAPES_IDS = [
    "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png",
    "leftImg8bit/val/lindau/lindau_000001_000019_leftImg8bit.png",
]


def test_cityscapes19_layout(tmp_path):
    _cityscapes_tree(tmp_path)
    spec, items = open_dataset("cityscapes19", tmp_path)
    assert spec.num_classes == 19
    # road 7 -> 0, car 26 -> 13, 0 -> ignore, bicycle 33 -> 18, sidewalk 8 -> 1, building 11 -> 2,
    # person 24 -> 11; parking 9, caravan 29, trailer 30, ground 6 -> ignore; sky 23 -> 10,
    # vegetation 21 -> 8, 34 (not a labelId) -> ignore, train 31 -> 16
    _check(
        spec,
        items,
        tmp_path,
        CITYSCAPES_IDS,
        [[[0, 13, IGNORE, 18], [1, 2, 11, IGNORE]], [[IGNORE, IGNORE, IGNORE, IGNORE], [10, 8, IGNORE, 16]]],
    )
    assert items[0].mask_uri.endswith("gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png")


def test_cityscapes27_layout(tmp_path):
    _cityscapes_tree(tmp_path)
    spec, items = open_dataset("cityscapes27", tmp_path)
    assert spec.num_classes == 27
    _check(
        spec,
        items,
        tmp_path,
        CITYSCAPES_IDS,
        [[[0, 19, IGNORE, 26], [1, 4, 17, IGNORE]], [[2, 22, 23, IGNORE], [16, 14, IGNORE, 24]]],
    )
    with pytest.raises(FileNotFoundError, match="splits there: val"):
        open_dataset("cityscapes27", tmp_path, split="test")


@pytest.mark.parametrize("images_dir", ["images/val", "val"])
def test_kitti_step_layout_reads_the_red_channel(tmp_path, images_dir):
    sem = {"0002/000000": [[0, 13, 255, 18]], "0006/000011": [[10, 11, 19, 2]]}
    for frame, r in sem.items():
        _put(tmp_path, f"{images_dir}/{frame}.png", _image("PNG"))
        # G, B = instance id: must not leak into the semantic ids
        _put(tmp_path, f"panoptic_maps/val/{frame}.png", _rgb_png(r, [[0, 1, 0, 0]], [[0, 7, 0, 3]]))
    spec, items = open_dataset("kitti-step", tmp_path)
    assert spec.num_classes == 19 and spec.mask_channel == 0
    _check(
        spec,
        items,
        tmp_path,
        [f"{images_dir}/0002/000000.png", f"{images_dir}/0006/000011.png"],
        [[[0, 13, IGNORE, 18]], [[10, 11, IGNORE, 2]]],
    )
    # a semantic-only single-channel export reads as the ids themselves
    np.testing.assert_array_equal(read_mask(spec, _png([[3, 255, 40]])), [[3, IGNORE, IGNORE]])


def test_ade150_layout(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for stem, values in (("ADE_val_00000001", [[0, 1, 150, 151]]), ("ADE_val_00000002", [[13, 2, 0, 255]])):
        _put(root, f"images/validation/{stem}.jpg", _image())
        _put(root, f"annotations/validation/{stem}.png", _png(values))
    _put(root, "images/training/ADE_train_00000001.jpg", _image())
    _put(root, "annotations/training/ADE_train_00000001.png", _png([[1]]))
    spec, items = open_dataset("ade150", tmp_path, split="val")
    assert spec.num_classes == 150 and spec.classes[0] == "wall" and spec.classes[12] == "person"
    assert spec.classes[7] == "bed"
    _check(
        spec,
        items,
        tmp_path,
        [
            "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg",
            "ADEChallengeData2016/images/validation/ADE_val_00000002.jpg",
        ],
        [[[IGNORE, 0, 149, IGNORE]], [[12, 1, IGNORE, IGNORE]]],
    )
    _, train = open_dataset("ade150", root, split="training")
    assert [it.id for it in train] == ["images/training/ADE_train_00000001.jpg"]


def test_camvid_flat_layout_and_classes_txt(tmp_path):
    _put(tmp_path, "images/0001TP_006690.jpg", _image())
    _put(tmp_path, "images/0001TP_006720.jpg", _image())
    _put(tmp_path, "masks/0001TP_006690.png", _png([[0, 10, 11, 3]]))
    _put(tmp_path, "masks/0001TP_006720.png", _png([[8, 9, 12, 255]]))
    names = [
        "Sky",
        "Building",
        "Pole",
        "Road",
        "Pavement",
        "Tree",
        "SignSymbol",
        "Fence",
        "Car",
        "Pedestrian",
        "Bicyclist",
    ]
    _put(tmp_path, "classes.txt", "\n".join(names) + "\n")
    spec, items = open_dataset("camvid", tmp_path)
    assert spec.classes == tuple(names)  # the folder's own names
    _check(
        spec,
        items,
        tmp_path,
        ["images/0001TP_006690.jpg", "images/0001TP_006720.jpg"],
        [[[0, 10, IGNORE, 3]], [[8, 9, IGNORE, IGNORE]]],
    )
    _put(tmp_path, "classes.txt", "sky\nroad\n")
    with pytest.raises(ConfigError, match="lists 2 classes"):
        open_dataset("camvid", tmp_path)


def test_camvid_segnet_layout(tmp_path):
    root = tmp_path / "CamVid"
    for split in ("val", "test"):
        for stem in ("0016E5_07959", "0016E5_07961"):
            _put(root, f"{split}/{stem}.png", _image("PNG"))
            _put(root, f"{split}annot/{stem}.png", _png([[1, 11], [4, 6]]))
    _put(root, "train/x.png", _image("PNG"))
    spec, items = open_dataset("camvid", tmp_path, split="test")
    assert spec.classes[6] == "sign symbol" and "SegNet" in spec.layout
    _check(
        spec,
        items,
        tmp_path,
        ["CamVid/test/0016E5_07959.png", "CamVid/test/0016E5_07961.png"],
        [[[1, IGNORE], [4, 6]]] * 2,
    )
    with pytest.raises(FileNotFoundError, match="train/ \\+ trainannot/"):
        open_dataset("camvid", tmp_path, split="train")


# ----------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "name,needle",
    [
        ("voc", "SegmentationClass/"),
        ("context59", "SegmentationClassContext/"),
        ("cocostuff27", "images/val2017"),
        ("cityscapes19", "leftImg8bit/"),
        ("kitti-step", "panoptic_maps/"),
        ("ade150", "annotations/"),
        ("camvid", "images/ + masks/"),
    ],
)
def test_wrong_layout_names_root_dataset_and_expectation(tmp_path, name, needle):
    _put(tmp_path, "something/else.jpg", _image())
    with pytest.raises(FileNotFoundError) as e:
        open_dataset(name, tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and name in msg and needle in msg and "expected" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(name, tmp_path / "nowhere")


def test_voc_error_message_names_both_layouts(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        open_dataset("voc", tmp_path)
    msg = str(e.value)
    assert f"no SegmentationClass/ under {tmp_path}" in msg
    assert "JPEGImages/" in msg and "ImageSets/Segmentation/val.txt" in msg and "images/ + masks/" in msg


def test_images_without_masks_are_listed(tmp_path):
    for i in range(8):
        _put(tmp_path, f"images/{i}.jpg", _image())
    _put(tmp_path, "masks/0.png", _png([[0]]))
    with pytest.raises(FileNotFoundError) as e:
        open_dataset("camvid", tmp_path)
    msg = str(e.value)
    assert "7 of 8 images have no mask" in msg and "images/1.jpg (expected masks/1.png)" in msg
    assert "and 2 more" in msg


def test_listed_image_missing_is_an_error(tmp_path):
    _put(tmp_path, "JPEGImages/a.jpg", _image())
    _put(tmp_path, "SegmentationClass/a.png", _png([[0]]))
    _put(tmp_path, "ImageSets/Segmentation/val.txt", "a\nb\n")
    with pytest.raises(FileNotFoundError, match="1 of 2 listed images do not exist: b"):
        open_dataset("voc", tmp_path)


def test_empty_image_folder_is_an_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        open_dataset("voc", tmp_path)


def test_read_mask_rejects_colour_and_garbage():
    voc = dataset_spec("voc")
    with pytest.raises(ImageDecodeError, match="colour"):
        read_mask(voc, _rgb_png([[128, 0]], [[0, 128]], [[0, 0]]))  # VOC colour-coded: aeroplane, bicycle
    with pytest.raises(ImageDecodeError):
        read_mask(voc, b"")
    with pytest.raises(ImageDecodeError):
        read_mask(voc, b"not a png at all")
    with pytest.raises(ImageDecodeError):
        read_mask(voc, _png([[1, 2, 3, 4]])[:40])  # truncated
    # a grey mask saved as RGB (equal channels) is read as ids
    np.testing.assert_array_equal(read_mask(voc, _rgb_png([[1, 255]], [[1, 255]], [[1, 255]])), [[1, IGNORE]])


def test_read_mask_16bit_values_beyond_the_map_are_ignored():
    ade = dataset_spec("ade150")
    got = read_mask(ade, _png([[0, 1, 150, 151, 300, 65535]], "I;16"))
    np.testing.assert_array_equal(got, [[IGNORE, 0, 149, IGNORE, IGNORE, IGNORE]])


# ----------------------------------------------------------------------------------------------
# fsspec URLs


def test_fsspec_url_root(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    base = f"/reco-datasets-{uuid.uuid4().hex}"
    try:
        files = {
            "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png": _image("PNG"),
            "gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png": _png([[7, 26, 0]]),
            "leftImg8bit/val/bonn/bonn_000001_000019_leftImg8bit.png": _image("PNG"),
            "gtFine/val/bonn/bonn_000001_000019_gtFine_labelIds.png": _png([[33, 24, 255]]),
        }
        for rel, data in files.items():
            fs.pipe(f"{base}/{rel}", data)
        root = f"memory://{base}"
        spec, items = open_dataset("cityscapes19", root, storage_options={})
        assert [it.id for it in items] == [
            "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png",
            "leftImg8bit/val/bonn/bonn_000001_000019_leftImg8bit.png",
        ]
        assert items[0].image_uri == f"{root}/{items[0].id}"
        assert items[1].mask_uri == f"{root}/gtFine/val/bonn/bonn_000001_000019_gtFine_labelIds.png"
        masks = [read_mask(spec, fs.cat(it.mask_uri.removeprefix("memory://"))) for it in items]
        np.testing.assert_array_equal(masks[0], [[0, 13, IGNORE]])
        np.testing.assert_array_equal(masks[1], [[18, 11, IGNORE]])
        # a split list read through fsspec too
        fs.pipe(f"{base}/voc/JPEGImages/x.jpg", _image())
        fs.pipe(f"{base}/voc/SegmentationClass/x.png", _png([[15]], "P"))
        fs.pipe(f"{base}/voc/ImageSets/Segmentation/val.txt", b"x\n")
        spec, items = open_dataset("voc", f"{root}/voc")
        assert [it.id for it in items] == ["JPEGImages/x.jpg"]
        with pytest.raises(FileNotFoundError, match="expected"):
            open_dataset("ade150", root)
    finally:
        fs.rm(base, recursive=True)


# ----------------------------------------------------------------------------------------------
# the real shared data (read-only)


@pytest.mark.skipif(not (SHARED_DATA / "voc-sample").is_dir(), reason="shared voc-sample absent")
def test_real_voc_sample_opens_and_reads():
    root = SHARED_DATA / "voc-sample"
    spec, items = open_dataset("voc", root)
    assert len(items) == 18 and spec.num_classes == 21
    assert spec.classes == tuple(
        line.strip() for line in (root / "classes.txt").read_text().splitlines() if line.strip()
    )
    assert all(it.id.startswith("images/") for it in items)
    seen = set()
    for it in items:
        m = _read(spec, it)
        with Image.open(it.image_uri) as img:
            assert m.shape == (img.height, img.width)
        seen |= set(np.unique(m).tolist())
    assert IGNORE in seen and seen - {IGNORE} <= set(range(21)) and len(seen) > 5


@pytest.mark.skipif(not (SHARED_DATA / "camvid-val").is_dir(), reason="shared camvid-val absent")
def test_real_camvid_val_opens_and_reads():
    root = SHARED_DATA / "camvid-val"
    spec, items = open_dataset("camvid", root)
    assert len(items) == 101 and spec.num_classes == 11 and spec.classes[0] == "sky"
    seen = set()
    for it in items[::10]:
        m = _read(spec, it)
        assert m.shape == (360, 480)
        seen |= set(np.unique(m).tolist())
    assert seen - {IGNORE} <= set(range(11)) and len(seen - {IGNORE}) >= 8
