"""fsp, ofd and the learned losses (ft, vid, crd, review_kd): formulas by hand, the papers' properties,
and the training loop carrying their state (sample indices, memory banks, checkpoints)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alambic.losses import build_loss, get_loss

# Float comparisons: a relative AND an absolute tolerance wherever arithmetic does not guarantee
# equality (float32 against a float64 reference, or two reductions in different orders): BLAS and
# vectorised kernels differ in the last bits between AVX2 and AVX-512 CPUs.


def _maps(seed, shape=(4, 3, 5, 5)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_fsp_matches_its_formula_written_with_numpy():
    s1, s2 = _maps(0, (2, 3, 4, 4)), _maps(1, (2, 5, 2, 2))  # the 4x4 map is pooled to 2x2
    t1, t2 = _maps(2, (2, 3, 4, 4)), _maps(3, (2, 5, 2, 2))

    def gram(a, b):
        a = a.numpy().reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5)).reshape(2, 3, 4)  # 2x2 average pooling
        return a @ b.numpy().reshape(2, 5, 4).transpose(0, 2, 1) / 4

    expected = ((gram(s1, s2) - gram(t1, t2)) ** 2).mean()
    assert get_loss("fsp")([s1, s2], [t1, t2]).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    with pytest.raises(ValueError, match="equal widths"):
        get_loss("fsp")([s1, s2], [_maps(4, (2, 4, 4, 4)), t2])


def test_ofd_margin_is_the_gaussian_mean_of_negative_responses():
    from alambic.losses.feature import _expected_negative_response

    mean, std = 0.5, 2.0
    teacher = (torch.randn(20000, 1, generator=torch.Generator().manual_seed(0)) * std + mean).view(
        -1, 1, 1, 1
    )
    empirical = teacher[teacher < 0].mean().item()  # E[x | x < 0] measured
    assert _expected_negative_response(teacher).item() == pytest.approx(empirical, rel=0.02, abs=1e-7)


def test_ofd_penalises_only_where_student_or_teacher_is_on():
    teacher = torch.tensor([[1.0, -5.0, -5.0, 2.0, -1.0, 1.0, -4.0, 0.5]]).view(1, 1, 8)  # one channel
    from alambic.losses.feature import _expected_negative_response

    margin = _expected_negative_response(teacher).item()
    assert margin < 0
    student = torch.tensor([[3.0, -9.0, 0.0, 2.0, -9.0, 1.0, -9.0, 0.5]]).view(1, 1, 8)
    target = torch.clamp(teacher, min=margin)
    # entry 0: teacher on, off by 2 -> 4; entry 1, 4, 6: both off (student below the margin) -> free;
    # entry 2: student (0) above the raised teacher (margin) -> (0 - margin)^2
    expected = 4.0 + (0.0 - target[0, 0, 2].item()) ** 2
    assert get_loss("ofd")(student, teacher).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_vid_is_the_gaussian_negative_log_likelihood_and_learns_the_residual_variance():
    student, teacher = _maps(0), _maps(1)
    loss = build_loss("vid", {"init_variance": 2.0}, student_shape=student.shape, teacher_shape=teacher.shape)
    mean = loss.regressor(student)
    by_hand = 0.5 * ((teacher - mean) ** 2 / 2.0 + math.log(2.0))
    assert loss(student, teacher).item() == pytest.approx(by_hand.mean().item(), rel=1e-4, abs=1e-7)
    # with the regressor fixed, the variance that minimises the loss is the residual's mean square
    optimizer = torch.optim.Adam([loss.alpha], lr=0.05)
    for _ in range(600):
        optimizer.zero_grad()
        loss(student, teacher).backward()
        optimizer.step()
    learned = F.softplus(loss.alpha).detach()
    residual = ((teacher - mean.detach()) ** 2).mean(dim=(0, 2, 3))
    torch.testing.assert_close(learned, residual, rtol=0.02, atol=1e-3)


def _crd(num_samples=6, negatives=3, **params):
    torch.manual_seed(0)
    return build_loss(
        "crd",
        {"feature_dim": 4, "num_negatives": negatives, **params},
        student_shape=(2, 5),
        teacher_shape=(2, 7),
        num_samples=num_samples,
    )


def test_crd_matches_the_nce_formula_with_its_memory_banks():
    loss = _crd()
    student, teacher, index = _maps(0, (2, 5)), _maps(1, (2, 7)), torch.tensor([4, 1])
    banks = loss.student_bank.clone(), loss.teacher_bank.clone()
    torch.manual_seed(7)
    value = loss(student, teacher, index=index).item()
    torch.manual_seed(7)
    negatives = torch.randint(0, 6, (2, 3))  # the draw the loss made
    candidates = torch.cat([index[:, None], negatives], 1).numpy()

    def embed(head, x):
        v = (x @ head.weight.T + head.bias).detach().numpy()
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    v_s, v_t = embed(loss.student_head, student), embed(loss.teacher_head, teacher)
    noise = 3 / 6

    def nce(anchor, bank):
        h = np.exp(np.einsum("bkd,bd->bk", bank.numpy()[candidates], anchor) / 0.07)
        h = h / (h.mean() * 6)  # Z from this first batch
        return -np.mean(np.log(h[:, 0] / (h[:, 0] + noise)) + np.log(noise / (h[:, 1:] + noise)).sum(1))

    expected = nce(v_s, banks[1]) + nce(v_t, banks[0])
    assert value == pytest.approx(expected, rel=1e-4, abs=1e-7)
    # the banks moved towards this batch's embeddings at its indices only, and stay unit vectors
    updated = banks[0][4] * 0.5 + torch.from_numpy(v_s[0]) * 0.5
    torch.testing.assert_close(loss.student_bank[4], updated / updated.norm())
    torch.testing.assert_close(loss.student_bank[0], banks[0][0])
    assert loss.normalizers.min() > 0  # Z fixed after the first training batch


def test_crd_is_lower_when_the_student_agrees_with_its_own_teacher_entry():
    loss = _crd(num_samples=32, negatives=16, momentum=0.0)
    loss.eval()  # no bank update while measuring
    embeddings = F.normalize(_maps(2, (32, 4)), dim=1)
    loss.teacher_bank.copy_(embeddings)
    with torch.no_grad():  # heads as identity on the first 4 dimensions
        loss.student_head.weight.zero_()
        loss.student_head.bias.zero_()
        loss.student_head.weight[:, :4] = torch.eye(4)
    index = torch.arange(8)
    agreeing = F.pad(embeddings[:8], (0, 1))
    shuffled = F.pad(embeddings[8:16], (0, 1))
    teacher = _maps(3, (8, 7))
    torch.manual_seed(1)
    good = loss(agreeing, teacher, index=index).item()
    torch.manual_seed(1)
    bad = loss(shuffled, teacher, index=index).item()
    assert good < bad


def test_crd_refuses_more_negatives_than_samples():
    with pytest.raises(ValueError, match="num_negatives below 6"):
        _crd(num_samples=6, negatives=6)


def test_ft_factor_loss_does_not_train_the_paraphraser():
    student, teacher = _maps(0, (2, 3, 4, 4)), _maps(1, (2, 6, 4, 4))
    loss = build_loss(
        "ft", {"reconstruction_weight": 0.0}, student_shape=student.shape, teacher_shape=teacher.shape
    )
    value = loss(student, teacher)
    assert 0 < value.item() <= 2.0  # l1 between unit vectors, averaged per element, is at most 2
    value.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in loss.encoder.parameters())
    assert loss.translator[0].weight.grad.abs().sum() > 0


def test_review_kd_hierarchical_context_loss_by_hand():
    from alambic.losses.learned import hierarchical_context_loss

    s, t = _maps(0, (1, 1, 4, 4)), _maps(1, (1, 1, 4, 4))
    full = F.mse_loss(s, t).item()
    two = F.mse_loss(F.avg_pool2d(s, 2), F.avg_pool2d(t, 2)).item()
    one = (s.mean() - t.mean()).pow(2).item()
    # the 4x4 level is skipped (not smaller than the map); weights 1, 1/2, 1/4
    expected = (full + two / 2 + one / 4) / 1.75
    assert hierarchical_context_loss([s], [t]).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_review_kd_fuses_to_the_teacher_shapes_and_warms_up():
    student = [_maps(0, (2, 4, 8, 8)), _maps(1, (2, 8, 4, 4))]
    teacher = [_maps(2, (2, 6, 8, 8)), _maps(3, (2, 12, 4, 4))]
    loss = build_loss(
        "review_kd",
        {"mid_channels": 5, "warmup_epochs": 4.0},
        student_shape=[s.shape for s in student],
        teacher_shape=[t.shape for t in teacher],
    ).eval()
    assert loss.fusions[0].output[0].out_channels == 6 and loss.fusions[1].output[0].out_channels == 12
    assert (
        loss.fusions[1].attention is None and loss.fusions[0].attention is not None
    )  # deepest: nothing to fuse
    full = loss(student, teacher, epoch=4.0).item()
    assert loss(student, teacher, epoch=1.0).item() == pytest.approx(full / 4, rel=1e-5, abs=1e-7)
    assert loss(student, teacher, epoch=9.0).item() == pytest.approx(full, rel=1e-5, abs=1e-7)


# --- through the loop ------------------------------------------------------------------------------


class Convnet(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 3)

    def forward(self, x):
        return self.fc(self.pool(self.stage2(self.stage1(x))).flatten(1))


def _indexed_loader(n=48):
    from torch.utils.data import DataLoader, TensorDataset

    from alambic.data import IndexedDataset

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (n,), generator=generator)
    return DataLoader(IndexedDataset(TensorDataset(images, labels)), batch_size=16, shuffle=True)


LEARNED_TERMS = [
    {"loss": "ce"},
    {
        "loss": "crd",
        "weight": 0.8,
        "student": "fc:input",
        "teacher": "fc:input",
        "params": {"num_negatives": 20},
    },
    {"loss": "review_kd", "student": ["stage1", "stage2"], "teacher": ["stage1", "stage2"]},
    {"loss": "vid", "weight": 0.1, "student": "stage2", "teacher": "stage2"},
    {"loss": "ft", "student": "stage2", "teacher": "stage2"},
]


def test_learned_losses_train_in_the_loop_are_checkpointed_and_stay_out_of_the_student(tmp_path):
    from safetensors.torch import load_file

    from alambic import distill
    from alambic.core.checkpoint import latest_checkpoint

    torch.manual_seed(0)
    student = distill(
        Convnet(8), Convnet(4), _indexed_loader(), terms=LEARNED_TERMS, epochs=2, run_dir=tmp_path
    )
    saved = load_file(str(latest_checkpoint(tmp_path / "checkpoints") / "model.safetensors"))
    assert saved["learned_losses.1.student_bank"].shape == (48, 128)  # one entry per training sample
    assert saved["learned_losses.1.student_head.weight"].shape == (128, 8)  # sized from fc:input
    assert saved["learned_losses.1.teacher_head.weight"].shape == (128, 16)
    assert any(key.startswith("learned_losses.2.fusions") for key in saved)
    assert not any(key.startswith("learned_losses") for key in student.state_dict())


def test_a_resumed_crd_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    from alambic import distill
    from alambic.core.checkpoint import save_training_state

    def run(run_dir):
        torch.manual_seed(0)
        return distill(
            Convnet(8),
            Convnet(4),
            _indexed_loader(),
            terms=LEARNED_TERMS[:2],
            epochs=3,
            run_dir=run_dir,
            seed=3,
        )

    whole = run(tmp_path / "whole")

    def save_then_die(*args, **kwargs):
        path = save_training_state(*args, **kwargs)
        if kwargs["epoch"] == 1:
            raise KeyboardInterrupt  # killed right after the epoch-2 checkpoint
        return path

    monkeypatch.setattr("alambic.core.loop.save_training_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "split")
    monkeypatch.setattr("alambic.core.loop.save_training_state", save_training_state)
    resumed = run(tmp_path / "split")  # epoch 3 only, with the banks, Z and the RNG restored
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_crd_without_indices_is_a_one_line_error_before_step_0(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from alambic import distill
    from alambic.errors import ConfigError

    loader = DataLoader(TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))), batch_size=16)
    with pytest.raises(ConfigError, match=r"need the samples' indices.*IndexedDataset"):
        distill(Convnet(8), Convnet(4), loader, terms=LEARNED_TERMS[:2], epochs=1, run_dir=tmp_path)
