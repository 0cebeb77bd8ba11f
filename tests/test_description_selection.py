"""Description selection (DisCLIP): pools, the selection rules, scoring, critic and CLI.

Offline, CPU, tiny random CLIP (``hyperalign-tiny``). The selection is checked against a
straightforward loop implementation of the rules; the real pools in the reference-data folder
(``hyperalign.common.shared_data_dir``, ``$HYPERALIGN_SHARED_DATA``) are parsed when present.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hyperalign.cli import main as cli
from hyperalign.common import shared_data_dir
from vlm_tools.description_critic import ClassMatcher, DescriptionCritic, DescriptionCriticConfig
from vlm_tools.description_selection import (
    DescriptionSelector,
    Selection,
    SelectionConfig,
    classname_free_parts,
    encode_texts,
    fallback_table,
    label_neighbourhood,
    lookup_matrix,
    select_descriptions,
)
from vlm_tools.descriptions import (
    from_class_lists,
    load_pool,
    normalize_classname,
    pool_from_json_obj,
)

POOL_DIR = shared_data_dir() / "descriptions"

# A small hand-made pool; "striped" is shared by two classes, "furry" repeats within one.
TOY = {
    "cat": ["furry", "pointed ears", "whiskers", "furry", "striped"],
    "dog": ["wagging tail", "floppy ears", "furry"],
    "tiger": ["striped", "orange fur", "large paws"],
    "sea lion": ["flippers", "wet fur"],
}


@pytest.fixture(scope="module")
def tiny_backbone():
    from reward.backbone import load_backbone

    torch.manual_seed(0)
    return load_backbone("hyperalign-tiny", None)


@pytest.fixture(scope="module")
def toy_pool():
    return pool_from_json_obj(TOY, source="toy")


# ---------------------------------------------------------------------------------------------
# Brute-force reference of the selection rules (loops, no vectorisation)


def brute_force_selection(S, hoods, m, llm_lists):
    """S: list of P rows of C floats; hoods: list of lists of class ids; llm_lists: per class
    the LLM's pool indices in order. Returns (indices [N][k][m] with -1 pads, fallback)."""
    num_desc = len(S)
    all_idx, all_fb = [], []
    for hood in hoods:
        rows, fbs = [], []
        for a in hood:
            survivors = []
            for p in range(num_desc):
                diffs = [S[p][a] - S[p][other] for other in hood]
                if all(d >= 0 for d in diffs):
                    survivors.append((-sum(diffs) / len(diffs), p))
            survivors.sort()  # by mean difference, descending; ties to the lower index
            chosen = [p for _, p in survivors[:m]]
            fallback = not chosen
            if fallback:
                chosen = list(llm_lists[a][:m])
            rows.append(chosen + [-1] * (m - len(chosen)))
            fbs.append(fallback)
        all_idx.append(rows)
        all_fb.append(fbs)
    return all_idx, all_fb


def random_pool(num_classes, num_desc, rng):
    """Pool whose classes list random, shuffled subsets of ``num_desc`` descriptions."""
    lists = []
    for _ in range(num_classes):
        size = int(rng.integers(1, 8))
        lists.append([f"d{j}" for j in rng.permutation(num_desc)[:size]])
    pool = from_class_lists(lists, [f"class {c}" for c in range(num_classes)])
    # Make sure every one of the num_desc descriptions exists in the pool, in index order.
    names = [f"d{j}" for j in range(num_desc)]
    lists.append(names)
    pool = from_class_lists(lists, [f"class {c}" for c in range(num_classes + 1)])
    return pool


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_desc", [5, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selection_equals_brute_force(seed, num_desc, dtype):
    rng = np.random.default_rng(seed)
    num_classes, k, m, n_img = 8, 3, 5, 25
    pool = random_pool(num_classes, num_desc, rng)
    c_all = pool.num_classes
    S = torch.tensor(rng.normal(size=(len(pool.descriptions), c_all)), dtype=dtype)
    hoods = torch.tensor(np.stack([rng.permutation(c_all)[:k] for _ in range(n_img)]))
    sel = select_descriptions(S, hoods, m, fallback_table(pool, m), chunk=7)

    llm = [list(idx) for idx in pool.class_indices]
    want_idx, want_fb = brute_force_selection(S.tolist(), hoods.tolist(), m, llm)
    assert sel.indices.tolist() == want_idx
    assert sel.fallback.tolist() == want_fb
    assert torch.equal(sel.neighbourhood, hoods)
    if num_desc == 5:  # few descriptions: some candidates have < m survivors or none
        assert (sel.indices == -1).any()
        assert sel.fallback.any()


