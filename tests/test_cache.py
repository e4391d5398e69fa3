"""Offline distillation from a cached teacher, and the loop's fast paths: they give what the slow ways give."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tolerance import close
from torch import nn
from typer.testing import CliRunner

from alambic import distill
from alambic.core.cache import CachedTeacher, cache_teacher, epochs_to_pay_off
from alambic.core.distiller import Teacher
from alambic.core.monitor import FiniteGuard
from alambic.core.optim import make_accelerator
from alambic.data import IndexedDataset, build_datasets
from alambic.data.datasets import Augmentation, InMemoryDataset
from alambic.data.loaders import make_loader
from alambic.errors import ConfigError, NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]
TERMS = [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9, "params": {"temperature": 4.0}}]


def _digits(subset=300):
    train, _, _ = build_datasets("digits", train_subset=subset, seed=0)
    return train


def _mlp(seed, hidden=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def test_a_cached_teacher_replays_the_live_teachers_outputs_by_sample_index(tmp_path):
    train, teacher = _digits(), _mlp(1, 64)
    cache_teacher(teacher, train, tmp_path / "cache", features=["1"], batch_size=128, shard_size=70)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["num_samples"] == 300 and len(manifest["fields"]["logits"]["shards"]) == 5  # 70 each
    cached = CachedTeacher(tmp_path / "cache", teacher=teacher, dataset=train)
    index = torch.tensor([299, 0, 69, 70, 141, 5])  # across shard boundaries, in any order
    images = torch.stack([train[i][0] for i in index.tolist()])
    live = Teacher(teacher)
    live.feature_paths = ["1"]
    expected = live(images)
    replayed = cached(images, index)
    # the cache ran the teacher in batches of 128, the live teacher in one of 6: the same values to float
    # rounding (the BLAS kernel, and so the order of the sums, depends on the batch size and the CPU)
    for name in ("logits", "1"):
        torch.testing.assert_close(replayed[name], expected[name], **close(expected[name]), msg=name)
    # held in memory (indexed where training runs) or read from the memory-mapped shards: the same rows
    resident = CachedTeacher(tmp_path / "cache", preload=True).to("cpu")
    streamed = CachedTeacher(tmp_path / "cache", preload=False).to("cpu")
    assert set(resident.resident) == {"logits", "1"} and not streamed.resident
    for name in ("logits", "1"):
        torch.testing.assert_close(
            resident(images, index)[name], streamed(images, index)[name], rtol=0, atol=0
        )
    for source in (resident, streamed):
        with pytest.raises(ConfigError, match="sample index 300 is outside the cache's 300 samples"):
            source(images[:1], torch.tensor([300]))


def test_distilling_from_the_cache_trains_the_student_as_the_live_teacher_does(tmp_path):
    train, teacher = _digits(), _mlp(1, 64)
    cache_teacher(teacher, train, tmp_path / "cache")
    loader = make_loader(IndexedDataset(train), batch_size=32, shuffle=True, seed=0)
    settings = {"epochs": 2, "optimizer": "sgd", "lr": 0.05, "seed": 0}
    live = distill(teacher, _mlp(2), loader, terms=TERMS, **settings)
    cached = CachedTeacher(tmp_path / "cache", teacher=teacher, dataset=train)
    offline = distill(cached, _mlp(2), loader, terms=TERMS, **settings)
    # teacher logits from batches of 128 (the cache) or 32 (live) differ in their last bits on some CPUs,
    # and 20 SGD steps carry that on: 1024 float32 units (1.2e-4 relative, 2.3e-5 on weights of size 0.19;
    # equal here). Training moves every tensor by 1e-2 or more, replaying the wrong rows by far more than this.
    for (name, a), (_, b) in zip(live.state_dict().items(), offline.state_dict().items()):
        torch.testing.assert_close(a, b, **close(b, ulps=1024), msg=name)
    moved = _mlp(2).state_dict()["0.weight"]
    assert not torch.allclose(offline.state_dict()["0.weight"].cpu(), moved)  # it did train


def test_a_stale_or_mismatched_cache_is_refused_before_training(tmp_path):
    train, teacher = _digits(), _mlp(1, 64)
    cache_teacher(teacher, train, tmp_path / "cache")
    with pytest.raises(ConfigError, match="another teacher"):
        CachedTeacher(tmp_path / "cache", teacher=_mlp(3, 64), dataset=train)
    with pytest.raises(ConfigError, match="other training data"):
        CachedTeacher(tmp_path / "cache", teacher=teacher, dataset=_digits(299))
    from alambic.config import Term

    with pytest.raises(ConfigError, match=r"does not store.*--feature"):
        CachedTeacher(tmp_path / "cache", terms=[Term(loss="fitnet", student="0", teacher="1")])
    with pytest.raises(ConfigError, match="already exists"):
        cache_teacher(teacher, train, tmp_path / "cache")
    with pytest.raises(ConfigError, match="not a teacher cache"):
        CachedTeacher(tmp_path)
    with pytest.raises(ConfigError, match="sample index"):
        CachedTeacher(tmp_path / "cache")(torch.zeros(2, 64))


def test_an_augmented_training_set_cannot_be_cached(tmp_path):
    images = torch.randint(0, 255, (8, 1, 8, 8), dtype=torch.uint8)
    train = InMemoryDataset(images, torch.arange(8) % 2, augmentation=Augmentation(2, False))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(ConfigError, match="augmented"):
        cache_teacher(model, IndexedDataset(train), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_failure_while_caching_leaves_no_folder_behind(tmp_path):
    class Breaks(nn.Module):
        calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("out of memory")
            return x[:, :10]

    with pytest.raises(RuntimeError, match="out of memory"):
        cache_teacher(Breaks(), _digits(), tmp_path / "cache", batch_size=100)
    assert list(tmp_path.iterdir()) == []


def test_top_k_keeps_the_largest_log_probabilities_and_spreads_the_tail(tmp_path):
    torch.manual_seed(0)
    tokens = torch.randint(0, 50, (6, 5))
    data = torch.utils.data.TensorDataset(tokens, torch.zeros(6, dtype=torch.long))
    lm = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50))
    for k, name in ((5, "top5"), (50, "all")):
        cache_teacher(lm, data, tmp_path / name, top_k=k)
    index = torch.tensor([4, 1])
    exact = torch.log_softmax(lm(tokens[index]), dim=-1).detach()  # [2, 5, 50]
    dense = CachedTeacher(tmp_path / "top5", preload=False)(tokens[index], index)["logits"]
    resident = CachedTeacher(tmp_path / "top5", preload=True).to("cpu")(tokens[index], index)["logits"]
    torch.testing.assert_close(resident, dense, rtol=0, atol=0)
    top_values, top_ids = exact.topk(5, dim=-1)
    # the cache's log-probabilities came from a batch of 6, these from a batch of 2: equal to float rounding
    torch.testing.assert_close(dense.gather(-1, top_ids), top_values, **close(top_values))
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(2, 5), rtol=0, atol=1e-5)  # full mass
    others = dense.scatter(-1, top_ids, float("nan"))
    assert torch.allclose(
        others.nanmean(-1, keepdim=True).expand_as(others)[~others.isnan()], others[~others.isnan()]
    )
    torch.testing.assert_close(
        CachedTeacher(tmp_path / "all")(tokens[index], index)["logits"], exact, **close(exact)
    )


def test_cache_teacher_cli_then_a_run_from_the_cache_and_a_stale_cache_is_one_line(tmp_path):
    from alambic.cli import app

    runner = CliRunner()
    from test_cli import TINY as tiny  # the CLI tests' tiny budget

    digits = str(ROOT / "recipes" / "digits.yaml")
    first = runner.invoke(app, ["run", digits, *tiny, "--out", str(tmp_path / "run")], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    weights = ["--set", f"teacher.model.checkpoint={tmp_path / 'run' / 'teacher' / 'model.safetensors'}"]
    made = runner.invoke(app, ["cache-teacher", digits, *weights, "--out", str(tmp_path / "cache")])
    assert made.exit_code == 0, made.output
    assert "distill.teacher_cache=" in made.output
    offline = [*tiny, *weights, "--set", f"distill.teacher_cache={tmp_path / 'cache'}"]
    second = runner.invoke(app, ["run", digits, *offline, "--out", str(tmp_path / "offline")])
    assert second.exit_code == 0, second.output
    # same teacher weights, data and seed: the offline student is the live one (to float rounding)
    online = json.loads((tmp_path / "run" / "summary.json").read_text())["models"]["distilled"]
    offline_summary = json.loads((tmp_path / "offline" / "summary.json").read_text())["models"]["distilled"]
    assert abs(offline_summary["accuracy"] - online["accuracy"]) < 0.01
    stale = [*offline, "--set", "data.train_subset=500"]
    third = runner.invoke(app, ["run", digits, *stale, "--out", str(tmp_path / "stale")])
    assert third.exit_code == 2 and "other training data" in " ".join(third.output.split())
    assert "Traceback" not in third.output
    # a cache written by another teacher: refused by the pre-flight, before anything trains or is written
    weights_file = tmp_path / "run" / "teacher" / "model.safetensors"
    other = {name: value + 1e-3 for name, value in load_file(str(weights_file)).items()}
    save_file(other, str(tmp_path / "other-teacher.safetensors"))
    changed = [*tiny, "--set", f"teacher.model.checkpoint={tmp_path / 'other-teacher.safetensors'}"]
    changed += ["--set", f"distill.teacher_cache={tmp_path / 'cache'}"]
    fourth = runner.invoke(app, ["run", digits, *changed, "--out", str(tmp_path / "other")])
    assert fourth.exit_code == 2 and "written by another teacher" in " ".join(fourth.output.split())
    assert not (tmp_path / "other").exists()


def test_a_bfloat16_teacher_copy_leaves_the_model_and_returns_float32():
    teacher = _mlp(1, 64)
    x = torch.randn(4, 64)
    half = Teacher(teacher, dtype=torch.bfloat16)
    out = half(x)["logits"]
    assert out.dtype == torch.float32 and next(teacher.parameters()).dtype == torch.float32
    assert next(half.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(out, teacher(x).detach(), rtol=0.05, atol=0.05)


def test_an_int8_teacher_copy_stores_a_quarter_of_the_linear_weights_and_stays_close():
    pytest.importorskip("torchao", reason="the int8 teacher needs torchao (alambic[quant])")
    train = _digits(64)
    x = torch.stack([train[i][0] for i in range(64)]).reshape(64, -1)
    teacher = _mlp(1, 256)
    small = Teacher(teacher, dtype=torch.int8)
    out = small(x)["logits"]
    reference = teacher(x).detach()
    assert out.dtype == torch.float32 and next(teacher.parameters()).dtype == torch.float32
    stored = [module.weight.qdata for module in small.model.modules() if isinstance(module, nn.Linear)]
    assert all(weight.dtype == torch.int8 for weight in stored)
    assert sum(w.numel() for w in stored) == sum(
        m.weight.numel() for m in teacher.modules() if isinstance(m, nn.Linear)
    )
    torch.testing.assert_close(out, reference, rtol=0.05, atol=0.02 * reference.abs().max().item())
    assert out.argmax(-1).eq(reference.argmax(-1)).float().mean() > 0.95


def test_an_int8_teacher_of_a_convnet_without_linear_layers_is_refused():
    pytest.importorskip("torchao", reason="the int8 teacher needs torchao (alambic[quant])")
    with pytest.raises(ConfigError, match="no.*Linear|has none"):
        Teacher(nn.Sequential(nn.Conv2d(1, 2, 3)), dtype=torch.int8)


def test_a_deferred_teacher_output_is_read_after_the_students_forward():
    """The distiller takes teacher outputs as a function (the CUDA side-stream path) and calls it after the student."""
    from alambic.config import Term
    from alambic.core.distiller import Distiller

    order = []
    student = _mlp(0)
    student.register_forward_hook(lambda *_: order.append("student"))
    teacher = Teacher(_mlp(1, 64), [Term(loss="kd")])
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    direct = Distiller(student, [Term(loss="kd")])(x, y, teacher(x))

    def deferred():
        order.append("teacher read")
        return teacher(x)

    late = Distiller(student, [Term(loss="kd")])(x, y, deferred)
    assert order == ["student", "student", "teacher read"]
    torch.testing.assert_close(late["total"], direct["total"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the teacher's side stream needs CUDA")
def test_overlapping_the_teacher_on_a_cuda_stream_trains_the_same_student():
    train = _digits()
    students = []
    for overlap in (False, True):
        loader = make_loader(IndexedDataset(train), batch_size=32, shuffle=True, seed=0)
        students.append(
            distill(_mlp(1, 64), _mlp(0), loader, terms=TERMS, epochs=2, overlap_teacher=overlap, seed=0)
        )
    for a, b in zip(students[0].parameters(), students[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_batched_loading_equals_per_sample_loading_with_and_without_augmentation():
    images = torch.randint(0, 255, (10, 3, 8, 8), dtype=torch.uint8)
    for augmentation in (None, Augmentation(2, True)):
        data = InMemoryDataset(
            images, torch.arange(10), mean=(0.5,) * 3, std=(0.2,) * 3, augmentation=augmentation
        )
        torch.manual_seed(0)
        batch = make_loader(IndexedDataset(data), batch_size=10, shuffle=False)
        x, y, index = next(iter(batch))
        torch.manual_seed(0)  # PyTorch's per-sample loading and collate, drawing the same random numbers
        reference = next(iter(torch.utils.data.DataLoader(IndexedDataset(data), batch_size=10)))[0]
        torch.testing.assert_close(x, reference, rtol=0, atol=0)
        assert y.tolist() == list(range(10)) and index.tolist() == list(range(10))


def test_the_finite_guard_names_the_first_bad_step_without_syncing_every_step():
    accelerator = make_accelerator()
    accelerator.gradient_accumulation_steps = 2
    guard = FiniteGuard(accelerator, "distill", capacity=2)
    values = [1.0, 2.0, 3.0, float("nan"), 5.0, float("inf")]  # more rows than its first buffer holds
    steps = [3, 3, 4, 4, 5, 5]  # resumed after 2 optimizer steps, 2 micro-batches a step
    for value, step in zip(values, steps):
        guard.watch({"kd": torch.tensor(value * 10), "total": torch.tensor(value)}, step)
    # the first bad micro-batch (the 4th of this run) belongs to optimizer step 4
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 4 \(terms: \{'kd': nan, 'total': nan\}"):
        guard.check(2)
    fine = FiniteGuard(accelerator, "distill")
    for value in (1.0, 2.0, 6.0):
        fine.watch({"kd": torch.tensor(value * 10), "total": torch.tensor(value)}, 1)
    assert fine.check(1) == pytest.approx({"kd": 30.0, "total": 3.0})  # the means the loop logs
    fine.watch({"kd": torch.tensor(5.0), "total": torch.tensor(0.5)}, 2)
    assert fine.check(1) == pytest.approx({"kd": 5.0, "total": 0.5})  # only rows since the last check
    assert fine.check(1) == {}


def test_epochs_to_pay_off():
    assert epochs_to_pay_off(10.0, 3.0, 1.0) == 5.0
    assert math.isinf(epochs_to_pay_off(10.0, 1.0, 1.0))


def test_the_teacher_checksum_covers_every_weight_and_buffer():
    from alambic.core.cache import teacher_checksum

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    before = teacher_checksum(model)
    assert teacher_checksum(model) == before
    model[1].num_batches_tracked += 1  # a 0-dim integer buffer
    assert teacher_checksum(model) != before
    assert teacher_checksum(model.to(torch.bfloat16)) != teacher_checksum(model.float())


def test_compiled_training_keeps_parameter_names_and_matches_eager_training():
    train = _digits(128)
    loader = make_loader(IndexedDataset(train), batch_size=50, shuffle=True, seed=0)  # a short last batch
    settings = {"epochs": 1, "optimizer": "sgd", "lr": 0.05, "seed": 0}
    eager = distill(_mlp(1, 64), _mlp(2), loader, terms=TERMS, **settings)
    compiled = distill(_mlp(1, 64), _mlp(2), loader, terms=TERMS, compile=True, **settings)
    assert getattr(compiled, "_compiled_call_impl", None) is not None  # nn.Module.compile() was applied
    assert (
        list(compiled.state_dict())
        == list(eager.state_dict())
        == ["0.weight", "0.bias", "2.weight", "2.bias"]
    )
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_token_data_set_has_a_fingerprint_that_sees_its_tokens(tmp_path):
    from alambic.data import dataset_fingerprint
    from alambic.data.text import TokenizedDataset

    ids = torch.randint(0, 50, (40, 6))
    data = TokenizedDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.arange(40) % 2)
    before = dataset_fingerprint(IndexedDataset(data))
    ids[0, 0] = (ids[0, 0] + 1) % 50  # the first sample is among the hashed ones
    assert dataset_fingerprint(data) != before
    lm = nn.Sequential(nn.Embedding(50, 4), nn.Flatten(), nn.Linear(24, 2))

    class OnIds(nn.Module):
        def forward(self, input_ids, attention_mask):
            return lm(input_ids)

    cache_teacher(OnIds(), data, tmp_path / "cache")  # dict inputs are cached by index too
    rows = CachedTeacher(tmp_path / "cache", dataset=data)(None, torch.tensor([3, 0]))["logits"]
    expected = lm(ids[[3, 0]]).detach()  # a batch of 2; the cache ran batches of 40: equal to float rounding
    torch.testing.assert_close(rows, expected, **close(expected))


def test_configs_refuse_a_cache_with_mixing_or_strategies_and_alternation_with_accumulation():
    from alambic.config import config_from_dict

    base = {"teacher": {"model": {"arch": "mlp"}, "train": {}}, "student": {"model": {"arch": "mlp"}}}
    with pytest.raises(ConfigError, match="train.mix"):
        config_from_dict({**base, "distill": {"teacher_cache": "c", "train": {"mix": "mixup"}}})
    for live_only in ({"teacher_dtype": "int8"}, {"train": {"overlap_teacher": True}}):
        with pytest.raises(
            ConfigError, match="replays stored outputs, so teacher_dtype and train.overlap_teacher"
        ):
            config_from_dict({**base, "distill": {"teacher_cache": "c", **live_only}})
    born = {**base, "strategy": {"kind": "born_again"}, "distill": {"teacher_cache": "c"}}
    with pytest.raises(ConfigError, match="apply to plain KD"):
        config_from_dict(born)
    mutual = {
        "teacher": None,
        "stages": ["distill", "evaluate"],
        "student": {"model": {"arch": "mlp"}},
        "strategy": {"kind": "mutual", "peers": [{"arch": "mlp"}], "alternate": True},
        "distill": {"terms": [{"loss": "ce"}, {"loss": "kd"}], "train": {"grad_accum": 2}},
    }
    with pytest.raises(ConfigError, match="grad_accum: 1"):
        config_from_dict(mutual)


CACHE_TWO_PROCESSES = """
import sys, accelerate, numpy as np, torch
from torch import nn
from alambic.core.cache import CachedTeacher, cache_teacher

