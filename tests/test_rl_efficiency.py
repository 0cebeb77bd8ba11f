"""The tables of scripts/rl_efficiency.py (efficiency per mode, reward fidelity)."""

import importlib.util
import json
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "scripts" / "rl_efficiency.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("rl_efficiency", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(reward, oracle, reward_gain, seed=0):
    def gain(mean, lo, hi):
        return {"mean": mean, "ci95": [lo, hi], "n": 256}

    facts = {
        k: {"before": 0.5, "after": 0.5 + oracle, "change": oracle} for k in ("color", "count")
    }
    return {
        "row": "ppo", "mode": "ppo", "overrides": [], "budget": "24x32", "seed": seed,
        "reward": reward, "oracle_gain": gain(*oracle_ci(oracle)),
        "reward_gain": gain(*oracle_ci(reward_gain)), "train_s": 1.0, "wall_s": 2.0,
        "facts": facts,
    }  # fmt: skip


def oracle_ci(mean):
    return mean, mean - 0.03, mean + 0.03


def test_fidelity_is_the_share_of_the_oracle_as_reward_gain_and_flags_hacking(script, tmp_path):
    cells = {
        # With the oracle as the reward, reward_gain is HyperAlign's, measured beside it.
        "ppo_24x32_oracle_s0": _cell("oracle", 0.10, 0.20),
        "ppo_24x32_oracle_s1": _cell("oracle", 0.02, 0.06, seed=1),
        "ppo_24x32_shapes_s0": _cell("shapes", 0.05, 0.04),
        "ppo_24x32_shapes-cosine_s0": _cell("shapes-cosine", 0.0, 0.06),
    }
    for name, cell in cells.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(cell))
    table = script.fidelity_table(tmp_path)
    rows = {line.split(" | ")[2]: line for line in table.splitlines()[2:]}
    assert " | 0.50 | " in rows["shapes"] and " | 1.00 | " in rows["oracle"]
    # The oracle's rows: the optimised (oracle) gain as the reward gain, never hacking.
    oracle_rows = [line for line in table.splitlines()[2:] if " | oracle | " in line]
    assert len(oracle_rows) == 2 and all(r.endswith("no |") for r in oracle_rows)
    assert " | +0.100 | +0.100 [" in oracle_rows[0] and " | +0.020 | +0.020 [" in oracle_rows[1]
    assert rows["shapes-cosine"].endswith("**yes** |")  # reward up, oracle flat
    assert rows["shapes"].endswith("no |")
    assert "+0.050" in rows["shapes"].split(" | ")[7]  # Δ color
    assert "— |" in rows["shapes"]  # a kind it did not measure


def test_summary_pairs_each_row_with_ppo_by_seed(script, tmp_path):
    cells = {
        "ppo_24x32_oracle_s0": _cell("oracle", 0.10, 0.0),
        "ppo_24x32_oracle_s1": _cell("oracle", 0.02, 0.0, seed=1),
        "raft_24x32_oracle_s0": {**_cell("oracle", 0.04, 0.0), "row": "raft"},
        "raft_24x32_oracle_s1": {**_cell("oracle", 0.06, 0.0, seed=1), "row": "raft"},
        "raft_24x32_oracle_s2": {**_cell("oracle", 0.50, 0.0, seed=2), "row": "raft"},
        "nft_24x32_shapes_s0": {**_cell("shapes", 0.01, 0.0), "row": "nft"},
    }
    for name, cell in cells.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(cell))
    (tmp_path / "raft_24x32_oracle_s3.partial.json").write_text("{}")  # unfinished: ignored
    rows = {
        (line.split(" | ")[0][2:], line.split(" | ")[2]): line.split(" | ")
        for line in script.summary_table(tmp_path).splitlines()[2:]
    }
    assert set(rows) == {("ppo", "oracle"), ("raft", "oracle"), ("nft", "shapes")}
    raft = rows[("raft", "oracle")]
    assert raft[3] == "0 1 2" and raft[4] == "+0.040 / +0.060 / +0.500"
    assert raft[5] == "+0.200"  # mean of all three seeds
    # Paired only over the seeds ppo has: (0.04 - 0.10 + 0.06 - 0.02) / 2.
    assert raft[6] == "-0.010 (n 2)"
    assert rows[("ppo", "oracle")][6] == "—" and rows[("nft", "shapes")][6] == "—"


def test_a_checkpoint_path_as_reward_names_a_file_not_a_folder(script):
    assert script.reward_tag("runs/calib_cos") == "runs-calib_cos"
    assert script.reward_tag("shapes-cosine") == "shapes-cosine"
    assert "/" not in script.reward_tag("/abs/path with space/ckpt")


PIPE = Path(__file__).resolve().parents[1] / "shapes" / "assets" / "sd"


@pytest.mark.skipif(not (PIPE / "model_index.json").is_file(), reason="shapes assets not built")
def test_curve_judges_each_checkpoint_like_the_cells_own_end(script, tmp_path, capsys):
    """A two-epoch cell saving every epoch; `--curve` judges both checkpoints, and the last
    one (the final weights) gets the cell's own held-out gains."""
    import warnings

    row = "t=ppo,sample_num_steps=4,sample_batch_size=8,train_batch_size=8,save_freq=1"
    common = [
        "--row", row, "--budgets", "2x8", "--seeds", "0", "--out", str(tmp_path),
        "--eval-prompts", "3", "--eval-images", "2", "--train-prompts", "4",
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert script.main(common) == 0
        cell = json.loads((tmp_path / "t_2x8_oracle_s0.json").read_text())
        assert script.main([*common, "--curve"]) == 0
    curve = json.loads((tmp_path / "t_2x8_oracle_s0.curve.json").read_text())
    assert [c["epochs"] for c in curve] == [1, 2] and [c["samples"] for c in curve] == [8, 16]
    for key in ("oracle_gain", "reward_gain"):
        assert curve[-1][key]["mean"] == pytest.approx(cell[key]["mean"], abs=1e-4), key
    assert curve[0]["drift"]["mean_abs_pixel"] > 0  # one epoch already moved the images
    assert "| 2 | 16 | " in capsys.readouterr().out
    # The curve file is not a cell: the tables still list the one cell.
    assert len(script._finished_cells(tmp_path)) == 1


def test_curve_without_checkpoints_says_how_to_get_them(script, tmp_path):
    args = ["--row", "t=ppo", "--budgets", "2x16", "--out", str(tmp_path), "--curve"]
    with pytest.raises(FileNotFoundError, match="save_freq=N"):
        script.main(args)