def test_fallback_uses_first_m_llm_descriptions_in_llm_order():
    # Class 1 lists shared descriptions in an order unlike the pool's.
    pool = from_class_lists(
        [["a", "b", "c", "d"], ["d", "c", "b", "a", "e"], ["e"]], ["x", "y", "z"]
    )
    assert pool.descriptions == ("a", "b", "c", "d", "e")
    m = 3
    # Class 1's column is strictly below class 0's for every description: it never dominates.
    S = torch.tensor(
        [[0.9, 0.1, 0.2], [0.8, 0.2, 0.1], [0.7, 0.3, 0.1], [0.6, 0.4, 0.0], [0.5, 0.4, 0.6]]
    )
    hood = torch.tensor([[1, 0, 2], [0, 1, 2]])
    sel = select_descriptions(S, hood, m, fallback_table(pool, m))
    assert sel.fallback.tolist() == [[True, False, False], [False, True, False]]
    d, c = pool.descriptions.index("d"), pool.descriptions.index("c")
    b = pool.descriptions.index("b")
    assert sel.indices[0, 0].tolist() == [d, c, b]  # the LLM's order for class y
    assert sel.indices[1, 1].tolist() == [d, c, b]
    # Class 0 (x) dominates a-d; ranked by mean difference: a (0.9-0.4), b, c, d.
    assert sel.indices[1, 0].tolist() == [0, 1, 2]
    # Class 2 (z) dominates only e, the rest is padding.
    assert sel.indices[0, 2].tolist() == [4, -1, -1]


def test_w_cls_zero_is_classname_free_and_w_cls_adds_the_caption():
    g = torch.Generator().manual_seed(0)
    n, c, p, d = 6, 4, 9, 16
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    cap = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    desc = F.normalize(torch.randn(p, d, generator=g), dim=-1)
    hood = label_neighbourhood(img, cap, 3)
    idx = torch.randint(0, p, (n, 3, 2), generator=g)
    idx[0, 1, 1] = -1  # one padded slot
    sel = Selection(hood, idx, torch.zeros(n, 3, dtype=torch.bool))
    parts = classname_free_parts(img, cap, desc, sel)

    want = torch.zeros(n, 3)
    for i in range(n):
        for j in range(3):
            chosen = [q for q in idx[i, j].tolist() if q >= 0]
            want[i, j] = sum(float(img[i] @ desc[q]) for q in chosen) / len(chosen)
    torch.testing.assert_close(parts.scores(0.0), want)
    # w_cls = 0 does not depend on the classname prompts at all.
    other_cap = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    sel_same_hood = Selection(hood, idx, sel.fallback)
    torch.testing.assert_close(
        classname_free_parts(img, other_cap, desc, sel_same_hood).scores(0.0), want
    )
    cap_term = (img @ cap.T).gather(1, hood)
    torch.testing.assert_close(parts.scores(2.5), want + 2.5 * cap_term)


def test_label_neighbourhood_is_top_k_by_caption():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cap = F.normalize(torch.tensor([[1.0, 0.1], [0.2, 1.0], [1.0, 1.0], [-1.0, 0.0]]), dim=-1)
    assert label_neighbourhood(img, cap, 2).tolist() == [[0, 2], [1, 2]]
    with pytest.raises(ValueError, match="exceeds"):
        label_neighbourhood(img, cap, 5)


def test_lookup_matrix_uses_first_n_per_class():
    g = torch.Generator().manual_seed(1)
    ref = F.normalize(torch.randn(11, 8, generator=g), dim=-1)
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2, 2, 1, 0])  # smallest class: 3 images
    desc = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    S, n = lookup_matrix(ref, labels, desc, num_classes=3, n_reference=1000)
    assert n == 3
    for c in range(3):
        first = [i for i, lab in enumerate(labels.tolist()) if lab == c][:3]
        for p in range(5):
            want = sum(float(desc[p] @ ref[i]) for i in first) / 3
            assert abs(float(S[p, c]) - want) < 1e-6
    S2, n2 = lookup_matrix(ref, labels, desc, num_classes=3, n_reference=2)
    assert n2 == 2 and not torch.allclose(S, S2)
    with pytest.raises(ValueError, match=r"class ids \[3\]"):
        lookup_matrix(ref, labels, desc, num_classes=4)


