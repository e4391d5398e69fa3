"""Strategies beyond one frozen teacher: ensembles, weight averaging, mutual learning, self-distillation,
chains (born-again, assistants) and mixed views."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from alambic.config import Term, config_from_dict, load_config
from alambic.core.distiller import Teacher
from alambic.errors import ConfigError
from alambic.losses import get_loss
from alambic.strategies import (
    EnsembleModel,
    MixedDataset,
    MutualDistiller,
    SelfDistiller,
    average_weights,
    mutual_learning,
    train_teacher_free,
)

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ROOT / "recipes" / "strategies"
QUICK = ["evaluate.latency_repeats=1", "evaluate.batch_sizes=[1]", "distill.train.epochs=1"]
NO_REPORT = ["stages=[teacher, baseline, distill, evaluate]"]


class Constant(nn.Module):
    """A 'teacher' whose logits are fixed rows, whatever the input (one row per sample)."""

    def __init__(self, rows):
        super().__init__()
        self.register_buffer("rows", torch.tensor(rows))

    def forward(self, x):
        return self.rows[: x.shape[0]]


def _softmax(row, temperature):
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


A = [[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]  # teacher a, two samples
B = [[0.0, 3.0, 0.0], [1.0, 1.0, 4.0]]  # teacher b


def test_ensemble_targets_are_the_stated_average_of_softened_probabilities():
    temperature = 2.0
    x = torch.zeros(2, 5)
    ensemble = EnsembleModel([Constant(A), Constant(B)], temperature=temperature, weights=[1.0, 3.0])
    targets = F.softmax(ensemble(x) / temperature, dim=-1)  # what a kd term at T sees
    for sample in range(2):  # by hand: 0.25 * p_a + 0.75 * p_b
        p_a, p_b = _softmax(A[sample], temperature), _softmax(B[sample], temperature)
        expected = [0.25 * a + 0.75 * b for a, b in zip(p_a, p_b)]
        assert targets[sample].tolist() == pytest.approx(expected, abs=1e-6)
    # confidence: per sample, each teacher's weight is its top probability over the sum of the tops
    confident = EnsembleModel([Constant(A), Constant(B)], temperature=temperature, weighting="confidence")
    targets = F.softmax(confident(x) / temperature, dim=-1)
    p_a, p_b = _softmax(A[1], temperature), _softmax(B[1], temperature)
    w_a = max(p_a) / (max(p_a) + max(p_b))
    assert targets[1].tolist() == pytest.approx([w_a * a + (1 - w_a) * b for a, b in zip(p_a, p_b)], abs=1e-6)
    # entropy: weights softmax(-H)
    entropic = EnsembleModel([Constant(A), Constant(B)], temperature=temperature, weighting="entropy")
    targets = F.softmax(entropic(x) / temperature, dim=-1)
    h_a, h_b = (-sum(p * math.log(p) for p in dist) for dist in (p_a, p_b))
    w_a = math.exp(-h_a) / (math.exp(-h_a) + math.exp(-h_b))
    assert targets[1].tolist() == pytest.approx([w_a * a + (1 - w_a) * b for a, b in zip(p_a, p_b)], abs=1e-6)
    # the argmax of the ensemble is the argmax of the average (what evaluation reports)
    assert ensemble(x).argmax(-1).tolist() == [1, 2]


def test_ensemble_kd_weights_teachers_by_per_sample_correctness():
    temperature = 1.0
    members = torch.stack([torch.tensor(A), torch.tensor(B)], dim=1)  # [B=2, K=2, C=3]
    student = torch.zeros(2, 3)
    labels = torch.tensor([0, 1])  # sample 0: only a is right; sample 1: nobody is right (a says 1? no: ties)
    value = get_loss("ensemble_kd")(
        student, members, labels=labels, temperature=temperature, weighting="correct"
    )
    # sample 0: a predicts 0 (right), b predicts 1 (wrong) -> target p_a
    # sample 1: a predicts 1 (right), b predicts 2 (wrong) -> target p_a
    expected = 0.0
    for sample in range(2):
        target = _softmax(A[sample], temperature)
        expected += sum(t * math.log(t / (1 / 3)) for t in target)
    assert value.item() == pytest.approx(expected / 2, abs=1e-6)
    # nobody right -> the fixed (equal) weights
    value = get_loss("ensemble_kd")(
        student[:1], members[:1], labels=torch.tensor([2]), weighting="correct", temperature=1.0
    )
    mean = [(a + b) / 2 for a, b in zip(_softmax(A[0], 1.0), _softmax(B[0], 1.0))]
    assert value.item() == pytest.approx(sum(t * math.log(t * 3) for t in mean), abs=1e-6)


def test_the_ensemble_refuses_correctness_weighting_and_too_few_teachers():
    with pytest.raises(ConfigError, match="ensemble_kd"):
        EnsembleModel([Constant(A), Constant(B)], weighting="correct")
    with pytest.raises(ConfigError, match="at least two"):
        EnsembleModel([Constant(A)])
    with pytest.raises(ConfigError, match="non-negative"):
        EnsembleModel([Constant(A), Constant(B)], weights=[1.0])


def test_average_weights_is_the_parameter_mean_and_refuses_other_architectures():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    fused = average_weights([a, b], weights=[1.0, 3.0])
    assert torch.allclose(fused.weight, 0.25 * a.weight + 0.75 * b.weight)
    assert torch.allclose(fused.bias, 0.25 * a.bias + 0.75 * b.bias)
    assert fused is not a and not torch.equal(a.weight, fused.weight)  # the inputs are left alone
    with pytest.raises(ConfigError, match="one architecture"):
        average_weights([a, nn.Linear(4, 2)])


def _peers(count, seed=0):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(count)]


def test_mutual_terms_use_the_other_peers_current_detached_outputs():
    peers = _peers(3)
    module = MutualDistiller(peers)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    losses = module(x, y, None)
    z = [peer(x) for peer in peers]
    kd = get_loss("kd")
    expected = (kd(z[0], z[1], temperature=1.0) + kd(z[0], z[2], temperature=1.0)) / 2
    assert losses["peer0/kd"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses["peer1/ce"].item() == pytest.approx(F.cross_entropy(z[1], y).item(), rel=1e-6)
    # each peer's kd term reaches that peer only: the others are targets
    losses["peer0/kd"].backward()
    assert peers[0][0].weight.grad.abs().sum() > 0
    assert peers[1][0].weight.grad is None and peers[2][0].weight.grad is None
    # "current": change peer 1 and peer 0's term follows
    with torch.no_grad():
        peers[1][2].weight *= 3.0  # (a constant shift would leave softmax unchanged)
    again = module(x, y, None)["peer0/kd"].item()
    z1 = peers[1](x)
    expected = (kd(z[0], z1, temperature=1.0) + kd(z[0], z[2], temperature=1.0)) / 2
    assert again == pytest.approx(expected.item(), rel=1e-6) and again != pytest.approx(
        losses["peer0/kd"].item()
    )


def test_mutual_learning_updates_every_peer_and_online_kd_keeps_terms_per_peer():
    peers = _peers(2)
    before = [[p.detach().clone() for p in peer.parameters()] for peer in peers]
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trained = mutual_learning(peers, loader, epochs=1, optimizer="adamw", lr=0.01, log_every=1)
    assert trained[0] is peers[0] and trained[1] is peers[1]
    for peer, old in zip(peers, before):
        assert all(not torch.equal(p.cpu(), q) for p, q in zip(peer.parameters(), old))
    module = MutualDistiller(_peers(2), peer_terms=[None, [Term(loss="ce")]])
    assert set(module(x[:4], y[:4], None)) == {"peer0/ce", "peer0/kd", "peer1/ce", "total"}
    with pytest.raises(ConfigError, match="logits"):
        MutualDistiller(_peers(2), [Term(loss="fitnet", student="0", teacher="0")])


def test_alternating_mutual_learning_updates_one_peer_per_step_in_turn_and_resumes_the_turn():
    peers = _peers(2)
    module = MutualDistiller(peers, alternate=True)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    changed = []
    for _step in range(4):
        before = [[p.detach().clone() for p in peer.parameters()] for peer in peers]
        losses = module(x, y, None)
        assert set(losses) == {"peer0/ce", "peer0/kd", "peer1/ce", "peer1/kd", "total"}
        losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        changed.append(
            [
                not all(torch.equal(p.cpu(), q) for p, q in zip(peer.parameters(), old))
                for peer, old in zip(peers, before)
            ]
        )
    # momentum and weight decay do not move the waiting peer either
    assert changed == [[True, False], [False, True], [True, False], [False, True]]
    assert int(module.turn) == 4
    resumed = MutualDistiller(_peers(2), alternate=True)
    resumed.load_state_dict(module.state_dict())
    assert resumed(x, y, None)["total"].item() == pytest.approx(
        sum(v.item() for k, v in module(x, y, None).items() if k.startswith("peer0/")), rel=1e-6
    )
    module.eval()  # evaluation sums every peer and does not take a turn
    assert int(module.turn) == 5 and set(module(x, y, None)) >= {"total"} and int(module.turn) == 5


def test_self_distillation_trains_exits_that_never_reach_the_student():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    keys = set(student.state_dict())
    module = SelfDistiller(
        student, ["1", "3"], example_input=torch.randn(1, 4), temperature=2.0, kd_weight=0.5
    )
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    losses = module(x, y, None)
    assert set(losses) == {"ce", "exit:1/ce", "exit:1/kd", "exit:3/ce", "exit:3/kd", "total"}
    features = torch.relu(student[0](x))
    exit_logits = module.exits[0](features)
    expected = 0.5 * get_loss("kd")(exit_logits, student(x), temperature=2.0)
    assert losses["exit:1/kd"].item() == pytest.approx(expected.item(), rel=1e-6)
    losses["exit:1/kd"].backward()  # the deepest output is the target: no gradient reaches the head
    assert student[4].weight.grad is None and module.exits[0].weight.grad.abs().sum() > 0
    assert set(module.student.state_dict()) == keys


def test_train_teacher_free_returns_the_student_and_the_old_name_warns():
    import alambic
    from alambic.strategies import online

    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    module = SelfDistiller(student, ["1"], example_input=x[:1])
    before = student[2].weight.detach().clone()
    assert train_teacher_free(module, loader, epochs=1, lr=0.1) is student
    assert not torch.equal(student[2].weight, before)
    assert online.train_teacher_free is not alambic.train_module  # two functions, two names
    with pytest.warns(DeprecationWarning, match="train_teacher_free"):
        assert online.train_module(module, loader, epochs=1, lr=0.1) is student


def test_mixed_views_are_convex_combinations_or_pasted_boxes():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    base = torch.utils.data.TensorDataset(images, torch.tensor([0, 1]))
    torch.manual_seed(3)
    for _ in range(10):
        mixed, label = MixedDataset(base, "mixup", alpha=1.0)[0]
        # lam x_0 + (1 - lam) x_j for j in {0, 1}; the label of the larger share
        lam = ((mixed - images[1]) / (images[0] - images[1])).flatten()
        assert torch.allclose(lam, lam[0].expand_as(lam), atol=1e-5) or torch.equal(mixed, images[0])
        assert label == (0 if lam[0] >= 0.5 or torch.equal(mixed, images[0]) else 1)
        cut, label = MixedDataset(base, "cutmix", alpha=1.0)[0]
        from_other = (cut == images[1]) & (images[0] != images[1])
        assert torch.equal(cut[~from_other], images[0][~from_other])  # the rest is the sample itself
        assert label == (1 if from_other.float().mean() > 0.5 else 0)
    with pytest.raises(ConfigError):
        MixedDataset(base, "blend")


def _run(tmp_path, recipe, *overrides):
    from alambic.run.pipeline import run

    config = load_config(STRATEGIES / recipe, [*QUICK, *overrides])
    return run(config, run_dir=tmp_path / "run")


def test_born_again_generations_are_separate_checkpoints_each_taught_by_the_previous(tmp_path, monkeypatch):
    import alambic.run.stages as stages_module

    taught_by = {}
    original = stages_module.train_stage

    def recording(context, stage, model, terms, train, teacher, module=None, **options):
        taught_by[stage] = (
            None if teacher is None else {k: v.clone() for k, v in teacher.model.state_dict().items()}
        )
        return original(context, stage, model, terms, train, teacher, module, **options)

    monkeypatch.setattr(stages_module, "train_stage", recording)
    run_dir = _run(tmp_path, "born-again.yaml", "teacher.train.epochs=1", *NO_REPORT)
    files = [
        run_dir / name / "model.safetensors"
        for name in ("teacher", "generation_1", "generation_2", "student")
    ]
    weights = [load_file(str(path)) for path in files]
    for earlier, later in zip(weights, weights[1:]):
        assert set(earlier) == set(later) and not torch.equal(earlier["head.weight"], later["head.weight"])
    for stage, teacher_weights in zip(("generation_1", "generation_2", "distill"), weights):
        assert all(torch.equal(taught_by[stage][key].cpu(), value) for key, value in teacher_weights.items())
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"generation_1", "generation_2", "distilled"} <= set(summary["models"])


def test_a_teacher_assistant_chain_teaches_the_student_through_the_assistant(tmp_path, monkeypatch):
    import alambic.run.stages as stages_module

    teachers = {}
    original = stages_module.train_stage

    def recording(context, stage, model, terms, train, teacher, module=None, **options):
        teachers[stage] = teacher.model if teacher is not None else None
        return original(context, stage, model, terms, train, teacher, module, **options)

    monkeypatch.setattr(stages_module, "train_stage", recording)
    run_dir = _run(tmp_path, "assistants.yaml", "teacher.train.epochs=1", *NO_REPORT)
    assistant = load_file(str(run_dir / "assistant_1" / "model.safetensors"))
    assert assistant["hidden.0.0.weight"].shape == (128, 64)
    assert all(torch.equal(teachers["distill"].state_dict()[k], v) for k, v in assistant.items())
    assert teachers["assistant_1"].hidden[0][0].out_features == 512  # the assistant's own teacher


def test_ensemble_runs_train_each_teacher_and_fuse_their_weights(tmp_path):
    from alambic.run.building import build_named_model

    run_dir = _run(
        tmp_path,
        "weight-average.yaml",
        "strategy.train.epochs=1",
        *NO_REPORT,
        "strategy.teachers.0.kwargs.hidden=[16]",
        "strategy.teachers.1.kwargs.hidden=[16]",
        "strategy.teachers.2.kwargs.hidden=[16]",
    )
    members = [load_file(str(run_dir / f"teacher_{k}" / "model.safetensors")) for k in (1, 2, 3)]
    assert not torch.equal(members[0]["head.weight"], members[1]["head.weight"])  # different data orders
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"teacher_1", "teacher_2", "teacher_3", "teacher", "baseline", "distilled"} == set(
        summary["models"]
    )
    assert summary["models"]["teacher"]["parameters"] == summary["models"]["teacher_1"]["parameters"]
    del build_named_model


def test_mutual_and_self_distill_runs_need_no_teacher_and_save_what_they_promise(tmp_path):
    run_dir = _run(tmp_path / "m", "mutual.yaml", "stages=[distill, evaluate]")
    assert (run_dir / "peer_1" / "model.safetensors").is_file()
    student = load_file(str(run_dir / "student" / "model.safetensors"))
    peer = load_file(str(run_dir / "peer_1" / "model.safetensors"))
    assert set(student) == set(peer) and not torch.equal(student["head.weight"], peer["head.weight"])
    run_dir = _run(tmp_path / "s", "self-distill.yaml", "stages=[distill, evaluate]")
    student = load_file(str(run_dir / "student" / "model.safetensors"))
    assert set(student) == {f"hidden.{i}.0.{p}" for i in range(3) for p in ("weight", "bias")} | {
        "head.weight",
        "head.bias",
    }


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {
                "strategy": {"kind": "mutual", "peers": [{"arch": "mlp"}]},
                "teacher": None,
                "stages": ["teacher", "distill"],
            },
            "teacher",
        ),
        ({"strategy": {"kind": "ensemble", "teachers": [{"arch": "mlp"}, {"arch": "mlp"}]}}, "checkpoint"),
        ({"strategy": {"kind": "born_again"}, "teacher": None}, "required"),
        ({"strategy": {"kind": "self_distill", "exits": ["hidden.0"]}}, "teacher-free"),
        ({"strategy": {"kind": "dml"}}, "kind"),
        (
            {
                "teacher": None,
                "stages": ["distill"],
                "strategy": {"kind": "ensemble", "teachers": [{"arch": "mlp"}] * 2, "train": {"epochs": 1}},
            },
            "add it to stages",
        ),
    ],
)
def test_strategy_configs_are_checked_before_anything_runs(change, message):
    from alambic.config import read_config_file

    data = read_config_file(ROOT / "recipes" / "digits.yaml")
    data.update(change)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_every_strategy_recipe_loads():
    recipes = sorted(STRATEGIES.glob("*.yaml"))
    assert len(recipes) >= 8
    for recipe in recipes:
        load_config(recipe)


def test_an_ensemble_teacher_feeds_members_to_terms_through_hooks():
    teacher = Teacher(
        EnsembleModel([Constant(A), Constant(B)], temperature=4.0),
        [Term(loss="ensemble_kd", teacher="members")],
    )
    outputs = teacher(torch.zeros(2, 5))
    assert outputs["members"].shape == (2, 2, 3) and outputs["logits"].shape == (2, 3)


def test_a_stopped_chain_resumes_without_training_its_finished_generations_again(tmp_path, monkeypatch):
    import alambic.run.stages as stages_module
    from alambic.run.pipeline import run

    trained = []
    original = stages_module.train_stage

    def failing_at_generation_2(context, stage, model, terms, train, teacher, module=None, **options):
        trained.append(stage)
        if stage == "generation_2" and trained.count("generation_2") == 1:
            raise KeyboardInterrupt  # the run is stopped during generation 2
        return original(context, stage, model, terms, train, teacher, module, **options)

    monkeypatch.setattr(stages_module, "train_stage", failing_at_generation_2)
    config = load_config(STRATEGIES / "born-again.yaml", [*QUICK, "teacher.train.epochs=1", *NO_REPORT])
    with pytest.raises(KeyboardInterrupt):
        run(config, run_dir=tmp_path / "run")
    first = load_file(str(tmp_path / "run" / "generation_1" / "model.safetensors"))
    run(config, run_dir=tmp_path / "run", resume=True)
    assert trained == ["teacher", "baseline", "generation_1", "generation_2", "generation_2", "distill"]
    again = load_file(str(tmp_path / "run" / "generation_1" / "model.safetensors"))
    assert all(torch.equal(first[key], again[key]) for key in first)


def test_a_stage_with_mix_trains_on_mixed_views_and_distill_refuses_it():
    from alambic import distill
    from alambic.data import build_datasets
    from alambic.run.stages import stage_train_set

    digits, _, _ = build_datasets("digits")
    view = stage_train_set(digits, None, "mixup", 0.4)
    assert isinstance(view.dataset, MixedDataset) and view.dataset.alpha == 0.4
    assert stage_train_set(digits, None).dataset is digits
    with pytest.raises(ConfigError, match="mix"):
        distill(nn.Linear(64, 10), nn.Linear(64, 10), [], mix="mixup")


def test_mixing_token_ids_is_a_one_line_config_error():
    from alambic.data.text import TokenizedDataset
    from alambic.strategies import MixedDataset

    ids = torch.randint(0, 9, (4, 3))
    with pytest.raises(ConfigError, match="token ids cannot be mixed"):
        MixedDataset(TokenizedDataset({"input_ids": ids}, torch.zeros(4)), "mixup")
