"""The chunked token losses' gradients, and the fused projection + divergence against the unfused loss."""

import pytest
import torch
import torch.nn.functional as F
from tolerance import close

from alambic.errors import ConfigError
from alambic.losses import get_loss
from alambic.losses.token_chunks import fused_linear_token_loss

CASES = [  # loss, params, (B, T, H, V), chunk_size
    ("forward_kl", {"temperature": 2.0}, (3, 7, 5, 11), 4),  # 4 does not divide the counted tokens
    ("reverse_kl", {}, (2, 6, 4, 9), 1),
    ("jsd", {"beta": 0.3, "temperature": 1.5}, (3, 7, 5, 11), 5),
    ("tvd", {}, (2, 5, 3, 8), 100),  # one chunk
]


def _case(shape, seed=0):
    batch, length, hidden_size, vocabulary = shape
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, hidden_size, generator=generator)
    weight = torch.randn(vocabulary, hidden_size, generator=generator)
    bias = torch.randn(vocabulary, generator=generator)
    teacher = torch.randn(batch, length, vocabulary, generator=generator) * 2
    labels = torch.randint(0, vocabulary, (batch, length), generator=generator)
    labels[0, :3] = -100  # a prompt
    labels[-1] = -100  # a row where nothing counts
    return hidden, weight, bias, teacher, labels


def _value_and_grads(loss_of, leaves):
    leaves = [leaf.clone().requires_grad_(True) for leaf in leaves]
    value = loss_of(*leaves)
    grads = torch.autograd.grad(3.0 * value, leaves)  # a term's weight: grad_output != 1
    return value.detach(), grads


@pytest.mark.parametrize(("loss", "params", "shape", "chunk_size"), CASES)
def test_fused_equals_the_loss_on_the_projected_logits_in_value_and_gradients(
    loss, params, shape, chunk_size
):
    hidden, weight, bias, teacher, labels = _case(shape)
    expected, expected_grads = _value_and_grads(
        lambda h, w, b: get_loss(loss)(F.linear(h, w, b), teacher, labels=labels, **params),
        (hidden, weight, bias),
    )
    actual, grads = _value_and_grads(
        lambda h, w, b: fused_linear_token_loss(
            h, w, teacher, bias=b, loss=loss, params=params, labels=labels, chunk_size=chunk_size
        ),
        (hidden, weight, bias),
    )
    torch.testing.assert_close(actual, expected, **close(expected))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, **close(expected_grad))
    assert grads[0][-1].abs().sum() == 0  # the fully masked row gets no gradient


def test_fused_from_the_teachers_hidden_states_equals_fused_from_its_logits():
    hidden, weight, bias, _, labels = _case((2, 6, 4, 9))
    teacher_hidden, teacher_weight = torch.randn(2, 6, 3), torch.randn(9, 3)
    teacher_logits = F.linear(teacher_hidden, teacher_weight)
    expected = fused_linear_token_loss(hidden, weight, teacher_logits, labels=labels, chunk_size=3)
    actual = fused_linear_token_loss(
        hidden, weight, teacher_hidden, teacher_weight=teacher_weight, labels=labels, chunk_size=3
    )
    torch.testing.assert_close(actual, expected, **close(expected))


def test_fused_without_labels_bias_or_gradients_and_with_every_token_masked():
    hidden, weight, _, teacher, _ = _case((2, 5, 3, 8))
    expected = get_loss("forward_kl")(F.linear(hidden, weight), teacher)
    with torch.no_grad():
        actual = fused_linear_token_loss(hidden, weight, teacher, chunk_size=3)
    torch.testing.assert_close(actual, expected, **close(expected))
    leaf = hidden.clone().requires_grad_(True)
    masked = fused_linear_token_loss(leaf, weight, teacher, labels=torch.full((2, 5), -100))
    masked.backward()
    assert masked.item() == 0.0 and leaf.grad.abs().sum() == 0


def test_fused_refuses_other_losses_unknown_parameters_and_shapes_that_do_not_fit():
    hidden, weight, _, teacher, _ = _case((2, 5, 3, 8))
    with pytest.raises(ConfigError, match="token divergence.*forward_kl.*'kd'"):
        fused_linear_token_loss(hidden, weight, teacher, loss="kd")
    with pytest.raises(ConfigError, match="no parameter 'gamma'"):
        fused_linear_token_loss(hidden, weight, teacher, params={"gamma": 1.0})
    with pytest.raises(ConfigError, match="chunk_size.*as arguments"):
        fused_linear_token_loss(hidden, weight, teacher, params={"chunk_size": 2})
    with pytest.raises(ValueError, match=r"weight \(8, 3\).*teacher \(2, 5, 7\)"):
        fused_linear_token_loss(hidden, weight, teacher[..., :7])


def test_chunked_gradients_scale_with_the_terms_weight_and_a_second_backward_says_why_it_cannot():
    student = torch.randn(2, 6, 9, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    teacher = torch.randn(2, 6, 9, generator=torch.Generator().manual_seed(2))
    (once,) = torch.autograd.grad(get_loss("forward_kl")(student, teacher, chunk_size=4), student)
    value = get_loss("forward_kl")(student, teacher, chunk_size=4)
    (scaled,) = torch.autograd.grad(0.5 * value, student, retain_graph=True)
    torch.testing.assert_close(scaled, 0.5 * once, **close(once))
    with pytest.raises(RuntimeError, match="one backward pass.*retain_graph"):
        torch.autograd.grad(value, student)


def test_the_default_chunk_is_chunk_logits_over_the_vocabulary(monkeypatch):
    from alambic.losses import token_chunks

    sizes, original = [], token_chunks._value_and_grad
    monkeypatch.setattr(token_chunks, "CHUNK_LOGITS", 3 * 9)  # 3 tokens of a 9-token vocabulary
    monkeypatch.setattr(
        token_chunks,
        "_value_and_grad",
        lambda fn, s, t, grad: sizes.append(len(s)) or original(fn, s, t, grad),
    )
    student = torch.randn(2, 5, 9).requires_grad_(True)
    get_loss("forward_kl")(student, torch.randn(2, 5, 9)).backward()  # 2 x 4 counted tokens after the shift
    assert sizes == [3, 3, 2]
