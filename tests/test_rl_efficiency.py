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
