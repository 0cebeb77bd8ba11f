"""reward.adapters called the way each external trainer calls a reward, and import: reward specs.

Each ``_as_*`` helper below replays what one trainer does with a reward (argument order,
keywords, metadata, image type and dtype, and what it does with the result), written from
these versions: Flow-GRPO ``scripts/train_sd3.py`` (and DiffusionNFT ``train_nft_sd3.py``, the
same calls), Flow-Factory ``RewardProcessor._compute_pointwise_batch``, trl 0.23.1
``DDPOTrainer.compute_rewards``. The rewards are the shipped HyperAlign "shapes" checkpoint and
brightness, built offline through the registry.
"""

import importlib
import inspect
import json
import sys
import textwrap
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

import reward.adapters as adapters
from hyperalign.cli import main as cli
from reward.adapters import (
    DDPOReward,
    FlowGRPOReward,
    PointwiseReward,
    contract_images,
    ddpo_reward,
    flow_grpo_reward,
    per_sample_metadata,
    pointwise_reward,
)
from reward.contract import RewardError
from rlhf.rewards import Brightness, get_reward, import_reward

PROMPTS = ["a red circle", "a blue square left of a green triangle", "a red circle", "a star"]


@pytest.fixture(scope="module")
def hyperalign():
    return get_reward("hyperalign:shapes")


@pytest.fixture(scope="module")
def size(hyperalign):
    return hyperalign.model.image_size


def _images(size, b=4, seed=0, dtype=torch.float32):
    """Generator output as diffusers ``output_type="pt"`` gives it: (B, 3, H, W) in [0, 1]."""
    x = torch.rand(b, 3, *size, generator=torch.Generator().manual_seed(seed))
    return x.to(dtype)


def _plain(fn, images, prompts):
    """The reward called by this project's contract: the reference scores."""
    rewards, _ = fn(images, prompts, [{} for _ in prompts])
    return torch.as_tensor(rewards).float().cpu()


# ------------------------------------------------------------------ Flow-GRPO / DiffusionNFT


def _as_flow_grpo(reward_fn, batches, only_strict=True):
    """Flow-GRPO's sampling loop: ``executor.submit(reward_fn, images, prompts,
    prompt_metadata, only_strict=True)`` per batch, then ``rewards, reward_metadata =
    future.result()``, each value ``torch.as_tensor(v, device).float()``, concatenated over the
    batches per key; "avg" is repeated over the trained timesteps."""
    with ThreadPoolExecutor(max_workers=8) as executor:
        futures = [
            executor.submit(reward_fn, images, prompts, metadata, only_strict=only_strict)
            for images, prompts, metadata in batches
        ]
        results = [f.result() for f in futures]
    per_batch = []
    for rewards, reward_metadata in results:
        assert isinstance(rewards, dict) and isinstance(reward_metadata, dict)
        per_batch.append({k: torch.as_tensor(v, device="cpu").float() for k, v in rewards.items()})
    gathered = {k: torch.cat([b[k] for b in per_batch]) for k in per_batch[0]}
    gathered["avg"].unsqueeze(1).repeat(1, 3)  # (B, num_train_timesteps), as the trainer does
    return gathered, results


@pytest.mark.parametrize("metadata", [{}, None, "per-sample"], ids=["{}", "None", "dicts"])
def test_flow_grpo_call_convention(hyperalign, size, metadata):
    fn = FlowGRPOReward({"hyperalign": (hyperalign, 1.0)})
    batches = []
    for seed in (0, 1):
        images = _images(size, seed=seed)
        meta = [{"tag": p} for p in PROMPTS] if metadata == "per-sample" else metadata
        batches.append((images, PROMPTS, meta))
    gathered, results = _as_flow_grpo(fn, batches)
    for scores, info in results:
        assert set(scores) == {"hyperalign", "avg"} and info == {}
        for values in scores.values():
            assert isinstance(values, list) and len(values) == 4
            assert all(type(v) is float for v in values)
    expected = torch.cat([_plain(hyperalign, im, PROMPTS) for im, _, _ in batches])
    torch.testing.assert_close(gathered["hyperalign"], expected)
    torch.testing.assert_close(gathered["avg"], expected)  # one reward of weight 1
    # Evaluation passes only_strict=False; the scores do not change.
    again, _ = _as_flow_grpo(fn, batches, only_strict=False)
    torch.testing.assert_close(again["avg"], gathered["avg"])


