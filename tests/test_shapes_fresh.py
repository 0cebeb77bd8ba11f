"""shapes.fresh: the fresh evaluation sets."""

import numpy as np
import pytest

from shapes.fresh import fresh_set, role_swap_set
from shapes.prompts import parse_prompt


@pytest.mark.parametrize("truth,weight", [("closed", 1.0), ("open", 0.0), ("open", 0.5)])
def test_role_swap_truth_prefers_the_sub_prompt_with_the_full_scene(truth, weight):
    images, prompts, values = role_swap_set(5, 40, truth=truth, unmentioned_weight=weight)
    assert images.shape[0] == len(prompts) == len(values) >= 20
    sub, full = prompts[0::2], prompts[1::2]
    for s, f in zip(sub, full):  # the sub-prompt has exactly one entity fewer
        assert len(parse_prompt(s).entities) == len(parse_prompt(f).entities) - 1
    assert bool((values[0::2] > values[1::2]).all())
    if truth == "open" and weight == 0.0:
        assert bool((values[0::2] == 1.0).all())  # an undescribed object costs nothing


def test_fresh_set_styles_keep_prompts_and_change_pixels():
    plain, styled = fresh_set(3, 6), fresh_set(3, 6, "heldout")
    assert plain.prompts[:3] == styled.prompts[:3]
    assert not np.array_equal(plain.images.numpy(), styled.images.numpy())
    assert plain.kinds[0] == "faithful" and float(plain.truth[0]) == 1.0
    assert set(plain.kinds) - {"faithful"}  # perturbations are there too
