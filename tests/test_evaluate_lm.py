"""Causal-LM metrics (alambic.core.evaluate_lm) against direct computations on tiny models."""

import math

import pytest
import torch
import torch.nn.functional as F
from subprocesses import run_two_process_script
from tolerance import close
from torch import nn

from alambic.core.evaluate_lm import evaluate_causal_lm, generation_speed, sample_texts
from alambic.errors import AlambicError

VOCAB = 24
ROWS, LENGTH = 6, 12


class TinyLM(nn.Module):
    """A plain causal LM: embedding, a causal running mean, and a head; returns logits ``[B, T, V]``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        hidden = self.embedding(input_ids)  # [B, T, H]
        steps = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)[None, :, None]
        return self.head(hidden.cumsum(1) / steps)  # [B, T, V]


def gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=64)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


MODELS = {"plain": TinyLM, "gpt2": gpt2, "llama": llama}


def lm_data():
    """Rows of different real lengths, right-padded (mask 0, label -100), with a masked prompt of 2 tokens."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate([12, 9, 5, 12, 7, 3]):
        mask[row, length:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return ids, mask, labels


def batches(ids, mask, labels, batch_size, padding_rows=0):
    """A loader (list of dict batches); ``padding_rows`` rows with no counted token end each batch."""
    loader = []
    for start in range(0, len(ids), batch_size):
        batch = {
            "input_ids": ids[start : start + batch_size],
            "attention_mask": mask[start : start + batch_size],
            "labels": labels[start : start + batch_size],
        }
        if padding_rows:
            batch = {
                key: torch.cat([value, torch.full((padding_rows, LENGTH), -100 if key == "labels" else 0)])
                for key, value in batch.items()
            }
        loader.append(batch)
    return loader


def direct(model, ids, mask, labels, teacher=None):
    """Loss, accuracy, token count (and forward KL) from whole-set logits with F.cross_entropy."""
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=mask)
        logits = getattr(output, "logits", output)[:, :-1].float()  # [B, T-1, V]
    targets = labels[:, 1:]  # [B, T-1]
    counted = targets != -100
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
    accuracy = (logits.argmax(-1) == targets)[counted].double().mean()
    result = {"loss": loss, "accuracy": accuracy, "tokens": int(counted.sum())}
    if teacher is not None:
        with torch.no_grad():
            output = teacher(input_ids=ids, attention_mask=mask)
            teacher_logits = getattr(output, "logits", output)[:, :-1].float()
        per_token = F.kl_div(
            logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True, reduction="none"
        ).sum(-1)  # [B, T-1]
        result["kl"] = per_token[counted].mean()
    return result


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_metrics_equal_a_direct_computation_at_any_batch_size(kind):
    model = MODELS[kind]()
    ids, mask, labels = lm_data()
    expected = direct(model, ids, mask, labels)
    results = [
        evaluate_causal_lm(model, batches(ids, mask, labels, 1)),
        evaluate_causal_lm(model, batches(ids, mask, labels, 8, padding_rows=3)),
        evaluate_causal_lm(model, batches(ids, mask, labels, 4, padding_rows=1)),
    ]
    for metrics in results:
        assert metrics["tokens"] == expected["tokens"] == int((labels[:, 1:] != -100).sum())
        loss = torch.tensor(metrics["loss"])
        torch.testing.assert_close(loss, expected["loss"], **close(expected["loss"]))
        torch.testing.assert_close(
            torch.tensor(metrics["perplexity"]), expected["loss"].exp(), **close(expected["loss"].exp())
        )
        assert metrics["next_token_accuracy"] == pytest.approx(float(expected["accuracy"]), abs=1e-12)
        assert "kl_to_teacher" not in metrics and "bits_per_unit" not in metrics


