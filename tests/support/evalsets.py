"""Tiny copies of the 27 evaluation datasets in their real on-disk formats (no tests here).

Each `write_<key>(root)` writes the dataset's folder under `root` (the common `--root DIR`) with 8x8 images and
returns {split: [expected class name of each sample]}, the names as the registry spells them (for VOC 2007: a
sorted tuple of names per image). Classes get different sample counts, and class lists inside metadata files are
written in another order than the registry's wherever the format has such a list, so a label mapped by position
instead of by name changes the multiset of names and fails the test.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

Expected = dict[str, list]


def image(path: Path, value: int = 128, size: int = 8, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.full((size, size, 3), value % 256, dtype=np.uint8)
    rgb[0, 0] = (value * 7 % 256, 30, 200)
    Image.fromarray(rgb).save(path, format=fmt)
    return path


def _text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_food101(root: Path) -> Expected:
    base = root / "food-101"
    plan = {"train": {"apple_pie": 2, "hot_dog": 1}, "test": {"hot_dog": 2, "apple_pie": 1, "waffles": 1}}
    out = {}
    for split, counts in plan.items():
        meta = {name: [f"{name}/{split}{i}" for i in range(n)] for name, n in counts.items()}
        for paths in meta.values():
            for rel in paths:
                image(base / "images" / f"{rel}.jpg")
        _text(base / "meta" / f"{split}.json", json.dumps(meta))
        out[split] = [name.replace("_", " ") for name, n in counts.items() for _ in range(n)]
    return out


def _cifar_batch(path: Path, labels: list[int], labels_key: str) -> None:
    data = np.random.default_rng(len(labels)).integers(0, 255, (len(labels), 3072), dtype=np.uint8)
    path.write_bytes(pickle.dumps({"data": data, labels_key: labels, "batch_label": b"x"}))


def write_cifar10(root: Path) -> Expected:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_cases_per_batch": 2}))
    train = [[0, 1], [2], [3, 3], [9], [8]]
    for i, labels in enumerate(train, 1):
        _cifar_batch(base / f"data_batch_{i}", labels, "labels")
    _cifar_batch(base / "test_batch", [5, 5, 6], "labels")
    return {"train": [names[y] for b in train for y in b], "test": ["dog", "dog", "frog"]}


def write_cifar100(root: Path, registry_names: list[str]) -> Expected:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    names = [n.replace(" ", "_") for n in reversed(registry_names)]  # not the registry's order
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": ["x"]}))
    _cifar_batch(base / "train", [0, 1, 1], "fine_labels")
    _cifar_batch(base / "test", [names.index("aquarium_fish")] * 2 + [names.index("lawn_mower")], "fine_labels")
    return {"train": ["worm", "woman", "woman"], "test": ["aquarium fish", "aquarium fish", "lawn mower"]}


def write_birdsnap(root: Path) -> Expected:
    base = root / "birdsnap"
    species = [("1", "Allen's Hummingbird", "Selasphorus sasin", "Allens_Hummingbird"),
               ("2", "Black-and-white Warbler", "Mniotilta varia", "Black_and_white_Warbler")]
    _text(base / "species.txt", "id\tcommon\tscientific\tdir\n" + "".join("\t".join(s) + "\n" for s in species))
    rows = [("Allens_Hummingbird/a.jpg", "1"), ("Allens_Hummingbird/b.jpg", "1"),
            ("Black_and_white_Warbler/c.jpg", "2"), ("Black_and_white_Warbler/gone.jpg", "2")]
    lines = ["url\tmd5\tpath\tspecies_id\tbb_x1\tbb_y1\tbb_x2\tbb_y2"]
    lines += [f"http://x/{i}.jpg\t0\t{path}\t{sid}\t0\t0\t4\t4" for i, (path, sid) in enumerate(rows)]
    _text(base / "images.txt", "\n".join(lines) + "\n")
    _text(base / "test_images.txt", "path\nAllens_Hummingbird/b.jpg\n")
    for path, _ in rows[:3]:  # gone.jpg was never downloaded
        image(base / "download" / "images" / path)
    return {"train": ["Allens Hummingbird", "Black and white Warbler"], "test": ["Allens Hummingbird"]}


def write_sun397(root: Path) -> Expected:
    base = root / "SUN397"
    _text(base / "ClassName.txt", "/a/abbey\n/a/apartment_building/outdoor\n/c/childs_room\n")
    train = ["/a/abbey/sun_a.jpg", "/a/apartment_building/outdoor/sun_b.jpg", "/a/apartment_building/outdoor/sun_c.jpg"]
    test = ["/c/childs_room/sun_d.jpg"]
    for rel in train + test:
        image(base / rel.strip("/"))
    _text(base / "Partitions" / "Training_01.txt", "\n".join(train) + "\n")
    _text(base / "Partitions" / "Testing_01.txt", "\n".join(test) + "\n")
    return {"train": ["abbey", "apartment building outdoor", "apartment building outdoor"], "test": ["childs room"]}


def write_stanford_cars(root: Path) -> Expected:
    from scipy.io import savemat

    base = root / "stanford_cars"
    names = ["smart fortwo Convertible 2012", "AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012"]
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([names], dtype=object)})
    fields = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]

    def annos(path: Path, folder: str, classes: list[int]) -> None:
        rows = np.array([(0, 0, 4, 4, c, f"{i:05d}.jpg") for i, c in enumerate(classes)], dtype=fields)
        savemat(path, {"annotations": rows.reshape(1, -1)})
        for i in range(len(classes)):
            image(base / folder / f"{i:05d}.jpg")

    annos(base / "devkit" / "cars_train_annos.mat", "cars_train", [1, 2, 2])
    annos(base / "cars_test_annos_withlabels.mat", "cars_test", [3, 1])
    return {"train": [names[0], names[1], names[1]], "test": [names[2], names[0]]}


def write_fgvc_aircraft(root: Path) -> Expected:
    base = root / "fgvc-aircraft-2013b" / "data"
    _text(base / "variants.txt", "F/A-18\n707-320\nBAE 146-200\n")
    plan = {"train": ["707-320", "F/A-18", "F/A-18"], "val": ["BAE 146-200"], "test": ["F/A-18", "707-320"]}
    n = 0
    for split, names in plan.items():
        lines = []
        for name in names:
            n += 1
            image(base / "images" / f"{n:07d}.jpg")
            lines.append(f"{n:07d} {name}")
        _text(base / f"images_variant_{split}.txt", "\n".join(lines) + "\n")
    return plan


def write_voc2007(root: Path) -> Expected:
    base = root / "VOCdevkit" / "VOC2007"
    images = {"000001": [("dog", 0), ("person", 0)], "000002": [("tvmonitor", 0), ("cat", 1)],
              "000003": [("diningtable", 0)], "000004": [("dog", 0)]}
    for image_id, objects in images.items():
        image(base / "JPEGImages" / f"{image_id}.jpg")
        objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
                       f"<xmax>4</xmax><ymax>4</ymax></bndbox></object>" for n, d in objects)
        _text(base / "Annotations" / f"{image_id}.xml",
              f"<annotation><filename>{image_id}.jpg</filename><size><width>8</width><height>8</height>"
              f"<depth>3</depth></size>{objs}</annotation>")
    splits = {"train": ["000001"], "val": ["000004"], "test": ["000002", "000003", "000004"]}
    for split, ids in splits.items():
        _text(base / "ImageSets" / "Main" / f"{split}.txt", "\n".join(ids) + "\n")
    return {split: [tuple(sorted(n for n, d in images[i] if not d)) for i in ids] for split, ids in splits.items()}


def write_dtd(root: Path) -> Expected:
    base = root / "dtd" / "dtd"
    plan = {"train": ["zigzagged", "banded", "banded"], "val": ["polka-dotted"], "test": ["banded", "zigzagged"]}
    for split, names in plan.items():
        lines = []
        for i, name in enumerate(names):
            rel = f"{name}/{name}_{split}{i}.jpg"
            image(base / "images" / rel)
            lines.append(rel)
        _text(base / "labels" / f"{split}1.txt", "\n".join(lines) + "\n")
    return plan


def write_oxford_pets(root: Path) -> Expected:
    base = root / "oxford-iiit-pet"
    breeds = {"Abyssinian": (1, 1), "german_shorthaired": (20, 2), "yorkshire_terrier": (37, 2)}
    plan = {"trainval": ["german_shorthaired", "german_shorthaired", "Abyssinian"], "test": ["yorkshire_terrier"]}
    for split, names in plan.items():
        lines = []
        for i, name in enumerate(names):
            image(base / "images" / f"{name}_{split}{i}.jpg")
            class_id, species = breeds[name]
            lines.append(f"{name}_{split}{i} {class_id} {species} 1")
        _text(base / "annotations" / f"{split}.txt", "\n".join(lines) + "\n")
    return {"train": ["german shorthaired", "german shorthaired", "Abyssinian"], "test": ["yorkshire terrier"]}


def write_caltech101(root: Path) -> Expected:
    base = root / "caltech101" / "101_ObjectCategories"
    counts = {"BACKGROUND_Google": 31, "Faces_easy": 32, "car_side": 30}
    for folder, n in counts.items():
        for i in range(n):
            image(base / folder / f"image_{i + 1:04d}.jpg", value=i)
    names = {"BACKGROUND_Google": "background", "Faces_easy": "centered face", "car_side": "side of a car"}
    return {"train": [names[f] for f in counts for _ in range(30)],
            "test": [names[f] for f, n in counts.items() for _ in range(n - 30)]}


def write_flowers102(root: Path) -> Expected:
    from scipy.io import savemat

    base = root / "flowers-102"
    labels = [1, 102, 102, 50, 1]  # 1-based, as in imagelabels.mat
    for i in range(len(labels)):
        image(base / "jpg" / f"image_{i + 1:05d}.jpg")
    savemat(base / "imagelabels.mat", {"labels": np.array([labels])})
    savemat(base / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[4, 5]]),
                                 "tstid": np.array([[3, 4, 5]])})
    return {"train": ["pink primrose", "blackberry lily"], "val": ["common dandelion", "pink primrose"],
            "test": ["blackberry lily", "common dandelion", "pink primrose"]}


def _idx(path: Path, magic: int, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path) -> Expected:
    raw = root / "MNIST" / "raw"
    plan = {"train": [3, 1, 1], "t10k": [7, 0]}
    for prefix, labels in plan.items():
        _idx(raw / f"{prefix}-images-idx3-ubyte", 2051, np.full((len(labels), 28, 28), 200, dtype=np.uint8))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", 2049, np.array(labels, dtype=np.uint8))
    return {"train": ["3", "1", "1"], "test": ["7", "0"]}


def write_fer2013(root: Path) -> Expected:
    rows = [(3, "Training"), (3, "Training"), (0, "Training"), (6, "PublicTest"), (5, "PrivateTest")]
    path = root / "fer2013" / "fer2013.csv"
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["emotion", "pixels", "Usage"])
        for emotion, usage in rows:
            writer.writerow([emotion, " ".join(str((i * 5) % 256) for i in range(48 * 48)), usage])
    return {"train": ["happy", "happy", "angry"], "val": ["neutral"], "test": ["surprised"]}


def write_stl10(root: Path) -> Expected:
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    _text(base / "class_names.txt", "\n".join(names) + "\n")
    plan = {"train": [8, 8, 1], "test": [10, 2]}  # 1-based labels, as in the release
    for split, labels in plan.items():
        (base / f"{split}_X.bin").write_bytes(np.full((len(labels), 3, 96, 96), 99, np.uint8).tobytes())
        (base / f"{split}_y.bin").write_bytes(np.array(labels, np.uint8).tobytes())
    return {split: [names[y - 1] for y in labels] for split, labels in plan.items()}


def write_eurosat(root: Path) -> Expected:
    base = root / "eurosat" / "2750"
    counts = {"HerbaceousVegetation": 7, "SeaLake": 5, "AnnualCrop": 3}
    for folder, n in counts.items():
        for i in range(n):
            image(base / folder / f"{folder}_{i + 1}.jpg", value=i * 20)
    names = {"HerbaceousVegetation": "brushland or shrubland", "SeaLake": "lake or sea",
             "AnnualCrop": "annual crop land"}
    return {"all": [names[f] for f, n in counts.items() for _ in range(n)]}


def write_resisc45(root: Path) -> Expected:
    base = root / "NWPU-RESISC45"
    counts = {"thermal_power_station": 6, "sea_ice": 4, "airplane": 2}
    for folder, n in counts.items():
        for i in range(n):
            image(base / folder / f"{folder}_{i + 1:03d}.jpg")
    return {"all": [f.replace("_", " ") for f, n in counts.items() for _ in range(n)]}


def write_gtsrb(root: Path) -> Expected:
    base = root / "gtsrb"
    train = {"00014": 2, "00042": 1}  # no 00000 folder: position among present folders is not the class id
    for folder, n in train.items():
        for i in range(n):
            image(base / "GTSRB" / "Training" / folder / f"00000_{i:05d}.ppm", fmt="PPM")
        _text(base / "GTSRB" / "Training" / folder / f"GT-{folder}.csv", "Filename;ClassId\n")
    rows = [("00000.ppm", 2), ("00001.ppm", 14)]
    for name, _ in rows:
        image(base / "GTSRB" / "Final_Test" / "Images" / name, fmt="PPM")
    _text(base / "GT-final_test.csv", "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
          + "".join(f"{n};8;8;0;0;7;7;{c}\n" for n, c in rows))
    stop, end = "stop", "white circle with gray strike bar indicating no passing for trucks has ended"
    return {"train": [stop, stop, end], "test": ["red and white circle 50 kph speed limit", stop]}


def write_kitti(root: Path) -> tuple[Expected, dict[str, str]]:
    """KITTI object labels; returns ({'all': names}, {image id: expected name})."""
    base = root / "kitti" / "training"
    scenes = {  # objects: (type, z distance in metres)
        "000000": [("Car", 5.0), ("Pedestrian", 2.0)], "000001": [("Van", 12.0), ("Truck", 30.0)],
        "000002": [("Truck", 45.0)], "000003": [("Pedestrian", 3.0), ("DontCare", -1000.0)],
        "000004": [("Car", 8.0)], "000005": [("Cyclist", 4.0)],
    }
    classes = ["a photo i took of a car on my left or right side.", "a photo i took with a car nearby.",
               "a photo i took with a car in the distance.", "a photo i took with no car."]
    expected = {"000000": 0, "000001": 1, "000002": 2, "000003": 3, "000004": 0, "000005": 3}
    for image_id, objects in scenes.items():
        image(base / "image_2" / f"{image_id}.png")
        _text(base / "label_2" / f"{image_id}.txt", "".join(
            f"{kind} 0.00 0 -1.57 10.0 20.0 30.0 40.0 1.5 1.6 3.9 1.0 1.7 {z:.2f} 0.01\n" for kind, z in objects))
    by_id = {image_id: classes[label] for image_id, label in expected.items()}
    return {"all": list(by_id.values())}, by_id


def write_country211(root: Path) -> Expected:
    base = root / "country211"
    plan = {"train": {"XK": 2, "AD": 1}, "valid": {"CI": 1}, "test": {"ZW": 1, "US": 2}}
    names = {"XK": "Kosovo", "AD": "Andorra", "CI": "Cote d'Ivoire", "ZW": "Zimbabwe", "US": "United States"}
    for split, counts in plan.items():
        for code, n in counts.items():
            for i in range(n):
                image(base / split / code / f"{i}.jpg")
    return {("val" if s == "valid" else s): [names[c] for c, n in counts.items() for _ in range(n)]
            for s, counts in plan.items()}


def write_pcam(root: Path) -> Expected:
    import h5py

    base = root / "pcam"
    base.mkdir(parents=True)
    plan = {"train": [1, 0, 0], "valid": [1], "test": [0, 1, 1]}
    for split, labels in plan.items():
        with h5py.File(base / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
            f.create_dataset("x", data=np.full((len(labels), 96, 96, 3), 150, np.uint8))
        with h5py.File(base / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            f.create_dataset("y", data=np.array(labels, np.uint8).reshape(-1, 1, 1, 1))
    names = ["lymph node", "lymph node containing metastatic tumor tissue"]
    return {("val" if s == "valid" else s): [names[y] for y in labels] for s, labels in plan.items()}


def video(path: Path, frames: int = 5, size: int = 16, codec: str = "mpeg4") -> Path:
    """A small real video: frame i is a flat grey of value 40 * i (so the middle frame is recognisable)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=5)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 40 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_ucf101(root: Path) -> Expected:
    base = root / "ucf101"
    plan = {"train": ["ApplyEyeMakeup", "HandstandPushups", "HandstandPushups"], "test": ["YoYo"]}
    lists = {}
    for split, folders in plan.items():
        lines = []
        for i, folder in enumerate(folders):
            rel = f"{folder}/v_{folder}_g{i + 1:02d}_c01.avi"
            video(base / "UCF-101" / rel)
            lines.append(f"{rel} 1" if split == "train" else rel)
        lists[split] = lines
    _text(base / "ucfTrainTestlist" / "trainlist01.txt", "\n".join(lists["train"]) + "\n")
    _text(base / "ucfTrainTestlist" / "testlist01.txt", "\n".join(lists["test"]) + "\n")
    _text(base / "ucfTrainTestlist" / "classInd.txt", "1 ApplyEyeMakeup\n37 HandstandPushups\n101 YoYo\n")
    return {"train": ["Apply Eye Makeup", "Hand Stand Pushups", "Hand Stand Pushups"], "test": ["Yo Yo"]}


