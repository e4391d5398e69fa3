"""Budgets a real model needs: ``train.max_steps`` (optimizer steps instead of epochs) and
``evaluate.max_tokens`` / ``evaluate.epoch_max_tokens`` (held-out windows spread evenly over the set, the
same for every model, said in summary.json)."""

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from alambic import distill
from alambic.config.base import TrainConfig
from alambic.core.callbacks import Callback, History
from alambic.core.optim import lr_factor
from alambic.data.loaders import EpochSampler
from alambic.errors import ConfigError


def _data(n=256, features=10, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, features, generator=generator)
    labels = (inputs @ torch.randn(features, classes, generator=generator)).argmax(-1)
    return TensorDataset(inputs, labels)


def _loader(dataset, batch_size=32):  # 8 batches an epoch
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), 0))


def _mlp(hidden, seed, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 3))


class Steps(Callback):
    """Every optimizer step's number and learning rate, and the epochs that ended."""

    def __init__(self):
        self.steps, self.rates, self.epochs = [], [], []

    def on_step_end(self, state):
        self.steps.append(state.step)
        self.rates.append(float(state.scheduler.get_last_lr()[0]))

    def on_epoch_end(self, state, epoch, metrics):
        self.epochs.append(epoch)


def test_max_steps_stops_inside_an_epoch_and_the_schedule_spans_it():
    steps, history = Steps(), History()
    distill(
        _mlp(16, 0), _mlp(8, 1), _loader(_data()), epochs=50, max_steps=13, lr=0.1, schedule="cosine",
        warmup_epochs=0.25, callbacks=[steps, history], eval_loader=_loader(_data(64, seed=1)),
        num_classes=3, progress=False, eval_every=0,
    )  # fmt: skip
    assert steps.steps == list(range(1, 14))  # exactly 13 optimizer steps: one epoch of 8, then 5
    assert steps.epochs == [1, 2]
    # warm-up of a quarter epoch (2 steps), then cosine to 0 at step 13, not at step 50 * 8
    expected = [
        0.1 * lr_factor(step, total_steps=13, warmup_steps=2, schedule="cosine", milestones=[], gamma=0.1)
        for step in range(1, 14)
    ]
    assert steps.rates == pytest.approx(expected)
    assert steps.rates[-1] == pytest.approx(0.0, abs=1e-12)
    assert [epoch for epoch, _ in history["accuracy"]] == [2]  # evaluated at the end (eval_every 0)


def _train(run_dir, seed=0):
    return distill(
        _mlp(32, 5), _mlp(16, 7, dropout=0.3), _loader(_data()), max_steps=20, lr=0.05, run_dir=run_dir,
        seed=seed, schedule="cosine", warmup_epochs=1, progress=False,
    )  # fmt: skip


def test_max_steps_resumes_bit_for_bit(tmp_path, monkeypatch):
    uninterrupted = _train(tmp_path / "a")
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert max(record["step"] for record in records) == 20
    latest = json.loads((tmp_path / "a" / "checkpoints" / "latest.json").read_text())
    assert latest["epoch"] == 2  # the third epoch, cut after 4 of its 8 steps

    original = __import__("alambic.core.loop", fromlist=["x"]).save_training_state
    saves = {"count": 0}

    def save_then_die(*args, **kwargs):
        path = original(*args, **kwargs)
        saves["count"] += 1
        if saves["count"] == 1:
            raise KeyboardInterrupt  # killed right after the epoch-1 checkpoint
        return path

    monkeypatch.setattr("alambic.core.loop.save_training_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b")
    monkeypatch.setattr("alambic.core.loop.save_training_state", original)
    resumed = _train(tmp_path / "b", seed=123)  # the seed is overwritten by the checkpoint's RNG
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    again = _train(tmp_path / "b")  # a finished stage resumed: no step left, same weights
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_max_steps_is_checked_and_overrides_epochs():
    with pytest.raises(ConfigError, match="max_steps"):
        distill(_mlp(16, 0), _mlp(8, 1), _loader(_data()), max_steps=0, progress=False)
    assert TrainConfig(epochs=3, max_steps=7).loop().max_steps == 7


# --- evaluate.max_tokens / epoch_max_tokens: whole windows spread evenly, the same for every model ---

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

from corpora import word_corpus  # noqa: E402

from alambic.config import config_from_dict  # noqa: E402
from alambic.data.lm import TextBlocks, TokenRows  # noqa: E402
from alambic.run.building import build_run_datasets  # noqa: E402
from alambic.run.evaluation import AUTO_PARAMETER_TOKENS, held_out_windows  # noqa: E402
from alambic.run.pipeline import run  # noqa: E402


def _blocks(windows=100, block_size=8):
    ids = torch.arange(windows * block_size) % 50
    starts = torch.arange(0, windows * block_size, block_size)
    counts = torch.arange(windows) + 1  # a different unit count per window
    return TextBlocks(ids, starts, block_size=block_size, unit_counts=counts, unit="byte")