def test_chunks_of_a_few_tokens_give_the_same_sums(monkeypatch):
    import alambic.core.evaluate_lm as evaluate_lm

    ids, mask, labels = lm_data()
    with torch.no_grad():
        logits, teacher_logits = TinyLM()(ids), TinyLM(seed=1)(ids)  # [B, T, V]
    whole = evaluate_lm.token_sums(logits, labels, teacher_logits)  # [B, 4]
    monkeypatch.setattr(evaluate_lm, "CHUNK_LOGITS", 3 * VOCAB)  # chunks of 3 tokens
    chunked = evaluate_lm.token_sums(logits, labels, teacher_logits)
    assert whole[:, 2].sum() == (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(chunked, whole, **close(whole))


class NextIdModel(nn.Module):
    """Predicts ``id + 1 (mod V)`` with certainty: right exactly where the sequence counts up."""

    def forward(self, input_ids):
        return F.one_hot((input_ids + 1) % VOCAB, VOCAB).float() * 20.0  # [B, T, V]


def test_ignored_labels_do_not_count():
    ids = torch.tensor([[3, 4, 5, 9, 10, 0, 7, 8]])  # counts up except before 9, 0 and 7
    labels = ids.clone()
    labels[0, [3, 5, 6]] = -100  # the three targets the model gets wrong
    metrics = evaluate_causal_lm(NextIdModel(), [(ids, labels)])
    assert metrics["tokens"] == 4  # targets 4, 5, 10, 8
    assert metrics["next_token_accuracy"] == 1.0
    assert metrics["loss"] == pytest.approx(0.0, abs=1e-6)

    labels[0, 3] = 9  # counted again: one wrong prediction out of five, at a loss of 20 nats
    metrics = evaluate_causal_lm(NextIdModel(), [(ids, labels)])
    assert (metrics["tokens"], metrics["next_token_accuracy"]) == (5, 0.8)
    assert metrics["loss"] == pytest.approx(20.0 / 5, rel=1e-5)


@pytest.mark.parametrize("kind", ["plain", "gpt2"])
def test_kl_to_teacher(kind):
    student = MODELS[kind]()
    ids, mask, labels = lm_data()
    itself = evaluate_causal_lm(student, batches(ids, mask, labels, 4), teacher=student)
    assert itself["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)

    teacher = TinyLM(seed=1)
    expected = direct(student, ids, mask, labels, teacher=teacher)["kl"]
    assert float(expected) > 0.01
    for batch_size in (1, 8):
        metrics = evaluate_causal_lm(student, batches(ids, mask, labels, batch_size), teacher=teacher)
        torch.testing.assert_close(torch.tensor(metrics["kl_to_teacher"]), expected, **close(expected))


def test_bits_per_unit():
    model = TinyLM()
    ids, mask, labels = lm_data()
    loader = batches(ids, mask, labels, 4)
    per_token = evaluate_causal_lm(model, loader, units_per_token=1)
    assert per_token["bits_per_unit"] == pytest.approx(per_token["loss"] / math.log(2), rel=1e-12)
    assert per_token["units"] == per_token["tokens"]

    total = evaluate_causal_lm(model, loader, units=2 * per_token["tokens"])  # 2 bytes per token
    assert total["bits_per_unit"] == pytest.approx(per_token["bits_per_unit"] / 2, rel=1e-12)

    counted = (labels[:, 1:] != -100).sum(1)  # [B] per row, as a tokenizer-aware data set would give
    with_units = [{**batch, "units": counted[i * 4 : i * 4 + 4] * 3} for i, batch in enumerate(loader)]
    in_batches = evaluate_causal_lm(model, with_units)
    assert in_batches["bits_per_unit"] == pytest.approx(per_token["bits_per_unit"] / 3, rel=1e-12)
    assert in_batches["loss"] == per_token["loss"]  # the units key never reaches the model


def test_max_batches_and_gather_for_metrics():
    model = TinyLM()
    ids, mask, labels = lm_data()
    first = direct(model, ids[:2], mask[:2], labels[:2])
    metrics = evaluate_causal_lm(model, batches(ids, mask, labels, 2), max_batches=1)
    assert metrics["tokens"] == first["tokens"]

    class DroppingAccelerator:
        """Stands in for a multi-process gather that drops the last row as padding."""

        device = torch.device("cpu")

        def gather_for_metrics(self, sums):
            return sums[:-1]

    gathered = evaluate_causal_lm(model, batches(ids, mask, labels, 6), accelerator=DroppingAccelerator())
    expected = direct(model, ids[:5], mask[:5], labels[:5])
    assert gathered["tokens"] == expected["tokens"]
    torch.testing.assert_close(torch.tensor(gathered["loss"]), expected["loss"], **close(expected["loss"]))


def test_errors_are_one_line():
    ids, mask, labels = lm_data()
    model = TinyLM()
    with pytest.raises(AlambicError, match="no batches"):
        evaluate_causal_lm(model, [])
    with pytest.raises(AlambicError, match="need labels"):
        evaluate_causal_lm(model, [{"input_ids": ids}])
    with pytest.raises(AlambicError, match="no token counted"):
        evaluate_causal_lm(model, [(ids, torch.full_like(ids, -100))])
    with pytest.raises(AlambicError, match="one vocabulary"):
        evaluate_causal_lm(model, [(ids, labels)], teacher=nn.Sequential(TinyLM(), nn.Linear(VOCAB, 5)))
    with pytest.raises(AlambicError, match="not both"):
        evaluate_causal_lm(model, [(ids, labels)], units_per_token=1, units=10)


def test_generation_speed():
    model = gpt2()
    threads = torch.get_num_threads()
    speed = generation_speed(model, torch.tensor([1, 2, 3]), new_tokens=5, repeats=2, threads=threads + 1)
    assert speed["new_tokens"] == 5 and speed["prompt_tokens"] == 3 and speed["threads"] == threads + 1
    assert math.isfinite(speed["tokens_per_s"]) and speed["tokens_per_s"] > 0
    assert speed["ms_per_token"] == pytest.approx(1000.0 / speed["tokens_per_s"])
    assert torch.get_num_threads() == threads  # restored
    with pytest.raises(ValueError, match="new_tokens >= 1"):
        generation_speed(model, torch.tensor([1]), new_tokens=0)


def test_generation_speed_times_the_requested_tokens(monkeypatch):
    import alambic.core.evaluate_lm as evaluate_lm

    calls = []

    def fake_sample(model, prompt, new_tokens, **options):
        calls.append((prompt.shape, new_tokens, options["top_k"]))
        return torch.cat([prompt, prompt.new_zeros(1, new_tokens)], dim=1)

    monkeypatch.setattr(evaluate_lm, "sample_tokens", fake_sample)
    generation_speed(TinyLM(), torch.tensor([[1, 2]]), new_tokens=7, repeats=3, warmup=1)
    assert calls == [(torch.Size([1, 2]), 7, 1)] * 4  # batch 1, greedy, one warm-up and three timed runs


@pytest.mark.parametrize("kind", ["plain", "llama"])
def test_sample_texts_reproducible_by_seed(kind):
    model = MODELS[kind]()
    prompts = [[1, 2, 3], [4], [5, 6]]  # rows of different lengths are continued one by one
    first = sample_texts(model, prompts, new_tokens=10, seed=0)
    assert [len(sample) for sample in first] == [10, 10, 10]
    assert all(0 <= token < VOCAB for sample in first for token in sample)
    assert sample_texts(model, prompts, new_tokens=10, seed=0) == first
    assert sample_texts(model, prompts, new_tokens=10, seed=1) != first
    greedy = sample_texts(model, torch.tensor([1, 2, 3]), new_tokens=10, seed=0, top_k=1)
    assert greedy == sample_texts(model, torch.tensor([[1, 2, 3]]), new_tokens=10, seed=5, top_k=1)


# Runs in a fresh interpreter: accelerate's state is a process-wide singleton (see test_evaluate.py).
TWO_PROCESS_SCRIPT = """
import accelerate, torch
from alambic.core.evaluate_lm import evaluate_causal_lm

class Bigram(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(10, 10)

    def forward(self, input_ids):
        return self.table(input_ids)

def run():
    accelerator = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = Bigram()
    ids = torch.randint(0, 10, (5, 6))
    labels = ids.clone()
    labels[1, 3:] = -100
    rows = [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]
    # 5 rows, batch 2, 2 processes: the last round pads with a duplicated row, which must not count
    model, loader = accelerator.prepare(model, torch.utils.data.DataLoader(rows, batch_size=2))
    metrics = evaluate_causal_lm(model, loader, accelerator=accelerator)
    whole = evaluate_causal_lm(model, [(ids, labels)])
    assert accelerator.num_processes == 2
    assert metrics["tokens"] == whole["tokens"] == 22, (metrics, whole)
    assert abs(metrics["loss"] - whole["loss"]) < 1e-5 * whole["loss"], (metrics, whole)
    print("OK", accelerator.process_index, flush=True)

if __name__ == "__main__":
    accelerate.debug_launcher(run, num_processes=2)
"""


@pytest.mark.slow
def test_two_processes_count_every_token_once():
    pytest.importorskip("accelerate")
    run_two_process_script(TWO_PROCESS_SCRIPT)