def test_plain_reward_fails_the_flow_grpo_way(hyperalign, size):
    # The failures the adapter removes (negative control for the replay above).
    images = _images(size)
    with pytest.raises(TypeError, match="only_strict"):
        hyperalign(images, PROMPTS, [{}] * 4, only_strict=True)
    with pytest.raises(ValueError, match="0 metadata entries"):
        hyperalign(images, PROMPTS, {})


def test_flow_grpo_image_forms_score_like_the_plain_reward(hyperalign, size):
    fn = FlowGRPOReward({"hyperalign": (hyperalign, 1.0), "brightness": (Brightness(), 0.0)})
    x = _images(size)
    u8 = (x * 255).round().to(torch.uint8)  # (B, 3, H, W)
    nhwc = u8.permute(0, 2, 3, 1).numpy()  # Flow-GRPO scorers' numpy form: uint8 (B, H, W, 3)
    pil = [Image.fromarray(a) for a in nhwc]
    bf16 = x.to(torch.bfloat16)  # DiffusionNFT decodes under autocast
    for images in (x, nhwc, pil, bf16):
        scores, _ = fn(images, PROMPTS, {}, only_strict=True)
        torch.testing.assert_close(
            torch.tensor(scores["hyperalign"]), _plain(hyperalign, images, PROMPTS)
        )
    # Brightness sees the contract's float (B, 3, H, W) in [0, 1], whatever came in.
    for images in (nhwc, pil):
        scores, _ = fn(images, PROMPTS, None)
        torch.testing.assert_close(
            torch.tensor(scores["brightness"]), u8.float().div(255).mean(dim=(1, 2, 3))
        )


def _red_mean(images, prompts, metadata):
    """A plain function in the style of Flow-GRPO's own scorers: numpy scores and {}."""
    return images[:, 0].float().mean(dim=(1, 2)).numpy(), {}


def test_flow_grpo_avg_is_the_weighted_sum(hyperalign, size):
    fn = flow_grpo_reward(
        "shapes",
        weights={"hyperalign": 1.0, "brightness": 0.5, "red": -2.0},
        rewards={"red": _red_mean},
    )
    assert set(fn.critics) == {"hyperalign", "brightness", "red"}
    x = _images(size)
    scores, info = fn(x, PROMPTS, {}, only_strict=True)
    assert list(scores) == ["hyperalign", "brightness", "red", "avg"] and info == {}
    h = _plain(hyperalign, x, PROMPTS)
    b = x.mean(dim=(1, 2, 3))
    r = x[:, 0].mean(dim=(1, 2))
    torch.testing.assert_close(torch.tensor(scores["hyperalign"]), h)
    torch.testing.assert_close(torch.tensor(scores["brightness"]), b)
    torch.testing.assert_close(torch.tensor(scores["red"]), r)
    # A sum of weighted scores (weights sum to -0.5, so a mean would differ).
    torch.testing.assert_close(torch.tensor(scores["avg"]), 1.0 * h + 0.5 * b - 2.0 * r)


def test_flow_grpo_metadata_reaches_every_critic(size):
    seen = []

    def record(images, prompts, metadata):
        seen.append(list(metadata))
        return torch.zeros(len(prompts)), {}

    fn = FlowGRPOReward({"a": (record, 1.0), "b": (record, 1.0)})
    meta = [{"i": i} for i in range(4)]
    fn(_images(size), PROMPTS, meta, only_strict=True)
    fn(_images(size), tuple(PROMPTS), {})
    assert seen == [meta, meta, [{}] * 4, [{}] * 4]


