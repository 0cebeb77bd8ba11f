"""Description selection on a shapes-world class task with the shipped tiny CLIP.

Three classes whose names say nothing about what they look like ("kestrel", "plover",
"avocet"): class images are single shapes of one colour each (red / blue / green; any shape,
any size). Each class's "LLM" list puts two distractors first (descriptions that fit every
class: shapes and sizes without a colour) and then two discriminative descriptions (the
colour). The shipped CLIP sees colours well and shapes poorly (BENCHMARKS.md), so:
selection must keep the colour descriptions and drop the distractors, and classname-free
accuracy (w_cls = 0) with the selected descriptions must be far above chance (1/3), while the
first-m LLM descriptions (the distractors) stay near chance.
"""

import numpy as np
import pytest
import torch

from reward.backbone import load_backbone
from shapes.assets import CLIP_ARCH, CLIP_WEIGHTS
from shapes.perturb import faithful_scene
from shapes.prompts import parse_prompt
from shapes.world import SHAPES, SIZES, render, to_tensor
from vlm_tools.description_selection import DescriptionSelector, SelectionConfig, local_prediction
from vlm_tools.descriptions import from_class_lists

ASSET = CLIP_WEIGHTS
CLASSES = {"kestrel": "red", "plover": "blue", "avocet": "green"}
DISTRACTORS = ["a large circle", "a small square", "a triangle", "a large square"]


def _images(colour: str, n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text = f"a {rng.choice(SIZES)} {colour} {rng.choice(SHAPES)}"
        out.append(render(faithful_scene(parse_prompt(text), rng)))
    return to_tensor(np.stack(out))  # (n, 3, 64, 64)


@pytest.mark.skipif(not ASSET.is_file(), reason="shipped shapes CLIP not built")
def test_selection_keeps_discriminative_descriptions_and_beats_chance():
    backbone = load_backbone(CLIP_ARCH, str(ASSET))
    lists = []
    for i, colour in enumerate(CLASSES.values()):
        distract = [DISTRACTORS[i], DISTRACTORS[(i + 1) % 4]]
        lists.append(distract + [f"a {colour} circle", f"a large {colour} square"])
    pool = from_class_lists(lists, list(CLASSES), source="shapes-colours")
    selector = DescriptionSelector(backbone, pool, SelectionConfig(k=3, m=2, n_reference=24))

    ref = torch.cat([_images(c, 24, seed=i) for i, c in enumerate(CLASSES.values())])
    ref_labels = torch.arange(3).repeat_interleave(24)
    selector.fit(selector.encode_images(ref), ref_labels)

    test = torch.cat([_images(c, 30, seed=100 + i) for i, c in enumerate(CLASSES.values())])
    labels = torch.arange(3).repeat_interleave(30)
    emb = selector.encode_images(test)
    selection = selector.select(emb)

    # Selection keeps each candidate's colour descriptions, never a distractor.
    colour_of = dict(zip(CLASSES, CLASSES.values()))
    for i in range(0, 90, 7):
        for name, texts in selector.selected_texts(selection, i).items():
            assert texts and all(colour_of[name] in t for t in texts), (name, texts)

    free = local_prediction(
        selector.score_parts(emb, selection).scores(0.0), selection.neighbourhood
    )
    acc_selected = float((free.cpu() == labels).float().mean())
    # The LLM's own first m descriptions (the distractors) at w_cls = 0.
    first_m = torch.zeros_like(selector.llm_weights)
    for c in range(3):
        first_m[c, selector.fallback[c].tolist()] = 0.5
    acc_first_m = float(
        ((emb @ selector.description_emb.T @ first_m.T).argmax(1).cpu() == labels).float().mean()
    )
    print(f"classname-free accuracy: selected {acc_selected:.3f}, first-m LLM {acc_first_m:.3f}")
    assert acc_selected >= 0.8, acc_selected  # chance: 1/3
    assert acc_selected > acc_first_m + 0.3, (acc_selected, acc_first_m)