def test_held_out_windows_are_spread_evenly_and_whole():
    blocks = _blocks()
    chosen, record = held_out_windows(blocks, 80, parameters=1)
    assert chosen.starts.tolist() == [8 * index for index in range(5, 100, 10)]  # windows 5, 15, ..., 95
    assert chosen.unit_counts.tolist() == list(range(6, 100, 10))  # their own unit counts travel with them
    assert record == {
        "max_tokens": 80, "budget_tokens": 80, "windows": 10, "of_windows": 100, "tokens": 80,
        "of_tokens": 800, "rule": record["rule"],
    }  # fmt: skip
    assert held_out_windows(blocks, 85, parameters=1)[1]["windows"] == 10  # whole windows only
    assert held_out_windows(blocks, 1, parameters=1)[1]["windows"] == 1  # at least one
    assert held_out_windows(blocks, 800, parameters=1)[0] is blocks  # all fit: the set itself
    assert held_out_windows(blocks, "all", parameters=10**15)[0] is blocks
    # auto: the whole set while parameters x tokens <= 10^12, else 10^12 / parameters tokens
    assert held_out_windows(blocks, "auto", parameters=AUTO_PARAMETER_TOKENS // 800)[0] is blocks
    chosen, record = held_out_windows(blocks, "auto", parameters=AUTO_PARAMETER_TOKENS // 160)
    assert record["windows"] == 20 and record["parameters"] == AUTO_PARAMETER_TOKENS // 160
    rows = TokenRows(
        {"input_ids": torch.ones(4, 6, dtype=torch.long), "attention_mask": torch.tensor([[1] * 6] * 2 + [[1] * 2 + [0] * 4] * 2)},
        torch.ones(4), "token",
    )  # fmt: skip
    assert held_out_windows(rows, 8, parameters=1)[1] | {"rule": None} == {
        "max_tokens": 8, "budget_tokens": 8, "windows": 2, "of_windows": 4, "tokens": 8, "of_tokens": 16,
        "rule": None,
    }  # fmt: skip


def lm_config(corpus, **changes):
    """A tiny causal-LM run: chars, windows of 16, GPT-2 models of one layer, 7 optimizer steps a stage."""
    train = {"epochs": 5, "max_steps": 7, "batch_size": 16, "optimizer": "adamw", "lr": 0.003, "log_every": 2}
    gpt2 = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_positions": 64}
    data = {
        "task": "causal-lm",
        "data": {"dataset": "text", "train_file": str(corpus), "tokenizer": "chars", "block_size": 16},
        "teacher": {"model": {"arch": "hf-config", "kwargs": {**gpt2, "n_embd": 32}}, "train": train},
        "student": {"model": {"arch": "hf-config", "kwargs": {**gpt2, "n_embd": 8}}},
        "distill": {"train": train},
        "evaluate": {"batch_sizes": [1], "latency_repeats": 1},
    }
    return config_from_dict(data | changes)


class Evaluations:
    """A progress object that records what each evaluation reported: label -> (done, total) calls."""

    def __init__(self):
        self.calls = {}

    def __call__(self, stage, step, total, values):
        pass

    def evaluation(self, label, done, total, unit):
        self.calls.setdefault(label, []).append((done, total, unit))


def test_a_run_evaluates_the_same_evenly_spread_windows_for_every_model(tmp_path):
    evaluate = {"batch_sizes": [1], "latency_repeats": 1, "max_tokens": 160, "epoch_max_tokens": 320}
    config = lm_config(word_corpus(tmp_path / "corpus.txt"), evaluate=evaluate)
    progress = Evaluations()
    run_dir = run(config, run_dir=tmp_path / "run", progress=progress)
    summary = json.loads((run_dir / "summary.json").read_text())
    _, test_set, info = build_run_datasets(config)
    windows = len(test_set)
    assert summary["evaluation"] | {"rule": None} == {
        "max_tokens": 160, "budget_tokens": 160, "windows": 10, "of_windows": windows, "tokens": 160,
        "of_tokens": 16 * windows, "rule": None,
    }  # fmt: skip
    for name, model in summary["models"].items():
        # 10 windows of 16 characters, 15 predicted in each; bits per character from those windows' units
        assert model["tokens"] == 150 and model["units"] == 150, name
        assert model["bits_per_unit"] == pytest.approx(model["loss"] / math.log(2)), name
        # the fixed prompts are the first 16 tokens of chosen windows 0, 4 and 9 (held-out windows i * W // 20)
        chosen = [(2 * index + 1) * windows // 20 for index in (0, 4, 9)]
        prompts = [info.tokenizer.decode(test_set[index]["input_ids"][:16].tolist()) for index in chosen]
        assert [sample["prompt"] for sample in model["samples"]] == prompts, name
    assert (
        "kl_to_teacher" in summary["models"]["distilled"] and "kl_to_teacher" in summary["models"]["baseline"]
    )
    # the per-epoch evaluations read 20 windows (epoch_max_tokens 320), the final one 10, each to its end
    for label in ("teacher", "baseline", "distill"):
        assert progress.calls[label][0] == (0, 20, "windows") and progress.calls[label][-1] == (
            20,
            20,
            "windows",
        )
    for label in ("evaluate teacher", "evaluate baseline", "evaluate distilled"):
        assert progress.calls[label][-1] == (10, 10, "windows")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for stage in ("teacher", "baseline", "distill"):  # train.max_steps in a run config
        assert max(r["step"] for r in records if r["stage"] == stage) == 7


def test_a_token_budget_is_checked_in_one_line(tmp_path):
    from alambic.errors import ConfigError as Error

    for bad in (0, -5, "some", 1.5):
        with pytest.raises(Error, match=r"evaluate\.max_tokens: give a number of held-out tokens") as caught:
            lm_config(tmp_path / "corpus.txt", evaluate={"max_tokens": bad})
        assert "\n" not in str(caught.value)