def test_flow_grpo_errors(hyperalign, size):
    with pytest.raises(ValueError, match="reserved"):
        FlowGRPOReward({"avg": (hyperalign, 1.0)})
    with pytest.raises(ValueError, match="no 'hyperalign' entry"):
        flow_grpo_reward("shapes", weights={"brightness": 1.0})
    with pytest.raises(ValueError, match=r"\['red'\] have no weight"):
        flow_grpo_reward("shapes", rewards={"red": _red_mean})
    with pytest.raises(ValueError, match="unknown reward spec 'aesthetic'"):
        flow_grpo_reward("shapes", weights={"hyperalign": 1.0, "aesthetic": 1.0})
    fn = FlowGRPOReward({"hyperalign": (hyperalign, 1.0)})
    with pytest.raises(TypeError, match="one dict per prompt"):
        fn(_images(size), PROMPTS, {"tag": "x"})
    with pytest.raises(ValueError, match="4 prompts but 2 metadata"):
        fn(_images(size), PROMPTS, [{}, {}])
    with pytest.raises(TypeError, match="sequence of strings"):
        fn(_images(size), "a red circle", None)
    with pytest.raises(RewardError, match="critic 'hyperalign'.*\\[0, 1\\]"):
        fn(_images(size) * 2 - 1, PROMPTS, None)  # [-1, 1] images: the fix is named


# ------------------------------------------------------------------------------ Flow-Factory


def _as_flow_factory(model, samples):
    """Flow-Factory's pointwise batch: pass the sample fields that the reward's ``__call__``
    names (every field if it takes ``**kwargs``), media as tensors when ``use_tensor_inputs``
    else as PIL images, then ``torch.as_tensor(output.rewards, device="cpu", float32)``."""
    params = inspect.signature(model.__call__).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    names = [k for k in samples[0] if takes_all or k in params]
    batch = {k: [s[k] for s in samples] for k in names if all(s[k] is not None for s in samples)}
    if not getattr(model, "use_tensor_inputs", False):
        batch["image"] = [
            Image.fromarray((t * 255).round().byte().permute(1, 2, 0).numpy())
            for t in batch["image"]
        ]
    out = model(**batch)
    rewards = out.rewards if hasattr(out, "rewards") else out
    return torch.as_tensor(rewards, device="cpu", dtype=torch.float32), sorted(batch), out


def _samples(images, prompts):
    """Flow-Factory samples: one image (C, H, W) in [0, 1] each, among other fields."""
    return [
        {"prompt": p, "image": im, "prompt_ids": torch.zeros(8), "latents": torch.zeros(4, 2, 2)}
        for p, im in zip(prompts, images)
    ]


def test_pointwise_like_flow_factory(hyperalign, size):
    fn = PointwiseReward(hyperalign)
    x = (_images(size) * 255).round() / 255  # exact through the uint8 PIL round trip
    rewards, passed, out = _as_flow_factory(fn, _samples(x, PROMPTS))
    assert passed == ["image", "prompt"]  # not the latents: __call__ names its fields
    assert rewards.shape == (4,) and set(out.extra_info) >= {"angle", "distance"}
    torch.testing.assert_close(rewards, _plain(hyperalign, x, PROMPTS))
    # With use_tensor_inputs=False Flow-Factory passes PIL images: same scores.
    fn.use_tensor_inputs = False
    pil_rewards, _, _ = _as_flow_factory(fn, _samples(x, PROMPTS))
    torch.testing.assert_close(pil_rewards, rewards)
    # Brightness through the same adapter; one prompt string is one sample.
    b = pointwise_reward("shapes")
    assert b(prompt=PROMPTS[0], image=[x[0]]).rewards.shape == (1,)
    bright, _, _ = _as_flow_factory(PointwiseReward(Brightness()), _samples(x, PROMPTS))
    torch.testing.assert_close(bright, x.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="image=None"):
        fn(prompt=PROMPTS, image=None)


