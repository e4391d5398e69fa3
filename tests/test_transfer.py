"""Transfer sets: unlabelled rows that only the teacher labels (data.transfer, alambic.data.TransferDataset)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from tolerance import close
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from alambic.config import Term, config_from_dict
from alambic.core.distiller import Distiller
from alambic.data import UNLABELLED, InMemoryDataset, TransferDataset, TransferSampler, make_loader
from alambic.errors import ConfigError
from alambic.losses import get_loss

TERMS = [Term(loss="ce", weight=0.5), Term(loss="kd", weight=1.0, params={"temperature": 2.0})]


def _batch(rows=8, classes=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(rows, 6, generator=generator)
    labels = torch.randint(0, classes, (rows,), generator=generator)
    teacher_logits = torch.randn(rows, classes, generator=generator)
    return inputs, labels, teacher_logits


def test_label_terms_average_over_the_labelled_rows_and_teacher_terms_over_every_row():
    torch.manual_seed(0)
    student = nn.Linear(6, 5)
    inputs, labels, teacher_logits = _batch()
    labels[[1, 4, 5]] = UNLABELLED
    module = Distiller(student, [*TERMS, Term(loss="tf_kd")], unlabelled_rows=True)
    losses = module(inputs, labels, {"logits": teacher_logits})
    logits = student(inputs).detach()
    kept = labels != UNLABELLED
    ce = 0.5 * F.cross_entropy(logits[kept], labels[kept])
    tf_kd = get_loss("tf_kd")(logits[kept], None, labels=labels[kept])  # has no ignore_index of its own
    kd = get_loss("kd")(logits, teacher_logits, temperature=2.0)  # every row
    for name, expected in (("ce", ce), ("tf_kd", tf_kd), ("kd", kd)):
        torch.testing.assert_close(losses[name].detach(), expected, **close(expected))


def test_a_batch_without_labelled_rows_gives_zero_for_label_terms_and_still_trains_on_the_teacher():
    student = nn.Linear(6, 5)
    inputs, labels, teacher_logits = _batch()
    labels[:] = UNLABELLED
    terms = [*TERMS, Term(loss="dkd", params={"warmup_epochs": 0.0})]  # dkd reads labels (one-hot) too
    losses = Distiller(student, terms, unlabelled_rows=True)(inputs, labels, {"logits": teacher_logits})
    assert losses["ce"].item() == 0.0 and losses["dkd"].item() == 0.0
    assert torch.isfinite(losses["total"]) and losses["kd"].item() > 0
    losses["total"].backward()
    assert student.weight.grad.abs().sum() > 0


def test_a_transfer_set_needs_a_term_that_reads_the_teacher():
    with pytest.raises(ConfigError, match="no term reads the teacher"):
        Distiller(nn.Linear(6, 5), [Term(loss="ce")], unlabelled_rows=True)


def _tensors(count, seed, classes=3, features=4):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(count, features, generator=generator)
    return InMemoryDataset(inputs, torch.randint(0, classes, (count,), generator=generator))


@pytest.mark.parametrize("ratio, per_epoch", [(0.5, 5), (2.0, 20), (None, 7)])
def test_the_ratio_sets_how_many_transfer_rows_an_epoch_holds_each_seen_before_any_repeats(ratio, per_epoch):
    sampler = TransferSampler(10, 7, ratio, seed=3)
    seen = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert len(indices) == len(sampler) == 10 + per_epoch
        assert sorted(i for i in indices if i < 10) == list(range(10))  # every labelled row once
        drawn = sampler.transfer_rows().tolist()  # in the order they were drawn
        assert sorted(i - 10 for i in indices if i >= 10) == sorted(drawn)
        seen += drawn
    assert len(seen) == 3 * per_epoch and all(0 <= row < 7 for row in seen)
    for start in range(0, len(seen) - 6, 7):  # whole passes over the transfer set, in turn
        assert sorted(seen[start : start + 7]) == list(range(7))
    again = TransferSampler(10, 7, ratio, seed=3)
    again.set_epoch(2)
    assert list(again) == indices  # the order depends only on (seed, epoch): a resumed run sees the same


def test_a_loader_over_a_transfer_dataset_gives_batches_in_index_order_with_unlabelled_rows():
    labelled, unlabelled = _tensors(10, 0), _tensors(6, 1)
    combined = TransferDataset(labelled, unlabelled, ratio=0.5)
    loader = make_loader(combined, batch_size=4, shuffle=True, seed=0)
    assert isinstance(loader.sampler, TransferSampler)
    rows = [row for inputs, labels in loader for row in zip(inputs, labels)]
    assert len(rows) == 15 and sum(int(label) == UNLABELLED for _, label in rows) == 5
    indices = list(loader.sampler)
    for (inputs, label), index in zip(rows, indices):  # each row is the one its index names
        expected_inputs, expected_label = combined[index]
        torch.testing.assert_close(inputs, expected_inputs)
        assert int(label) == (expected_label if index < 10 else UNLABELLED)
    assert combined[12][1] == UNLABELLED  # the transfer set's own labels are dropped
    torch.testing.assert_close(combined[12][0], unlabelled[2][0])


def test_distill_from_python_skips_labels_of_transfer_rows(tmp_path):
    from alambic import distill

    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    labelled = TensorDataset(torch.randn(4, 4), torch.tensor([0, 1, 2, 0]))
    unlabelled = TensorDataset(torch.randn(60, 4))  # inputs alone, as one-tuples
    loader = make_loader(TransferDataset(labelled, unlabelled), batch_size=8, shuffle=True)
    # most batches hold no labelled row: a mean over none would be NaN and stop the run
    trained = distill(teacher, student, loader, epochs=2, lr=0.1, log_every=1, run_dir=tmp_path)
    assert trained is student
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 16 and all(
        math.isfinite(value) for r in records for value in r.get("losses", {}).values()
    )


# ---------------------------------------------------------------------------------------------------------
# run configs


def _digits_config(tmp_path, transfer, **sections):
    train = {"epochs": 1, "batch_size": 32, "log_every": 1}
    return {
        "name": "digits", "output_dir": str(tmp_path / "runs"), "stages": ["teacher", "baseline", "distill"],
        "data": {"dataset": "digits", "train_subset": 64, "transfer": transfer},
        "teacher": {"model": {"arch": "mlp", "kwargs": {"hidden": [16]}}, "train": train},
        "student": {"model": {"arch": "mlp", "kwargs": {"hidden": [8]}}},
        "distill": {"train": train},
        **sections,
    }  # fmt: skip


def _steps(run_dir):
    steps = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            steps[record["stage"]] = record["step"]
    return steps


def _digit_rows(tmp_path, count=40, name="transfer.npy"):
    from alambic.data import build_datasets

    train, _, _ = build_datasets("digits")
    path = tmp_path / name
    np.save(path, train.inputs[-count:].numpy())
    return path


def test_only_the_distill_stage_sees_the_transfer_rows(tmp_path):
    from alambic.run.pipeline import run

    path = _digit_rows(tmp_path)
    run_dir = run(config_from_dict(_digits_config(tmp_path, {"path": str(path), "ratio": 0.5})))
    # 64 labelled rows in batches of 32; the distill stage has 32 transfer rows more
    assert _steps(run_dir) == {"teacher": 2, "baseline": 2, "distill": 3}


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda path: None, "does not exist"),
        (lambda path: np.save(path, np.zeros((0, 64), np.float32)), "holds no rows"),
        (lambda path: path.write_bytes(b"\x93NUMPY garbage"), "cannot read"),
        (lambda path: np.save(path, np.zeros((5, 8, 8), np.float32)), "rows of shape (8, 8)"),
    ],
)
def test_a_bad_transfer_file_is_one_line_before_anything_trains(tmp_path, write, message):
    from alambic.run.pipeline import run

    path = tmp_path / "transfer.npy"
    write(path)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        run(config_from_dict(_digits_config(tmp_path, {"path": str(path)})))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "runs").exists()


def test_a_transfer_set_needs_a_teacher_term_and_a_teacher():
    base = _digits_config(Path("/nowhere"), {"path": "x.npy"})
    with pytest.raises(ConfigError, match="no distill term reads it"):
        config_from_dict({**base, "distill": {"terms": [{"loss": "ce"}]}})
    mutual = {"kind": "mutual", "peers": [{"arch": "mlp"}]}
    with pytest.raises(ConfigError, match="has none"):
        config_from_dict({**base, "strategy": mutual})


def test_changing_the_transfer_set_keeps_the_teacher_and_baseline_settings():
    from alambic.run.resume import stage_settings

    old = config_from_dict(_digits_config(Path("/x"), None)).model_dump(mode="json")
    new = config_from_dict(_digits_config(Path("/x"), {"path": "t.npy"})).model_dump(mode="json")
    for stage in ("teacher", "baseline"):
        assert stage_settings(old, stage) == stage_settings(new, stage)
    assert stage_settings(old, "distill") != stage_settings(new, "distill")


def test_a_cached_teacher_stores_the_transfer_rows_after_the_training_set_and_checks_them(tmp_path):
    from alambic.core.cache import CachedTeacher
    from alambic.models import build_model
    from alambic.run.pipeline import run
    from alambic.run.teacher_cache import cache_teacher_outputs

    torch.manual_seed(0)
    teacher = build_model("mlp", num_classes=10, input_shape=(64,), hidden=[16])
    save_file(teacher.state_dict(), str(tmp_path / "teacher.safetensors"))
    path = _digit_rows(tmp_path, count=20)
    config = _digits_config(tmp_path, {"path": str(path)}, stages=["distill"])
    config["teacher"] = {"model": {"arch": "mlp", "kwargs": {"hidden": [16]}, "checkpoint": str(tmp_path / "teacher.safetensors")}}  # fmt: skip
    manifest = cache_teacher_outputs(config_from_dict(config), tmp_path / "cache")
    assert manifest["num_samples"] == 64 + 20
    rows = torch.from_numpy(np.load(path))
    cached = CachedTeacher(tmp_path / "cache")(rows, torch.arange(64, 84))["logits"]
    expected = teacher(rows).detach()
    torch.testing.assert_close(cached, expected, **close(expected))  # indices continue after the training set
    config["distill"]["teacher_cache"] = str(tmp_path / "cache")
    for name in ("first", "second"):  # written once, read by every later run
        run_dir = run(config_from_dict({**config, "name": name}))
        assert _steps(run_dir) == {"distill": 3}  # 64 + 20 rows in batches of 32
    config["data"]["transfer"]["max_rows"] = 10
    with pytest.raises(ConfigError, match="other training data"):
        run(config_from_dict({**config, "name": "stale"}))


def _write_images(folder, count, size):
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)  # colour, another size
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")


def test_an_image_run_with_a_folder_of_transfer_images_from_the_cli(tmp_path):
    from test_data import write_fake_mnist

    from alambic.cli import app

    write_fake_mnist(tmp_path / "mnist", num_train=40, num_test=20)
    _write_images(tmp_path / "unlabelled" / "part", 24, size=20)  # converted to grey 28x28
    train = {"epochs": 1, "batch_size": 16, "log_every": 1}
    config = {
        "name": "mnist", "stages": ["teacher", "distill"], "seed": 0,
        "data": {"dataset": "mnist", "data_dir": str(tmp_path / "mnist"), "augment": True,
                 "transfer": {"path": str(tmp_path / "unlabelled"), "ratio": 0.5}},
        "teacher": {"model": {"arch": "cnn", "kwargs": {"width": 4}}, "train": train},
        "student": {"model": {"arch": "cnn", "kwargs": {"width": 2}}},
        "distill": {"train": train},
    }  # fmt: skip
    (tmp_path / "mnist.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "mnist.yaml"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert _steps(tmp_path / "run") == {"teacher": 3, "distill": 4}  # 40 rows; 40 + 20 in batches of 16


@pytest.mark.parametrize("grouped", [False, True], ids=["shuffled", "group-by-length"])
def test_a_text_run_with_transfer_lines_from_the_cli(tmp_path, grouped):
    pytest.importorskip("transformers")
    from test_transformers import _tiny_sst2

    from alambic.cli import app

    folder, data = _tiny_sst2(tmp_path)
    lines = ["the film was great", "", "the plot was awful and the acting was poor poor poor poor poor poor"]
    (tmp_path / "augmented.jsonl").write_text("\n".join(json.dumps({"sentence": line}) for line in lines))
    train = {"epochs": 1, "batch_size": 32, "optimizer": "adamw", "lr": 0.003, "log_every": 1}
    config = {
        "name": "sst2", "stages": ["teacher", "distill"],
        "data": {"dataset": "sst2", "data_dir": str(data), "max_length": 16, "group_by_length": grouped,
                 "transfer": {"path": str(tmp_path / "augmented.jsonl"), "field": "sentence"}},
        "teacher": {"model": {"arch": f"hf:{folder}", "kwargs": {"local_files_only": True}}, "train": train},
        "student": {"model": {"arch": "derive:teacher", "kwargs": {"layers": 1}}},
        "distill": {"train": train},
    }  # fmt: skip
    (tmp_path / "sst2.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "sst2.yaml"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert _steps(tmp_path / "run") == {"teacher": 3, "distill": 4}  # 96 rows; 96 + 3 in batches of 32


def test_text_transfer_rows_take_the_training_sets_columns_and_width(tmp_path):
    pytest.importorskip("transformers")
    from test_transformers import _tiny_sst2

    from alambic.data import build_datasets
    from alambic.data.transfer_files import build_transfer_rows

    folder, data = _tiny_sst2(tmp_path)
    train, _, _ = build_datasets("sst2", data_dir=str(data), tokenizer=str(folder), max_length=16)
    (tmp_path / "lines.txt").write_text("the film was good\n\n" + "the plot was bad " * 10 + "\n")
    rows = build_transfer_rows(train, tmp_path / "lines.txt", tokenizer=str(folder))
    assert len(rows) == 2 and set(rows.columns) == set(train.columns)
    width = train.columns["input_ids"].shape[1]
    assert rows.columns["input_ids"].shape[1] == width  # the long line cut to the training set's width
    (tmp_path / "short.txt").write_text("good\nbad\n")
    short = build_transfer_rows(train, tmp_path / "short.txt", tokenizer=str(folder))
    assert short.columns["input_ids"].shape[1] == width  # short lines padded to it
    assert short.columns["attention_mask"].sum(1).tolist() == [3, 3]  # [CLS] word [SEP]
    assert (rows.labels == UNLABELLED).all()
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ConfigError, match="holds no examples"):
        build_transfer_rows(train, tmp_path / "empty.txt", tokenizer=str(folder))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"other": 1}\n')
    with pytest.raises(ConfigError, match="row 2 has no text field 'text'"):
        build_transfer_rows(train, tmp_path / "bad.jsonl", tokenizer=str(folder))


def _augment_config(tmp_path, data, folder, augment):
    train = {"epochs": 1, "batch_size": 32, "optimizer": "adamw", "lr": 0.003, "log_every": 1}
    return {
        "name": "sst2", "stages": ["teacher", "distill"],
        "data": {"dataset": "sst2", "data_dir": str(data), "max_length": 16, "transfer": {"augment": augment}},
        "teacher": {"model": {"arch": f"hf:{folder}", "kwargs": {"local_files_only": True}}, "train": train},
        "student": {"model": {"arch": "bilstm", "kwargs": {"embedding_dim": 8, "hidden": 4,
                                                           "init_embeddings": "teacher"}}},
        "distill": {"train": train},
    }  # fmt: skip


def test_a_text_run_augments_its_training_sentences_once_with_the_trained_teacher(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from test_transformers import _tiny_sst2

    import alambic.data.augment as augment
    from alambic.cli import app
    from alambic.data.augment import sidecar_path
    from alambic.data.text import load_tokenizer
    from alambic.models.hf import load_hf_model

    folder, data = _tiny_sst2(tmp_path)
    augment_settings = {"copies": 3, "mask": 0.3, "neighbours": 0.3, "ngram": 0.0, "k": 2, "seed": 0}
    (tmp_path / "sst2.yaml").write_text(
        yaml.safe_dump(_augment_config(tmp_path, data, folder, augment_settings))
    )
    command = ["run", str(tmp_path / "sst2.yaml"), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    out = tmp_path / "run" / "transfer" / "augmented.txt"
    lines = out.read_text().splitlines()
    record = json.loads(sidecar_path(out).read_text())
    assert record["key"]["settings"]["copies"] == 3 and record["counts"]["inputs"] == 96
    assert 0 < len(lines) == record["counts"]["written"] and "[MASK]" in out.read_text()
    # 96 labelled rows and every augmented line (ratio null) in batches of 32; the teacher saw the 96 alone
    assert _steps(tmp_path / "run") == {"teacher": 3, "distill": math.ceil((96 + len(lines)) / 32)}
    # augmented with the trained teacher's embedding table, not the pretrained one
    pretrained = load_hf_model(str(folder), num_labels=2).get_input_embeddings().weight.detach().numpy()
    fingerprint = augment.teacher_fingerprint(load_tokenizer(str(folder)), pretrained)
    assert record["key"]["teacher"]["embeddings_sha256"] != fingerprint["embeddings_sha256"]

    def fail(*args, **kwargs):
        raise AssertionError("augmented again")

    monkeypatch.setattr(augment, "augment_texts", fail)  # a resumed run reuses the file
    result = CliRunner().invoke(app, ["run", str(tmp_path / "sst2.yaml"), "--resume", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert out.read_text().splitlines() == lines


def test_transfer_augment_is_one_line_where_it_cannot_work(tmp_path):
    from alambic.run.pipeline import run

    with pytest.raises(ConfigError, match="one source: path .* or augment"):
        config_from_dict(_digits_config(tmp_path, {"path": "x.npy", "augment": {}}))
    with pytest.raises(ConfigError, match="one source"):
        config_from_dict(_digits_config(tmp_path, {"ratio": 1.0}))
    with pytest.raises(ConfigError, match="distill.teacher_cache; augment first"):
        config_from_dict(_digits_config(tmp_path, {"augment": {}}, distill={"teacher_cache": "cache"}))
    with pytest.raises(ConfigError, match=r"augment.mask: .*less than or equal to 1"):
        config_from_dict(_digits_config(tmp_path, {"augment": {"mask": 2}}))
    with pytest.raises(ConfigError, match="data set 'digits' holds none") as error:
        run(config_from_dict(_digits_config(tmp_path, {"augment": {}})))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "runs").exists()


def test_augment_with_a_teacher_without_an_embedding_table_fails_before_the_teacher_trains(
    tmp_path, monkeypatch
):
    transformers = pytest.importorskip("transformers")
    from test_transformers import _tiny_sst2

    from alambic.run.pipeline import run

    folder, data = _tiny_sst2(tmp_path)
    config = _augment_config(tmp_path, data, folder, {"copies": 2})
    config["student"]["model"]["kwargs"].pop("init_embeddings")  # only the augmentation reads the table
    config["output_dir"] = str(tmp_path / "runs")
    monkeypatch.setattr(transformers.BertForSequenceClassification, "get_input_embeddings", lambda self: None)
    with pytest.raises(ConfigError, match="has no input-embedding table .* data.transfer.path") as error:
        run(config_from_dict(config))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "runs").exists()  # nothing trained, no run directory