def write_kinetics700(root: Path) -> Expected:
    base = root / "kinetics700"
    plan = {"train": ["abseiling", "abseiling", "zumba"], "val": ["yoga", "zumba"]}
    for split, labels in plan.items():
        for i, label in enumerate(labels):
            video(base / split / label / f"vid{i}abcdefg_{i:06d}_{i + 10:06d}.mp4", frames=7, codec="libx264")
    return {"train": plan["train"], "test": plan["val"]}


def write_clevr_counts(root: Path) -> Expected:
    base = root / "clevr" / "CLEVR_v1.0"
    plan = {"train": [3, 10, 10], "val": [5]}
    for split, counts in plan.items():
        scenes = []
        for i, n in enumerate(counts):
            name = f"CLEVR_{split}_{i:06d}.png"
            image(base / "images" / split / name)
            scenes.append({"image_index": i, "image_filename": name, "objects": [{"shape": "cube"}] * n})
        _text(base / "scenes" / f"CLEVR_{split}_scenes.json", json.dumps({"info": {}, "scenes": scenes}))
    return {"train": ["3", "10", "10"], "test": ["5"]}


def write_hateful_memes(root: Path) -> Expected:
    base = root / "hateful_memes"
    plan = {"train": [0, 1, 1], "dev_seen": [1, 0]}
    for split, labels in plan.items():
        rows = []
        for i, label in enumerate(labels):
            image(base / "img" / f"{split}{i}.png")
            rows.append(json.dumps({"id": i, "img": f"img/{split}{i}.png", "label": label, "text": "words"}))
        _text(base / f"{split}.jsonl", "\n".join(rows) + "\n")
    names = ["meme", "hatespeech meme"]
    return {"train": [names[y] for y in plan["train"]], "test": [names[y] for y in plan["dev_seen"]]}


