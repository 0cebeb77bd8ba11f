"""Dataset adapters, targets and prompt-grouped splits (reward.data) on the real label files."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reward.data import (
    EmptySplitError,
    IQADataset,
    LabelFileError,
    MissingImagesError,
    PairDataset,
    Sample,
    UnreadableImageError,
    canonical_split,
    canonical_split_dirs,
    check_images,
    load_dataset,
    prompt_split,
)

LABELS = {
    "agiqa3k": "iqa/agiqa3k/data.csv",
    "aigciqa2023": "iqa/amff_splits/AIGCIQA2023/1",
    "pku-i2iqa": "iqa/amff_splits/PKU-I2IQA/1",
}


def make_subset(
    shared_data: Path, tmp: Path, dataset: str, n_prompts: int, per_prompt: int = 99, size=16
):
    """Copy the real label lines of the first ``per_prompt`` images of each of the first
    ``n_prompts`` prompts (same format) into ``tmp`` and write a small placeholder PNG for each
    image: grey level = normalised MOS + noise, so the images carry a learnable signal.
    Returns ``(labels_path, image_root)``."""
    full = load_dataset(dataset, shared_data / LABELS[dataset])
    keep = set(full.prompts[:n_prompts])
    taken: dict[str, int] = {}
    chosen = []
    for s in full.samples:
        if s.prompt in keep and taken.get(s.prompt, 0) < per_prompt:
            taken[s.prompt] = taken.get(s.prompt, 0) + 1
            chosen.append(s)
    labels = tmp / "labels" / dataset
    lines_by_file: dict[str, set[int]] = {}
    for s in chosen:
        lines_by_file.setdefault(s.source, set()).add(s.line)
    for source, lines in lines_by_file.items():
        raw = Path(source).read_text(encoding="utf-8").splitlines()
        header = [raw[0]] if source.endswith(".csv") else []
        out = labels / Path(source).name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(header + [raw[i - 1] for i in sorted(lines)]) + "\n")
    if LABELS[dataset].endswith(".csv"):
        labels = labels / Path(LABELS[dataset]).name
    root = tmp / "images" / dataset
    rng = np.random.default_rng(0)
    for s in chosen:
        path = root / s.image
        path.parent.mkdir(parents=True, exist_ok=True)
        grey = full.normalise(s.mos) + rng.normal(0, 0.05, (size, size, 3))
        Image.fromarray((np.clip(grey, 0, 1) * 255).astype(np.uint8)).save(path)
    return labels, root


# ------------------------------------------------------------------------- real files
@pytest.mark.parametrize(
    "name, n_images, n_prompts, lo, hi",
    [
        ("agiqa3k", 2982, 300, 0.02, 4.29),
        ("aigciqa2023", 2400, 100, 27, 73),
        ("pku-i2iqa", 1600, 199, 0.4, 5.0),
    ],
)
def test_real_label_files(shared_data, name, n_images, n_prompts, lo, hi):
    ds = load_dataset(name, shared_data / LABELS[name])
    assert len(ds.samples) == n_images
    assert len(ds.prompts) == n_prompts
    assert len({s.image for s in ds.samples}) == n_images
    a, b = ds.target_range
    assert lo - 1 < a < b < hi + 1 and a < lo + 1 and b > hi - 1
    targets = np.array([ds.normalise(s.mos) for s in ds.samples])
    assert targets.min() == 0.0 and targets.max() == 1.0
    assert ds.denormalise(ds.normalise(3.0)) == pytest.approx(3.0)


def test_agiqa3k_split_files_agree_with_data_csv(shared_data):
    csv_ds = load_dataset("agiqa3k", shared_data / LABELS["agiqa3k"])
    by_name = {s.image: s for s in csv_ds.samples}
    amff = load_dataset("agiqa3k", shared_data / "iqa/amff_splits/AGIQA-3K", fmt="amff-tsv")
    assert len(amff.samples) == len(csv_ds.samples)
    for s in amff.samples:
        ref = by_name[Path(s.image).name]
        assert s.mos == pytest.approx(ref.mos, abs=1e-6) and s.prompt == ref.prompt


def _prompts(items):
    return {s.prompt for s in items}


@pytest.mark.parametrize(
    "name, test_fraction", [("agiqa3k", 0.2), ("aigciqa2023", 0.2), ("pku-i2iqa", 0.25)]
)
def test_prompt_splits_are_disjoint_seeded_and_complete(shared_data, name, test_fraction):
    ds = load_dataset(name, shared_data / LABELS[name])
    for seed in range(3):
        split = prompt_split(ds, test_fraction, 0.1, seed)
        train, val, test = _prompts(split.train), _prompts(split.val), _prompts(split.test)
        # No prompt appears in two subsets.
        assert not (train & val) and not (train & test) and not (val & test)
        assert len(split.train) + len(split.val) + len(split.test) == len(ds.samples)
        assert len(test) == round(len(ds.prompts) * test_fraction)
        assert len(val) == round((len(ds.prompts) - len(test)) * 0.1)
    again = prompt_split(ds, test_fraction, 0.1, 0)
    assert _prompts(again.test) == _prompts(prompt_split(ds, test_fraction, 0.1, 0).test)
    assert _prompts(again.test) != _prompts(prompt_split(ds, test_fraction, 0.1, 1).test)


def test_canonical_agiqa3k_splits_and_refused_image_splits(shared_data):
    ds = load_dataset("agiqa3k", shared_data / LABELS["agiqa3k"])
    dirs = canonical_split_dirs(shared_data / "iqa/amff_splits/AGIQA-3K")
    assert [d.name for d in dirs] == [str(i) for i in range(1, 11)]
    tests = []
    for i, d in enumerate(dirs[:3]):
        split = canonical_split(ds, d, 0.1, seed=i)
        assert not (_prompts(split.train) & _prompts(split.test))
        assert not (_prompts(split.val) & (_prompts(split.train) | _prompts(split.test)))
        assert len(_prompts(split.test)) == 60
        tests.append(_prompts(split.test))
    assert tests[0] != tests[1]
    # Through the training config: split i is folder i + 1; the checkpoint record rebuilds it.
    from reward.evaluate import split_from_extra
    from reward.train import TrainConfig, make_split

    config = TrainConfig(canonical_splits=str(shared_data / "iqa/amff_splits/AGIQA-3K"))
    split, info = make_split(ds, config, 9)
    assert info["mode"] == "canonical:10" and info["seed"] == 9
    rebuilt = split_from_extra(ds, {"dataset": "agiqa3k", "split": info})
    assert [s.image for s in rebuilt.test] == [s.image for s in split.test]
    assert [s.image for s in rebuilt.val] == [s.image for s in split.val]
    with pytest.raises(ValueError, match="has 10 split folders; lower --splits"):
        make_split(ds, config, 10)
    aigc = load_dataset("aigciqa2023", shared_data / LABELS["aigciqa2023"])
    with pytest.raises(ValueError, match="not prompt-disjoint.*Leave out --canonical-splits"):
        canonical_split(aigc, shared_data / LABELS["aigciqa2023"], 0.1, 0)


# --------------------------------------------------------------------------- bad data
def test_malformed_label_files_name_the_line(tmp_path):
    good = "a.png\t1\t2\t3\tprompt one\n"
    bad = tmp_path / "bad.txt"
    bad.write_text(good + "b.png\t1\t2\tprompt two\n")
    with pytest.raises(LabelFileError, match=r"bad.txt:2: expected 5 tab-separated fields"):
        load_dataset("aigciqa2023", bad)
    bad.write_text(good + "b.png\t1\tx\t3\tprompt two\n")
    with pytest.raises(LabelFileError, match=r"bad.txt:2: column 'authenticity' is 'x'"):
        load_dataset("aigciqa2023", bad)
    bad.write_text("a.png\t1\t2\n")
    with pytest.raises(LabelFileError, match=r"bad.txt:1: expected 4 .* or 5"):
        load_dataset("aigciqa2023", bad)
    bad.write_text(good + "a.png\t1\t2\t4\tprompt two\n")
    with pytest.raises(LabelFileError, match=r"bad.txt:2: image 'a.png' is already listed"):
        load_dataset("aigciqa2023", bad)
    csv_file = tmp_path / "mine.csv"
    csv_file.write_text("image,text,score\na.png,hello,1\n")
    with pytest.raises(LabelFileError, match=r"mine.csv:1: .*lacks column\(s\) \['prompt'\]"):
        load_dataset("csv", csv_file)
    csv_file.write_text("image,prompt,score\na.png,hello,1\nb.png,,2\n")
    with pytest.raises(LabelFileError, match=r"mine.csv:3: column 'prompt' is empty"):
        load_dataset("csv", csv_file)
    csv_file.write_text("image,prompt,score\na.png,hello,1\nb.png,hi,nan\n")
    with pytest.raises(LabelFileError, match=r"mine.csv:3: column 'score' is 'nan'"):
        load_dataset("csv", csv_file)
    with pytest.raises(LabelFileError, match="does not exist"):
        load_dataset("csv", tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="unknown dataset 'koniq'.*agiqa3k"):
        load_dataset("koniq", csv_file)


def _tiny_dataset(n_prompts=3, per_prompt=2):
    samples = [
        Sample(f"{p}_{i}.png", f"prompt {p}", float(p * per_prompt + i))
        for p in range(n_prompts)
        for i in range(per_prompt)
    ]
    return IQADataset.from_samples("csv", samples)


def test_generic_csv_and_empty_split(tmp_path):
    csv_file = tmp_path / "mine.csv"
    csv_file.write_text('image,prompt,score,extra\na.png,"a cat, sitting",1,x\nb.png,dog,3,y\n')
    ds = load_dataset("csv", csv_file)
    assert [s.prompt for s in ds.samples] == ["a cat, sitting", "dog"]
    assert ds.target_range == (1.0, 3.0)
    with pytest.raises(EmptySplitError, match="test subset would be empty: 3 prompt"):
        prompt_split(_tiny_dataset(3), 0.1, 0.1, 0)
    with pytest.raises(EmptySplitError, match="val subset would be empty"):
        prompt_split(_tiny_dataset(4), 0.25, 0.1, 0)
    split = prompt_split(_tiny_dataset(10), 0.2, 0.2, 0)
    split.val = []
    with pytest.raises(EmptySplitError, match="the val subset of split prompt is empty"):
        split.check()


def test_missing_and_unreadable_images(tmp_path):
    ds = _tiny_dataset(4, 3)
    root = tmp_path / "imgs"
    root.mkdir()
    for s in ds.samples[:5]:
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / s.image)
    with pytest.raises(MissingImagesError) as err:
        check_images(ds.samples, root)
    msg = str(err.value)
    assert "7 of 12 images" in msg and ds.samples[5].image in msg and "and 2 more" in msg
    with pytest.raises(MissingImagesError, match="not a directory"):
        check_images(ds.samples, tmp_path / "nowhere")
    # Flat-folder fallback: a label path with a sub-folder is found by its file name.
    nested = [Sample("all/" + s.image, s.prompt, s.mos) for s in ds.samples[:5]]
    assert check_images(nested, root)[0] == root / ds.samples[0].image
    # Unreadable file: the error names it and its label line.
    broken = Sample("broken.png", "p", 1.0, source="labels.csv", line=7)
    (root / "broken.png").write_bytes(b"not a png")
    data = PairDataset([ds.samples[0], broken], root, (8, 8), (0.0, 11.0))
    item = data[0]
    assert item["pixels"].shape == (3, 8, 8) and item["target"] == pytest.approx(0.0)
    assert 0 <= float(item["pixels"].min()) and float(item["pixels"].max()) <= 1
    assert item["target"].dtype == torch.float32
    with pytest.raises(UnreadableImageError, match=r"broken.png \(label file labels.csv line 7\)"):
        data[1]


# ---------------------------------------------------------------------- file encodings
def test_utf8_bom_label_files_are_read(tmp_path):
    """Spreadsheet programs write a UTF-8 byte-order mark; every label reader skips it."""
    rows = 'image,prompt,score\na.png,"café, sitting",1\nb.png,dog,3\n'
    plain, bom = tmp_path / "plain.csv", tmp_path / "bom.csv"
    plain.write_text(rows, encoding="utf-8")
    bom.write_text(rows, encoding="utf-8-sig")
    assert bom.read_bytes()[:3] == b"\xef\xbb\xbf"
    keys = [(s.image, s.prompt, s.mos) for s in load_dataset("csv", bom).samples]
    assert keys == [(s.image, s.prompt, s.mos) for s in load_dataset("csv", plain).samples]
    agiqa = tmp_path / "data.csv"
    agiqa.write_text("name,prompt,mos_align\na.png,a cat,1.5\nb.png,a dog,2.5\n", "utf-8-sig")
    assert [s.image for s in load_dataset("agiqa3k", agiqa).samples] == ["a.png", "b.png"]
    amff = tmp_path / "train.txt"
    amff.write_text("a.png\t1\t2\t3\tone\nb.png\t1\t2\t4\ttwo\n", encoding="utf-8-sig")
    assert [s.image for s in load_dataset("aigciqa2023", amff).samples] == ["a.png", "b.png"]


def test_latin1_label_file_names_the_file_and_encoding(tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("image,prompt,score\na.png,café,1\nb.png,dog,3\n".encode("latin-1"))
    with pytest.raises(LabelFileError, match=r"latin.csv is not UTF-8 text.*Latin-1.*iconv"):
        load_dataset("csv", latin)
    tsv = tmp_path / "split.txt"
    tsv.write_bytes("a.png\t1\t2\t3\tcafé\n".encode("latin-1"))
    with pytest.raises(LabelFileError, match=r"split.txt is not UTF-8 text"):
        load_dataset("aigciqa2023", tsv)


def test_fingerprints_see_every_label_change_but_not_the_row_order():
    ds = _tiny_dataset(10)
    shuffled = IQADataset.from_samples("csv", ds.samples[::-1])
    assert shuffled.fingerprint() == ds.fingerprint()
    changed = IQADataset.from_samples("csv", [*ds.samples[:-1], Sample("x.png", "prompt 9", 0.5)])
    assert changed.fingerprint() != ds.fingerprint()
    a, b = prompt_split(ds, 0.2, 0.2, 0), prompt_split(ds, 0.2, 0.2, 0)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint()["test"] != prompt_split(ds, 0.2, 0.2, 1).fingerprint()["test"]