@pytest.fixture
def stub_flow_factory(monkeypatch):
    """``flow_factory.rewards`` as its documented base classes (the package is not installed):
    ``PointwiseRewardModel(config, accelerator)`` sets ``device`` (the accelerator's when the
    config says "cuda") and ``dtype``; ``RewardModelOutput(rewards, extra_info)``."""

    class PointwiseRewardModel:
        required_fields = ("image", "prompt")
        use_tensor_inputs = False

        def __init__(self, config, accelerator):
            self.config, self.accelerator = config, accelerator
            cuda = config.device == torch.device("cuda")
            self.device = accelerator.device if cuda else config.device
            self.dtype = config.dtype
            self.model = None

    @dataclass
    class RewardModelOutput:
        rewards: object
        extra_info: dict | None = None

    package = types.ModuleType("flow_factory")
    rewards = types.ModuleType("flow_factory.rewards")
    rewards.PointwiseRewardModel = PointwiseRewardModel
    rewards.RewardModelOutput = RewardModelOutput
    package.rewards = rewards
    monkeypatch.setitem(sys.modules, "flow_factory", package)
    monkeypatch.setitem(sys.modules, "flow_factory.rewards", rewards)
    adapters.__dict__.pop("FlowFactoryHyperAlign", None)
    yield rewards
    adapters.__dict__.pop("FlowFactoryHyperAlign", None)  # built on the stub: drop it


def _reward_args(**extra):
    """A Flow-Factory reward entry: declared fields, and YAML extras read as attributes."""
    return types.SimpleNamespace(
        name="hyperalign", device=torch.device("cpu"), dtype=torch.float32, batch_size=4, **extra
    )


def test_flow_factory_class_loads_by_python_path(stub_flow_factory, hyperalign, size):
    # Flow-Factory resolves `reward_model: reward.adapters.FlowFactoryHyperAlign` like this.
    module_path, class_name = "reward.adapters.FlowFactoryHyperAlign".rsplit(".", 1)
    cls = getattr(importlib.import_module(module_path), class_name)
    accelerator = types.SimpleNamespace(device=torch.device("cpu"))
    model = cls(config=_reward_args(model_path="shapes"), accelerator=accelerator)
    assert isinstance(model, stub_flow_factory.PointwiseRewardModel)  # what its trainer runs
    assert model.model is not None and model.use_tensor_inputs
    x = _images(size)
    rewards, passed, out = _as_flow_factory(model, _samples(x, PROMPTS))
    assert passed == ["image", "prompt"]
    assert isinstance(out, stub_flow_factory.RewardModelOutput)
    torch.testing.assert_close(rewards, _plain(hyperalign, x, PROMPTS))
    with pytest.raises(ValueError, match="add `model_path: "):
        cls(config=_reward_args(), accelerator=accelerator)


def test_flow_factory_class_needs_flow_factory(monkeypatch):
    monkeypatch.setitem(sys.modules, "flow_factory", None)  # not importable
    adapters.__dict__.pop("FlowFactoryHyperAlign", None)
    with pytest.raises(ImportError, match="install Flow-Factory"):
        adapters.FlowFactoryHyperAlign  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        adapters.NoSuchThing  # noqa: B018


# ------------------------------------------------------------------------ trl <= 0.23 DDPO