def write_rendered_sst2(root: Path) -> Expected:
    base = root / "rendered-sst2"
    plan = {"train": {"negative": 1, "positive": 2}, "valid": {"positive": 1, "negative": 1},
            "test": {"negative": 2, "positive": 1}}
    for split, counts in plan.items():
        for name in ("negative", "positive"):
            (base / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(counts[name]):
                image(base / split / name / f"{i}.png")
    return {("val" if s == "valid" else s): [n for n in ("negative", "positive") for _ in range(c[n])]
            for s, c in plan.items()}


def write_imagenet(root: Path) -> Expected:
    base = root / "imagenet"
    plan = {"train": {"n01440764": 1, "n15075141": 2}, "val": {"n01443537": 2}}
    for split, counts in plan.items():
        for wnid, n in counts.items():
            for i in range(n):
                image(base / split / wnid / f"ILSVRC2012_{split}_{i:08d}.JPEG", fmt="JPEG")
    names = {"n01440764": "tench", "n15075141": "toilet paper", "n01443537": "goldfish"}
    return {("test" if s == "val" else s): [names[w] for w, n in c.items() for _ in range(n)]
            for s, c in plan.items()}


def write_webdataset(root: Path, split: str = "test") -> Expected:
    """CLIP_benchmark's layout: classnames.txt, templates, <split>/nshards.txt and <split>/<i>.tar."""
    names = ["cat", "dog", "tiny bird"]
    _text(root / "classnames.txt", "\n".join(names) + "\n")
    _text(root / "zeroshot_classification_templates.txt", "a photo of a {c}.\na drawing of a {c}.\n")
    shards = [[("s0", 2, "webp"), ("s1", 0, "jpg")], [("s2", 2, "png")]]
    (root / split).mkdir(parents=True)
    _text(root / split / "nshards.txt", f"{len(shards)}\n")
    for number, samples in enumerate(shards):
        with tarfile.open(root / split / f"{number}.tar", "w") as tar:
            for key, label, ext in samples:
                buffer = io.BytesIO()
                Image.new("RGB", (8, 8), (label * 60, 10, 10)).save(buffer, format="WEBP" if ext == "webp" else
                                                                     "JPEG" if ext == "jpg" else "PNG")
                for name, payload in ((f"{key}.{ext}", buffer.getvalue()), (f"{key}.cls", f"{label}\n".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return {split: [names[label] for samples in shards for _, label, _ in samples]}


# -- the natural distribution shift sets (clip.evalsets.imagenet_shifts), each in its release layout -----------
# Each writer returns {"test": [expected class name(s) of each sample], "imagenet_indices": [the zero-shot subset]};
# `values` set the images' grey levels (tests/test_shift.py's toy encoder reads them back as sample ids).


def _imagenet_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from clip.evalsets import get_dataset

    entry = get_dataset("imagenet")
    return entry.classes, entry.class_ids


def _folders(base: Path, plan: dict[str, list[int]], suffix: str, fmt: str) -> None:
    for folder, values in plan.items():
        for i, value in enumerate(values):
            image(base / folder / f"{folder}_{i}{suffix}", value, fmt=fmt)


def write_imagenetv2(root: Path) -> Expected:
    """Folders are ImageNet class indices, not zero-padded (so "10" sorts before "9" on disk)."""
    classes, _ = _imagenet_names()
    plan = {"0": [1, 2], "10": [3], "9": [4], "999": [5]}
    _folders(root / "imagenetv2-matched-frequency-format-val", plan, ".jpeg", "JPEG")
    return {"test": [classes[int(f)] for f, v in plan.items() for _ in v], "imagenet_indices": list(range(1000))}


def write_imagenet_sketch(root: Path) -> Expected:
    classes, wnids = _imagenet_names()
    plan = {"n15075141": [1, 2], "n01440764": [3]}  # toilet paper (999), tench (0)
    _folders(root / "sketch", plan, ".JPEG", "JPEG")
    return {"test": [classes[wnids.index(w)] for w, v in plan.items() for _ in v],
            "imagenet_indices": list(range(1000))}


def write_imagenet_r(root: Path, plan: dict[str, list[int]] | None = None) -> Expected:
    """Three of ImageNet-R's wnids: goldfish (ImageNet index 1), hammerhead shark (4), ostrich (9)."""
    classes, wnids = _imagenet_names()
    plan = plan or {"n01443537": [100, 120, 140], "n01494475": [160], "n01518878": [180]}
    _folders(root / "imagenet-r", plan, ".jpg", "JPEG")
    return {"test": [classes[wnids.index(w)] for w, v in plan.items() for _ in v],
            "imagenet_indices": sorted(wnids.index(w) for w in plan)}


def write_imagenet_a(root: Path) -> Expected:
    """Two of ImageNet-A's wnids, broccoli (937) and junco (13), and the release's README.txt beside them."""
    classes, wnids = _imagenet_names()
    plan = {"n07714990": [200], "n01534433": [220, 240]}
    _folders(root / "imagenet-a", plan, ".jpg", "JPEG")
    _text(root / "imagenet-a" / "README.txt", "ImageNet-A: 200 classes, one folder per wnid.\n")
    return {"test": [classes[wnids.index(w)] for w, v in plan.items() for _ in v],
            "imagenet_indices": sorted(wnids.index(w) for w in plan)}


# ObjectNet: folder -> (ObjectNet label, the ImageNet indices it maps to, the images' grey levels). Air freshener
# has no ImageNet counterpart: its images are not part of the evaluation.
OBJECTNET_PLAN = {"alarm_clock": ("Alarm clock", [409, 530], [30, 50]), "banana": ("Banana", [954], [70]),
                  "bench": ("Bench", [703], [90]), "air_freshener": ("Air freshener", [], [110])}


def objectnet_line(index: int) -> int:
    """The line of imagenet_to_label_2012_v2 (0-based ImageNet-2012 id) of PyTorch class `index`: a permutation,
    so a loader that skips pytorch_to_imagenet_2012_id.json gets the wrong classes."""
    return (index * 7 + 3) % 1000


def write_objectnet(root: Path, first_id: int = 0) -> Expected:
    """objectnet-1.0/images/<folder>/<file>.png with the release's 1-pixel red border, and mappings/ (the four
    files; ImageNet-2012 ids counted from `first_id`)."""
    classes, wnids = _imagenet_names()
    base = root / "objectnet-1.0"
    names = [f"{classes[i]}, {wnids[i]}" for i in range(1000)]  # the release's lines are WordNet lemmas
    lines = [""] * 1000
    for index, name in enumerate(names):
        lines[objectnet_line(index)] = name
    _text(base / "mappings" / "imagenet_to_label_2012_v2", "\n".join(lines) + "\n")
    _text(base / "mappings" / "pytorch_to_imagenet_2012_id.json",
          json.dumps({str(i): objectnet_line(i) + first_id for i in range(1000)}))
    _text(base / "mappings" / "folder_to_objectnet_label.json",
          json.dumps({folder: label for folder, (label, _, _) in OBJECTNET_PLAN.items()}))
    _text(base / "mappings" / "objectnet_to_imagenet_1k.json",
          json.dumps({label: "; ".join(names[i] for i in indices)
                      for label, indices, _ in OBJECTNET_PLAN.values() if indices}))
    for folder, (_, _, values) in OBJECTNET_PLAN.items():
        for i, value in enumerate(values):
            rgb = np.full((10, 10, 3), value, dtype=np.uint8)
            rgb[0, :], rgb[-1, :], rgb[:, 0], rgb[:, -1] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
            path = base / "images" / folder / f"{i:04x}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(path)
    return {"test": [tuple(classes[i] for i in indices) for _, indices, values in OBJECTNET_PLAN.values() if indices
                     for _ in values],
            "imagenet_indices": sorted(i for _, indices, _ in OBJECTNET_PLAN.values() for i in indices)}
