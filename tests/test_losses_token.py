"""Token-level divergences for language models: golden values, GKD's identities, masks, chunking."""

import math

import pytest
import torch

from alambic.losses import get_loss

# Float comparisons: a relative AND an absolute tolerance wherever arithmetic does not guarantee
# equality (float32 against a float64 reference, or two reductions in different orders): BLAS and
# vectorised kernels differ in the last bits between AVX2 and AVX-512 CPUs.

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"]


def _logits(seed, shape=(2, 5, 7)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def _softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_forward_and_reverse_kl_golden_values_by_hand():
    student = torch.tensor([[[1.0, 2.0, 3.0]]])  # one token
    teacher = torch.tensor([[[3.0, 1.0, 0.0]]])
    p_s, p_t = _softmax([1.0, 2.0, 3.0]), _softmax([3.0, 1.0, 0.0])
    forward = sum(t * math.log(t / s) for s, t in zip(p_s, p_t))
    reverse = sum(s * math.log(s / t) for s, t in zip(p_s, p_t))
    assert forward == pytest.approx(1.6851, abs=1e-4) and reverse == pytest.approx(1.8226, abs=1e-4)
    kwargs = {"shift_labels": False}
    assert get_loss("forward_kl")(student, teacher, **kwargs).item() == pytest.approx(
        forward, rel=1e-5, abs=1e-7
    )
    assert get_loss("reverse_kl")(student, teacher, **kwargs).item() == pytest.approx(
        reverse, rel=1e-5, abs=1e-7
    )
    tvd = 0.5 * sum(abs(s - t) for s, t in zip(p_s, p_t))
    assert get_loss("tvd")(student, teacher, **kwargs).item() == pytest.approx(tvd, rel=1e-5, abs=1e-7)


def test_generalized_jsd_is_forward_kl_at_beta_0_and_reverse_kl_at_beta_1():
    student, teacher = _logits(0), _logits(1)
    jsd = get_loss("jsd")
    torch.testing.assert_close(jsd(student, teacher, beta=0.0), get_loss("forward_kl")(student, teacher))
    torch.testing.assert_close(jsd(student, teacher, beta=1.0), get_loss("reverse_kl")(student, teacher))
    # in between, the family is continuous up to scale: JSD(beta) / beta -> forward KL as beta -> 0
    near_zero = jsd(student, teacher, beta=1e-4) / 1e-4
    assert near_zero.item() == pytest.approx(
        get_loss("forward_kl")(student, teacher).item(), rel=1e-2, abs=1e-7
    )
    near_one = jsd(student, teacher, beta=1 - 1e-4) / 1e-4
    assert near_one.item() == pytest.approx(
        get_loss("reverse_kl")(student, teacher).item(), rel=1e-2, abs=1e-7
    )
    # beta = 0.5 is the symmetric Jensen-Shannon divergence, bounded by log 2
    half = jsd(student, teacher, beta=0.5)
    assert half.item() == pytest.approx(jsd(teacher, student, beta=0.5).item(), rel=1e-5, abs=1e-7)
    assert 0 < half.item() < math.log(2)


def test_skew_kls_are_the_plain_kls_at_alpha_0_and_are_bounded_above_0():
    student, teacher = _logits(2), _logits(3)
    torch.testing.assert_close(
        get_loss("skew_kl")(student, teacher, alpha=0.0), get_loss("forward_kl")(student, teacher)
    )
    torch.testing.assert_close(
        get_loss("skew_reverse_kl")(student, teacher, alpha=0.0), get_loss("reverse_kl")(student, teacher)
    )
    # KL(p || a p + (1 - a) q) <= log(1 / a): finite even where the student gives a token no mass
    hard = torch.full((1, 2, 4), -1e4)
    hard[..., 0] = 10.0  # the student is certain of token 0
    soft = torch.zeros(1, 2, 4)  # the teacher is uniform
    assert get_loss("skew_kl")(hard, soft, alpha=0.1).item() <= math.log(10) + 1e-5
    assert get_loss("forward_kl")(hard, soft).item() > 1000


def test_the_forward_kl_gradient_is_p_student_minus_p_teacher_per_counted_token():
    student, teacher = _logits(4, (1, 3, 5)).requires_grad_(True), _logits(5, (1, 3, 5))
    get_loss("forward_kl")(student, teacher, shift_labels=False).backward()
    expected = (torch.softmax(student.detach(), -1) - torch.softmax(teacher, -1)) / 3  # mean over 3 tokens
    torch.testing.assert_close(student.grad, expected)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_masked_tokens_contribute_nothing_and_the_mean_is_over_counted_tokens(name):
    student, teacher = _logits(6), _logits(7)
    labels = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(0))
    labels[0, :3] = -100  # a prompt: positions 0 and 1 predict masked tokens 1 and 2
    labels[1, 4] = -100  # padding at the end: position 3 predicts it
    loss = get_loss(name)
    value = loss(student, teacher, labels=labels)
    changed_student = student.clone()
    changed_student[0, :2] = 100 * torch.randn(2, 7)  # garbage where nothing counts
    changed_student[1, 3] = -50.0
    changed_student[:, 4] = 7.0  # the last position predicts nothing
    torch.testing.assert_close(loss(changed_student, teacher, labels=labels), value)
    # counted: sample 0 positions 2, 3; sample 1 positions 0, 1, 2; the mean over those five
    rows = torch.cat([student[0, 2:4], student[1, 0:3]])[None]
    teacher_rows = torch.cat([teacher[0, 2:4], teacher[1, 0:3]])[None]
    torch.testing.assert_close(loss(rows, teacher_rows, shift_labels=False), value)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_chunked_equals_unchunked_in_value_and_gradient(name):
    student, teacher = _logits(8, (3, 9, 13)), _logits(9, (3, 9, 13))
    labels = torch.randint(0, 13, (3, 9), generator=torch.Generator().manual_seed(1))
    labels[2, 5:] = -100
    values, grads = [], []
    for chunk_size in (1, 4, 10_000):
        leaf = student.clone().requires_grad_(True)
        value = get_loss(name)(leaf, teacher, labels=labels, chunk_size=chunk_size)
        value.backward()
        values.append(value.detach())
        grads.append(leaf.grad)
    for value, grad in zip(values[:-1], grads[:-1]):
        torch.testing.assert_close(value, values[-1])
        torch.testing.assert_close(grad, grads[-1])