def _as_trl(reward_fn, batches, is_async):
    """trl 0.23.1 ``DDPOTrainer.compute_rewards`` and ``step``: sync, ``reward, meta =
    reward_fn(images, prompts, prompt_metadata)``; async, ``executor.map(lambda x:
    reward_fn(*x), pairs)`` then ``reward.result()``, ``meta.result()``; then
    ``torch.as_tensor(reward, device)``, ``torch.cat``, ``.cpu().numpy()``."""
    if not is_async:
        rewards = []
        for images, prompts, prompt_metadata in batches:
            reward, reward_metadata = reward_fn(images, prompts, prompt_metadata)
            rewards.append((torch.as_tensor(reward, device="cpu"), reward_metadata))
    else:
        with ThreadPoolExecutor(max_workers=2) as executor:
            results = executor.map(lambda x: reward_fn(*x), batches)
            rewards = [
                (torch.as_tensor(reward.result(), device="cpu"), reward_metadata.result())
                for reward, reward_metadata in results
            ]
    rewards, metadata = zip(*rewards)
    for i, r in enumerate(rewards[-1]):  # the image hook of trl's example: rewards[i].item()
        assert isinstance(r.item(), float), i
    return torch.cat(rewards), metadata


def _trl_batches(size, n=2):
    """trl's batches: fp16 images (its default mixed precision), tuples from the prompt_fn."""
    out = []
    for seed in range(n):
        prompts, metadata = zip(*[(p, {}) for p in PROMPTS])
        out.append((_images(size, seed=seed, dtype=torch.float16), prompts, metadata))
    return out


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_ddpo_like_trl(hyperalign, size, is_async):
    batches = _trl_batches(size)
    fn = DDPOReward(hyperalign, async_reward_computation=is_async)
    rewards, metadata = _as_trl(fn, batches, is_async)
    assert rewards.dtype == torch.float32 and rewards.shape == (8,)
    rewards.numpy()  # trl logs the gathered numpy array
    assert all(set(m) >= {"angle", "distance"} for m in metadata)
    expected = torch.cat([_plain(hyperalign, im, p) for im, p, _ in batches])
    torch.testing.assert_close(rewards, expected)
    bright, _ = _as_trl(DDPOReward(Brightness(), is_async), batches, is_async)
    assert bright.dtype == torch.float32
    torch.testing.assert_close(
        bright, torch.cat([im.float().mean(dim=(1, 2, 3)) for im, *_ in batches])
    )


def test_trl_async_needs_the_adapter(hyperalign, size):
    # Negative control: trl's async path calls .result() on what the reward returns.
    with pytest.raises(AttributeError, match="result"):
        _as_trl(hyperalign, _trl_batches(size, n=1), is_async=True)
    fn = ddpo_reward("shapes", async_reward_computation=True)
    rewards, _ = _as_trl(fn, _trl_batches(size, n=1), is_async=True)
    assert rewards.shape == (4,)


def test_ddpo_reward_validates_what_a_reward_returns(size):
    bad = DDPOReward(lambda images, prompts, metadata: (torch.zeros(3), {}))
    with pytest.raises(RewardError, match=r"shape \(3,\).*trl DDPOTrainer batch of 4"):
        bad(_images(size, dtype=torch.float16), tuple(PROMPTS), ({},) * 4)


# ---------------------------------------------------------------------------- shared helpers


def test_contract_images_and_metadata_helpers():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float16)
    assert contract_images(x) is x  # the contract's form already: no copy, dtype kept
    u8 = (torch.rand(2, 8, 8, 3) * 255).to(torch.uint8)
    out = contract_images(u8)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out, u8.permute(0, 3, 1, 2).float() / 255)
    mixed = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (4, 6), (255, 0, 0))]
    out = contract_images(mixed)  # resized to the first image's size
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out[:, 0], torch.ones(2, 8, 8))
    assert per_sample_metadata({}, 2) == [{}, {}] and per_sample_metadata([], 2) == [{}, {}]
    assert per_sample_metadata(({"a": 1}, {"a": 2}), 2) == [{"a": 1}, {"a": 2}]
    with pytest.raises(TypeError, match="sequence of dicts"):
        per_sample_metadata("abc", 3)


# ----------------------------------------------------------------------------- import: specs


class RecordingBrightness:
    """A reward class without constructor arguments: ``import:`` instantiates it."""

    calls: list[int] = []

    def __call__(self, images, prompts, metadata):
        RecordingBrightness.calls.append(len(prompts))
        return images.float().mean(dim=(1, 2, 3)), {}