# ---------------------------------------------------------------------------------------------
# Pools


def test_toy_pool_deduplicates(toy_pool):
    assert toy_pool.classnames == ("cat", "dog", "tiger", "sea lion")
    assert len(toy_pool.descriptions) == len(set(toy_pool.descriptions)) == 10
    assert toy_pool.class_descriptions(0) == ["furry", "pointed ears", "whiskers", "striped"]
    assert toy_pool.class_descriptions(2) == ["striped", "orange fur", "large paws"]
    # Same text shared by classes -> one pool entry.
    assert toy_pool.class_indices[0][-1] == toy_pool.class_indices[2][0]


def test_missing_classes_are_listed(toy_pool):
    sub = toy_pool.for_classes(["Sea_Lion", "002.cat"])
    assert sub.classnames == ("Sea_Lion", "002.cat")
    assert sub.class_descriptions(0) == ["flippers", "wet fur"]
    with pytest.raises(ValueError) as err:
        toy_pool.for_classes(["cat", "zebra", "walrus", "dog"])
    msg = str(err.value)
    assert "2 of 4 classes are missing" in msg and "'zebra'" in msg and "'walrus'" in msg
    assert "'cat'" not in msg.split(":", 1)[1].split(".")[0]


def test_bad_pool_files_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"index_to_descriptions": {"0": ["a"]}}))
    with pytest.raises(ValueError, match="needs both"):
        load_pool(bad)
    bad.write_text(json.dumps({"cat": "furry"}))
    with pytest.raises(ValueError, match="list of strings"):
        load_pool(bad)
    bad.write_text(json.dumps({"Cat": ["a"], "cat": ["b"]}))
    with pytest.raises(ValueError, match="same after normalisation"):
        load_pool(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pool(tmp_path / "absent.json")
    assert normalize_classname("001.Black_footed  Albatross") == "black footed albatross"


def _raw_lists(obj):
    if "index_to_descriptions" in obj:
        keys = sorted(obj["index_to_classname"], key=int)
        return [obj["index_to_classname"][k] for k in keys], [
            obj["index_to_descriptions"][k] for k in keys
        ]
    return list(obj), list(obj.values())


@pytest.mark.skipif(not POOL_DIR.is_dir(), reason=f"{POOL_DIR} absent")
def test_real_pools_parse():
    files = sorted(POOL_DIR.glob("*/*.json"))
    assert files, f"no pool files under {POOL_DIR}"
    for path in files:
        pool = load_pool(path)
        names, lists = _raw_lists(json.loads(path.read_text()))
        assert list(pool.classnames) == names, path
        assert len(set(pool.descriptions)) == len(pool.descriptions), path
        for c, raw in enumerate(lists):
            assert pool.class_descriptions(c) == list(dict.fromkeys(d.strip() for d in raw)), path
        assert set(pool.descriptions) == {d.strip() for raw in lists for d in raw}, path


@pytest.mark.skipif(not POOL_DIR.is_dir(), reason=f"{POOL_DIR} absent")
def test_real_pools_both_formats_agree_and_fallback_fills_empty_classes():
    dclip = load_pool(POOL_DIR / "dclip" / "descriptors_eurosat.json")
    disclip = load_pool(POOL_DIR / "disclip" / "descriptions_eurosat_dclip.json")
    assert dclip.as_dict() == disclip.as_dict()
    llama_path = POOL_DIR / "disclip" / "descriptions_pets_con_llama.json"
    llama = load_pool(llama_path)
    empty = llama.empty_classes()
    assert len(empty) == 15
    filled = load_pool(llama_path, fallback=POOL_DIR / "disclip" / "descriptions_pets_dclip.json")
    assert filled.empty_classes() == []
    dclip_pets = load_pool(POOL_DIR / "disclip" / "descriptions_pets_dclip.json")
    for name in empty:
        assert filled.class_descriptions(filled.index_of(name)) == dclip_pets.class_descriptions(
            dclip_pets.index_of(name)
        )
    # CUB: DCLIP spells "Black-footed Albatross", DisCLIP "Black footed Albatross" (matched);
    # DCLIP also spells "Artic Tern", which is reported as the one missing class.
    cub = load_pool(POOL_DIR / "dclip" / "descriptors_cub.json")
    disclip_cub = load_pool(POOL_DIR / "disclip" / "descriptions_cub_dclip.json")
    with pytest.raises(ValueError, match=r"1 of 200 classes are missing.*\['Arctic Tern'\]"):
        cub.for_classes(disclip_cub.classnames)
    names = [n for n in disclip_cub.classnames if n != "Arctic Tern"]
    assert cub.for_classes(names).num_classes == 199


# ---------------------------------------------------------------------------------------------
# Selector with a (tiny, random) CLIP


def test_text_embeddings_are_cached_per_backbone(tiny_backbone, toy_pool):
    calls = []
    model = tiny_backbone.model
    original = model.encode_text

    def counting(tokens, *a, **kw):
        calls.append(tokens.shape[0])
        return original(tokens, *a, **kw)

    model.encode_text = counting
    try:
        first = DescriptionSelector(tiny_backbone, toy_pool, SelectionConfig(k=2, m=2))
        n_first = sum(calls)
        second = DescriptionSelector(tiny_backbone, toy_pool, SelectionConfig(k=3, m=3))
        assert sum(calls) == n_first  # nothing re-encoded
    finally:
        del model.encode_text
    torch.testing.assert_close(first.description_emb, second.description_emb)
    direct = encode_texts(tiny_backbone, ["furry"])
    torch.testing.assert_close(
        direct[0], first.description_emb[toy_pool.descriptions.index("furry")]
    )


def test_selector_rejects_classes_without_descriptions(tiny_backbone):
    pool = from_class_lists([["a"], []], ["x", "y"])
    with pytest.raises(ValueError, match=r"without any description.*\['y'\].*fallback"):
        DescriptionSelector(tiny_backbone, pool, SelectionConfig(k=2))


def _fitted_selector(backbone, pool, k=3, m=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sel = DescriptionSelector(backbone, pool, SelectionConfig(k=k, m=m, batch_size=5))
    images = torch.rand(3 * pool.num_classes, 3, 40, 40, generator=g)
    labels = torch.arange(pool.num_classes).repeat(3)
    return sel.fit(sel.encode_images(images), labels)


def test_selector_end_to_end_and_lookup_round_trip(tiny_backbone, toy_pool, tmp_path):
    sel = _fitted_selector(tiny_backbone, toy_pool)
    images = torch.rand(7, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    emb = sel.encode_images(images)
    assert emb.shape == (7, tiny_backbone.embed_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(7))
    selection = sel.select(emb)
    assert selection.indices.shape == (7, 3, 2)
    want = select_descriptions(
        sel.lookup, label_neighbourhood(emb, sel.caption_emb, 3), 2, sel.fallback
    )
    assert torch.equal(selection.indices, want.indices)
    combined = sel.classname_containing_scores(emb, selection)
    # Reference: encode "A photo of a {c}, {d}." per (image, candidate) and average.
    for i in range(7):
        for j, (name, descs) in enumerate(sel.selected_texts(selection, i).items()):
            texts = [f"A photo of a {name}, {d}." for d in descs]
            ref = (encode_texts(tiny_backbone, texts) @ emb[i]).mean()
            assert abs(float(combined[i, j]) - float(ref)) < 1e-5
    path = tmp_path / "sub" / "lookup.safetensors"
    sel.save_lookup(path)
    again = DescriptionSelector(tiny_backbone, toy_pool, SelectionConfig(k=3, m=2))
    torch.testing.assert_close(again.load_lookup(path).lookup, sel.lookup)
    other = toy_pool.for_classes(["cat", "dog", "tiger"])
    with pytest.raises(ValueError, match="another pool"):
        DescriptionSelector(tiny_backbone, other).load_lookup(path)


# ---------------------------------------------------------------------------------------------
# Critic


def test_class_matcher():
    match = ClassMatcher(["cat", "sea lion", "lion", "Black-footed Albatross"])
    assert match("a photo of a cat") == 0
    assert match("two Cats on a sofa") == 0
    assert match("a sea lion on a rock") == 1  # the longest name wins over "lion"
    assert match("a lion") == 2
    assert match("a black footed albatross flying") == 3
    assert match("a catalogue") is None
    assert match("a dog") is None


def test_critic_contract(tiny_backbone, toy_pool):
    sel = _fitted_selector(tiny_backbone, toy_pool)
    critic = DescriptionCritic(sel)
    images = torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    prompts = ["a photo of a cat", "a tiger in the grass", "a dog", "a sea lion"]
    meta = [{}, {}, {"class": "sea lion"}, {}]
    rewards, info = critic(images, prompts, meta)
    assert rewards.dtype == torch.float32 and rewards.shape == (4,)
    assert rewards.device == images.device
    assert info["class"] == ["cat", "tiger", "sea lion", "sea lion"]  # metadata wins
    for key, values in info.items():
        assert len(values) == 4, key
    for i in range(4):
        scores = info["candidate_scores"][i]
        named = info["class"][i]
        assert info["neighbourhood"][i][0] == named and len(scores) == 3
        margin = scores[named] - max(v for c, v in scores.items() if c != named)
        assert abs(float(rewards[i]) - margin) < 1e-5
        # w_cls = 0: the named class's score is the mean of its descriptions' similarities.
        sims = info["description_similarities"][i]
        assert len(sims) == len(info["selected_descriptions"][i]) > 0
        assert abs(scores[named] - sum(sims) / len(sims)) < 1e-5
        assert set(info["selected_descriptions"][i]) <= set(toy_pool.descriptions)
    # Picklable, same rewards after a round trip.
    clone = pickle.loads(pickle.dumps(critic))
    torch.testing.assert_close(clone(images, prompts, meta)[0], rewards)


def test_critic_unknown_class(tiny_backbone, toy_pool):
    sel = _fitted_selector(tiny_backbone, toy_pool)
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="naming no class.*on_unknown_class='neutral'"):
        DescriptionCritic(sel)(images, ["a cat", "a red car"], [{}, {}])
    with pytest.raises(ValueError, match="metadata class 'car'"):
        DescriptionCritic(sel)(images, ["a cat", "a dog"], [{}, {"class": "car"}])
    neutral = DescriptionCritic(sel, on_unknown_class="neutral", neutral_value=-0.5)
    rewards, info = neutral(images, ["a cat", "a red car"], [{}, {}])
    assert float(rewards[1]) == -0.5 and info["class"] == ["cat", None]
    assert info["selected_descriptions"][1] == []
    with pytest.raises(ValueError, match="on_unknown_class must be one of"):
        DescriptionCritic(sel, on_unknown_class="skip")


# ---------------------------------------------------------------------------------------------
# CLI


def _write_folder(root, classes, per_class, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = (rng.random((36, 44, 3)) * 255).astype(np.uint8)
            arr[..., c % 3] = 255  # a class tint
            Image.fromarray(arr).save(root / name / f"{i:03d}.png")


def test_cli_end_to_end(tmp_path, toy_pool):
    def main(argv):
        return cli(["disclip", "--debug", *argv])

    pool_path = tmp_path / "pool.json"
    pool_path.write_text(json.dumps(TOY))
    root = tmp_path / "data"
    _write_folder(root, ["cat", "dog", "sea_lion"], per_class=4, seed=0)
    out = tmp_path / "out"
    torch.manual_seed(0)
    argv = [
        str(root),
        "--pool",
        str(pool_path),
        "--backbone",
        "hyperalign-tiny",
        "--pretrained",
        "none",
        "--k",
        "2",
        "--m",
        "2",
        "--w-cls",
        "0,1,10",
        "--out",
        str(out),
        "--batch-size",
        "5",
    ]
    assert main(argv) == 0
    acc = json.loads((out / "accuracy.json").read_text())
    assert acc["w_cls"] == [0.0, 1.0, 10.0]
    for key in ("llm_assigned", "selected"):
        assert len(acc[key]) == 3 and all(0 <= v <= 100 for v in acc[key])
    # 2 references per class (half of 4), 6 evaluated images: accuracies are multiples of 1/6.
    assert all(abs(v * 6 / 100 - round(v * 6 / 100)) < 1e-6 for v in acc["selected"])
    table = (out / "accuracy.md").read_text().strip().splitlines()
    assert len(table) == 2 + 3 and table[0].startswith("| w_cls |")
    sel = json.loads((out / "selected_descriptions.json").read_text())
    assert set(sel["per_class"]) == {"cat", "dog", "sea_lion"}
    assert len(sel["per_image"]) == 6
    for row in sel["per_class"].values():
        assert {s["description"] for s in row["selected"]} <= set(toy_pool.descriptions)
    md = (out / "selected_descriptions.md").read_text()
    assert "## sea_lion" in md and "LLM: flippers; wet fur" in md
    # The saved lookup matrix serves the critic (restricted to the folder's classes).
    critic = DescriptionCritic.from_config(
        DescriptionCriticConfig(
            pool=str(pool_path),
            lookup=str(out / "lookup.safetensors"),
            backbone="hyperalign-tiny",
            pretrained=None,
            k=2,
            m=2,
        )
    )
    assert critic.selector.pool.classnames == ("cat", "dog", "sea_lion")
    rewards, info = critic(torch.rand(2, 3, 32, 32), ["a sea lion", "a cat"], [{}, {}])
    assert info["class"] == ["sea_lion", "cat"] and torch.isfinite(rewards).all()
    with pytest.raises(ValueError, match="another pool"):
        DescriptionSelector(critic.selector.backbone, toy_pool).load_lookup(
            out / "lookup.safetensors"
        )


def test_cli_missing_classes_listed(tmp_path):
    def main(argv):
        return cli(["disclip", "--debug", *argv])

    pool_path = tmp_path / "pool.json"
    pool_path.write_text(json.dumps(TOY))
    root = tmp_path / "data"
    _write_folder(root, ["cat", "horse", "zebra"], per_class=2, seed=1)
    with pytest.raises(ValueError, match=r"2 of 3 classes are missing.*'horse', 'zebra'"):
        main(
            [
                str(root),
                "--pool",
                str(pool_path),
                "--backbone",
                "hyperalign-tiny",
                "--pretrained",
                "none",
                "--out",
                str(tmp_path / "o"),
            ]
        )


def test_folder_images_decode_through_common(tmp_path):
    """Transparent pixels are composited on white (not dropped to their hidden colour), every
    suffix of hyperalign.common.IMAGE_SUFFIXES is listed, and an undecodable file is named."""
    from PIL import Image

    from vlm_tools.description_cli import load_image, scan_image_folder

    rgba = np.zeros((10, 14, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red under alpha 0: invisible
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    img = load_image(tmp_path / "clear.png", (8, 8))
    assert img.shape == (3, 8, 8) and torch.equal(img, torch.ones(3, 8, 8))
    # An opaque RGB image keeps its exact pixel values (no change to the old decoding).
    rgb = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    expected = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)
    assert torch.equal(load_image(tmp_path / "rgb.png", (8, 8)), expected)

    (tmp_path / "data" / "cat").mkdir(parents=True)
    Image.fromarray(rgb).save(tmp_path / "data" / "cat" / "a.tiff")
    assert [p.name for p in scan_image_folder(tmp_path / "data").paths] == ["a.tiff"]
    bad = tmp_path / "data" / "cat" / "b.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot decode image .*b\.png"):
        load_image(bad, (8, 8))


def test_cli_reports_undecodable_image(tmp_path, capsys):
    """Without --debug an undecodable image is a one-line error naming the file (exit 2)."""
    pool_path = tmp_path / "pool.json"
    pool_path.write_text(json.dumps(TOY))
    root = tmp_path / "data"
    _write_folder(root, ["cat", "dog"], per_class=2, seed=2)
    (root / "dog" / "zz_broken.jpg").write_bytes(b"\xff\xd8 truncated")
    argv = ["disclip", str(root), "--pool", str(pool_path), "--backbone", "hyperalign-tiny"]
    argv += ["--pretrained", "none", "--k", "2", "--m", "1", "--out", str(tmp_path / "o")]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "cannot decode image" in err and "zz_broken.jpg" in err and "Traceback" not in err