def test_half_precision_logits_are_computed_in_fp32():
    student, teacher = _logits(10), _logits(11)
    full = get_loss("forward_kl")(student, teacher)
    half = get_loss("forward_kl")(student.bfloat16(), teacher.bfloat16())
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=2e-2, abs=1e-7)


def test_a_vocabulary_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 5, 7\).*\(2, 5, 9\).*vocabulary"):
        get_loss("forward_kl")(_logits(0), _logits(1, (2, 5, 9)))


def test_lm_ce_is_the_shifted_next_token_cross_entropy():
    logits = _logits(12)
    labels = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(2))
    labels[0, 0] = -100
    labels[1, 3] = -100
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(get_loss("lm_ce")(logits, labels=labels), expected)


def test_token_losses_average_over_the_tokens_of_the_whole_accumulation_window():
    """Two micro-batches with 5 and 1 counted tokens, accumulated, make the step of one batch of both."""
    from torch import nn
    from torch.utils.data import DataLoader

    from alambic import distill

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embedding = nn.Embedding(9, 9)

        def forward(self, input_ids):
            return self.embedding(input_ids)  # [B, T, V]: next-token logits straight from the table

    class Rows(torch.utils.data.Dataset):
        def __init__(self):
            generator = torch.Generator().manual_seed(3)
            self.ids = torch.randint(0, 9, (2, 6), generator=generator)
            self.labels = self.ids.clone()
            self.labels[1, :5] = -100  # the second sample counts one token, the first five

        def __len__(self):
            return 2

        def __getitem__(self, index):
            return {"input_ids": self.ids[index], "labels": self.labels[index]}

    settings = {"terms": [{"loss": "lm_ce"}], "epochs": 1, "optimizer": "sgd", "lr": 1.0, "momentum": 0.0,
                "weight_decay": 0.0, "schedule": "constant"}  # fmt: skip
    whole = distill(None, TinyLM(), DataLoader(Rows(), batch_size=2), **settings)
    window = distill(None, TinyLM(), DataLoader(Rows(), batch_size=1), grad_accum=2, **settings)
    torch.testing.assert_close(window.embedding.weight, whole.embedding.weight)


def test_token_losses_without_labels_still_train_under_accumulation():
    """Without labels every token counts: the window scale must not silence the loss."""
    from torch import nn
    from torch.utils.data import DataLoader

    from alambic import distill

    class TinyLM(nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.embedding = nn.Embedding(9, 9)

        def forward(self, input_ids):
            return self.embedding(input_ids)

    ids = torch.randint(0, 9, (4, 6), generator=torch.Generator().manual_seed(0))
    loader = DataLoader([{"input_ids": row} for row in ids], batch_size=2)
    student = TinyLM(1)
    before = student.embedding.weight.clone()
    trained = distill(
        TinyLM(0), student, loader, terms=[{"loss": "forward_kl"}], grad_accum=2, lr=0.5, weight_decay=0.0
    )
    assert not torch.equal(trained.embedding.weight.cpu(), before)