USER_MODULE = """
import torch

BUILT = []


def reward_fn(images, prompts, metadata):
    return images.float().mean(dim=(1, 2, 3)), {}


class NoArgs:
    def __call__(self, images, prompts, metadata):
        return torch.zeros(len(prompts)), {}


class NeedsArgs:
    def __init__(self, scale):
        self.scale = scale

    def __call__(self, images, prompts, metadata):
        return torch.zeros(len(prompts)), {}

    @classmethod
    def default(cls):
        return cls(scale=1.0)


def make_reward(scale=2.0):
    BUILT.append(scale)
    return NoArgs()


def make_nothing():
    return 3


def two_args(images, prompts):
    return torch.zeros(len(prompts)), {}


NOT_CALLABLE = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's reward module on the Python path, named uniquely for this test."""
    name = f"user_rewards_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / f"{name}_broken.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for mod in (name, f"{name}_broken"):
        sys.modules.pop(mod, None)


def test_import_spec_rules(user_module):
    module = importlib.import_module(user_module)
    # A function with required arguments is the reward itself.
    assert get_reward(f"import:{user_module}:reward_fn") is module.reward_fn
    # A class without constructor arguments is instantiated.
    assert isinstance(get_reward(f"import:{user_module}:NoArgs"), module.NoArgs)
    # A factory whose arguments all have defaults is called once, with none.
    assert isinstance(get_reward(f"import:{user_module}:make_reward"), module.NoArgs)
    assert module.BUILT == [2.0]
    # A dotted attribute; and a module of this test suite.
    built = import_reward(f"import:{user_module}:NeedsArgs.default")
    assert isinstance(built, module.NeedsArgs) and built.scale == 1.0
    fn = get_reward("import:tests.test_adapters:RecordingBrightness")
    assert isinstance(fn, RecordingBrightness)
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(fn(x, ["a", "b"], [{}, {}])[0], x.mean(dim=(1, 2, 3)))


@pytest.mark.parametrize(
    "target, error",
    [
        ("", "is malformed: expected import:<package.module>:<attribute>"),
        ("{m}", "is malformed"),
        ("{m}:", "is malformed"),
        ("{m}:a:b", "is malformed"),
        ("1mod:fn", "is malformed"),
        ("no_such_module_xyz:fn", "no module named 'no_such_module_xyz'.*Python path"),
        ("no_such_pkg_xyz.sub:fn", "no module named 'no_such_pkg_xyz'"),
        ("{m}_broken:fn", "was found but importing it failed.*no_such_dependency_xyz"),
        ("{m}:nope", "has no attribute 'nope'; callables defined there: NeedsArgs, NoArgs"),
        ("{m}:NOT_CALLABLE", "is a int, not a reward function"),
        ("{m}:NeedsArgs", r"class 'NeedsArgs' needs constructor arguments \(scale\)"),
        ("{m}:make_nothing", "returned a int, not a reward function"),
        ("{m}:two_args", r"cannot be called as reward_fn\(images, prompts, metadata\)"),
    ],
)
def test_import_spec_errors(user_module, target, error):
    with pytest.raises(ValueError, match=error):
        get_reward("import:" + target.format(m=user_module))


def test_import_spec_on_the_rl_command_line(tmp_path):
    RecordingBrightness.calls.clear()
    spec = "import:tests.test_adapters:RecordingBrightness"
    overrides = [f"logdir={tmp_path}", "run_name=imp", "num_epochs=1", "sample_num_steps=2"]
    argv = ["rl-train", "--preset", "tiny-cpu"]
    for item in [*overrides, f"reward_fn={spec}"]:
        argv += ["--set", item]
    assert cli(argv) == 0
    assert RecordingBrightness.calls, "the imported reward was never called"
    saved = json.loads((tmp_path / "imp" / "config.json").read_text())
    assert saved["reward_fn"] == spec  # the run's config names the reward by its import path