FOLDER = sys.argv[1]

def run():
    accelerator = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5))
    data = torch.utils.data.TensorDataset(torch.randn(30, 6), torch.randint(0, 5, (30,)))
    # 30 samples in shards of 7: shards 0, 2, 4 in process 0; 1, 3 in process 1
    cache_teacher(teacher, data, FOLDER + "/shared", shard_size=7, batch_size=4,
                  process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                  barrier=accelerator.wait_for_everyone)
    assert accelerator.num_processes == 2
    cached = CachedTeacher(FOLDER + "/shared", teacher=teacher, dataset=data)
    replayed = cached(None, torch.arange(30))["logits"]
    with torch.no_grad():
        expected = teacher(data.tensors[0])
    # the same rows by another batching: equal up to float32 rounding
    torch.testing.assert_close(replayed, expected, rtol=1e-5, atol=1e-6)
    print("OK", accelerator.process_index, sorted(p.name for p in __import__("pathlib").Path(FOLDER).iterdir()), flush=True)

if __name__ == "__main__":
    accelerate.debug_launcher(run, num_processes=2)
"""


@pytest.mark.slow
def test_two_processes_share_the_shards_of_one_cache(tmp_path):
    from subprocesses import run_two_process_script

    output = run_two_process_script(CACHE_TWO_PROCESSES.replace("sys.argv[1]", repr(str(tmp_path))))
    assert "['shared']" in output  # one folder: no staging folder left behind
    manifest = json.loads((tmp_path / "shared" / "manifest.json").read_text())
    assert manifest["num_samples"] == 30 and len(manifest["fields"]["logits"]["shards"]) == 5
    assert sorted(p.name for p in (tmp_path / "shared").glob("logits-*.npy")) == [
        f"logits-{n:05d}.npy" for n in range(5)
    ]
