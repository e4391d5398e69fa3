"""Dynamic padding (``data.dynamic_padding``, ``make_loader(dynamic_padding=True)``): token batches cut to
their longest row, the same outputs for models that honour their attention mask, cached teachers cut to
the batch's width."""

import json

import pytest
import torch
from tolerance import close
from torch import nn

from alambic.data import IndexedDataset, TransferDataset, make_loader, trim_padding
from alambic.data.text import TokenizedDataset

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")


def _token_set(lengths, width=12, vocab=40, seed=0, label=None):
    """Right-padded rows of the given lengths (token 0 is padding), labels 0/1 unless ``label`` is given."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (len(lengths), width), generator=generator)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    labels = torch.arange(len(lengths)) % 2 if label is None else torch.full((len(lengths),), label)
    return TokenizedDataset({"input_ids": ids, "attention_mask": mask, "token_type_ids": 0 * ids}, labels)


def test_trim_padding_drops_only_the_columns_that_are_padding_in_every_row():
    data = _token_set([3, 5, 2], width=9)
    inputs, labels = data.get_batch([0, 1, 2])
    trimmed, trimmed_labels = trim_padding((inputs, labels))
    assert {key: value.shape for key, value in trimmed.items()} == {key: (3, 5) for key in inputs}
    for key in inputs:
        assert torch.equal(trimmed[key], inputs[key][:, :5])
        assert inputs[key][:, 5:].count_nonzero() == 0  # what went was padding
    assert torch.equal(trimmed_labels, labels)
    # an index column ([B]) and list batches keep their form
    index = torch.tensor([0, 1, 2])
    as_list = trim_padding([inputs, labels, index])
    assert isinstance(as_list, list) and as_list[0]["input_ids"].shape == (3, 5) and as_list[2] is index
    # language-model dicts: labels [B, T] are cut with the tokens, the index is not
    lm = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": inputs["input_ids"], "index": index}  # fmt: skip
    cut = trim_padding(lm)
    assert cut["labels"].shape == (3, 5) and cut["index"] is index


def test_trim_padding_leaves_full_left_padded_and_maskless_batches_alone():
    full = _token_set([4, 4], width=4).get_batch([0, 1])
    assert trim_padding(full) is full
    left = {
        "input_ids": torch.tensor([[0, 0, 7], [0, 6, 7]]),
        "attention_mask": torch.tensor([[0, 0, 1], [0, 1, 1]]),
    }
    assert trim_padding(left) is left  # the last column is a real token in every row
    images = (torch.randn(2, 3, 4, 4), torch.tensor([0, 1]))
    assert trim_padding(images) is images


def _tiny_bert():
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def test_a_bert_gives_the_same_logits_and_real_token_states_on_a_trimmed_batch():
    model = _tiny_bert()
    inputs, _ = _token_set([3, 6, 2, 5], width=14).get_batch([0, 1, 2, 3])
    trimmed = trim_padding((inputs, None))[0]
    assert trimmed["input_ids"].shape == (4, 6)
    with torch.no_grad():
        full = model(**inputs, output_hidden_states=True)
        short = model(**trimmed, output_hidden_states=True)
    torch.testing.assert_close(short.logits, full.logits, **close(full.logits))
    real = inputs["attention_mask"][:, :6].bool()
    last_full, last_short = full.hidden_states[-1][:, :6][real], short.hidden_states[-1][real]
    torch.testing.assert_close(last_short, last_full, **close(last_full))


def test_a_loader_with_dynamic_padding_cuts_each_batch_to_its_longest_row_transfer_rows_included():
    labelled = _token_set([2, 3, 4, 2, 3, 9], width=12, seed=0)
    transfer = _token_set([5, 2, 3, 2], width=12, seed=1, label=-100)
    combined = TransferDataset(labelled, transfer, ratio=None)
    lengths = [2, 3, 4, 2, 3, 9, 5, 2, 3, 2]  # the labelled rows', then the transfer rows'
    sources = torch.cat([labelled.columns["input_ids"], transfer.columns["input_ids"]])  # rows by index
    loader = make_loader(IndexedDataset(combined), batch_size=3, shuffle=True, seed=0, dynamic_padding=True)
    widths = []
    for inputs, _labels, index in loader:
        longest = max(lengths[i] for i in index.tolist())
        assert inputs["input_ids"].shape == (len(index), longest)
        for row, i in enumerate(index.tolist()):  # the real tokens are the row's own
            assert torch.equal(inputs["input_ids"][row, : lengths[i]], sources[i, : lengths[i]])
        widths.append(longest)
    assert max(widths) == 9 and min(widths) < 9  # some batches were cut
    plain = make_loader(IndexedDataset(combined), batch_size=3, shuffle=True, seed=0)
    assert {batch[0]["input_ids"].shape[1] for batch in plain} == {12}


def test_a_cached_teacher_cuts_per_token_outputs_to_the_trimmed_batch(tmp_path):
    from alambic.core.cache import CachedTeacher, cache_teacher

    data = _token_set([3, 6, 2, 5, 4, 2], width=10)
    teacher = _tiny_bert()
    cache_teacher(teacher, data, tmp_path / "cache", features=["hidden_states.2"], batch_size=4)
    cached = CachedTeacher(tmp_path / "cache", teacher=teacher, dataset=data)
    index = torch.tensor([0, 2, 5])  # lengths 3, 2, 2
    inputs, _ = data.get_batch(index.tolist())
    full = cached(inputs, index)
    assert full["hidden_states.2"].shape == (3, 10, 16)
    trimmed = trim_padding((inputs, None))[0]
    cut = cached(trimmed, index)
    assert cut["hidden_states.2"].shape == (3, 3, 16)
    torch.testing.assert_close(cut["hidden_states.2"], full["hidden_states.2"][:, :3], rtol=0, atol=0)
    torch.testing.assert_close(cut["logits"], full["logits"], rtol=0, atol=0)


def _varied_sst2(tmp_path):
    """A tiny BERT folder and an SST-2 folder whose sentences hold 1 to 4 clauses (their widths vary)."""
    from test_transformers import _tiny_sst2

    folder, data = _tiny_sst2(tmp_path)
    generator = torch.Generator().manual_seed(1)
    for name, count in (("train.tsv", 64), ("dev.tsv", 16)):
        rows = ["sentence\tlabel"]
        for _ in range(count):
            label = int(torch.randint(0, 2, (1,), generator=generator))
            clauses = int(torch.randint(1, 5, (1,), generator=generator))
            word = ("good", "bad")[1 - label]
            rows.append(" and ".join([f"the film was {word}"] * clauses) + f"\t{label}")
        (data / name).write_text("\n".join(rows) + "\n")
    return folder, data


def _teacher_run(tmp_path, folder, data, name, **data_settings):
    """A run that trains only the teacher (1 epoch, SGD, no dropout) on the tiny SST-2; its run folder."""
    from alambic.config import config_from_dict
    from alambic.run.pipeline import run

    config = config_from_dict({
        "name": "sst2", "output_dir": str(tmp_path / "runs"), "stages": ["teacher"],
        "data": {"dataset": "sst2", "data_dir": str(data), "max_length": 32, **data_settings},
        # without dropout: its random masks follow the batch's shape
        "teacher": {"model": {"arch": f"hf:{folder}", "kwargs": {
            "local_files_only": True, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
                    "train": {"epochs": 1, "batch_size": 8, "optimizer": "sgd", "lr": 0.05}},
        "student": {"model": {"arch": "derive:teacher", "kwargs": {"layers": 1}}},
    })  # fmt: skip
    return run(config, run_dir=tmp_path / name)


def test_a_run_with_dynamic_padding_trains_the_same_teacher_on_shorter_batches(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import alambic.data.loaders as loaders

    folder, data = _varied_sst2(tmp_path)
    widths = []

    def recording(batch):
        out = trim_padding(batch)
        widths.append(out[0]["input_ids"].shape[1])
        return out

    monkeypatch.setattr(loaders, "trim_padding", recording)
    trained = {}
    for dynamic in (False, True):
        run_dir = _teacher_run(tmp_path, folder, data, f"run-{dynamic}", dynamic_padding=dynamic)
        trained[dynamic] = load_file(str(run_dir / "teacher" / "model.safetensors"))
    assert (
        widths and min(widths) < max(widths) == 21
    )  # 4 clauses: [CLS], 19 words, [SEP]; shorter batches cut
    # padding was all that went: the same training, to float rounding over 8 steps (SGD: Adam would blow
    # up rounding differences in near-zero gradients)
    for key, value in trained[False].items():
        torch.testing.assert_close(trained[True][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_token_lengths_reads_the_attention_mask_through_views_and_refuses_data_without_one():
    from torch.utils.data import Subset

    from alambic.data import token_lengths
    from alambic.errors import ConfigError

    labelled = _token_set([2, 3, 4], width=6)
    transfer = _token_set([5, 1], width=6, seed=1, label=-100)
    combined = IndexedDataset(TransferDataset(labelled, transfer, ratio=None))
    assert token_lengths(combined).tolist() == [2, 3, 4, 5, 1]
    assert token_lengths(Subset(labelled, [2, 0])).tolist() == [4, 2]
    images = torch.utils.data.TensorDataset(torch.randn(4, 3), torch.zeros(4))
    with pytest.raises(ConfigError, match="group_by_length: false"):
        token_lengths(images)


def test_group_by_length_serves_every_row_once_an_epoch_in_batches_of_similar_length():
    from alambic.data import LengthGroupedSampler, token_lengths

    generator = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 41, (203,), generator=generator).tolist()
    data = _token_set(lengths, width=40)
    grouped = make_loader(IndexedDataset(data), batch_size=8, shuffle=True, seed=0, group_by_length=True)
    random = make_loader(IndexedDataset(data), batch_size=8, shuffle=True, seed=0, dynamic_padding=True)
    assert isinstance(grouped.sampler, LengthGroupedSampler)
    orders = []
    for epoch in (0, 1):
        grouped.sampler.set_epoch(epoch)
        random.sampler.set_epoch(epoch)
        seen, widths = [], []
        for inputs, _labels, index in grouped:
            assert len(index) == 8 or len(seen) + len(index) == 203  # only the last batch is short
            assert inputs["input_ids"].shape[1] == max(
                lengths[i] for i in index.tolist()
            )  # cut to its longest
            seen += index.tolist()
            widths.append(inputs["input_ids"].shape[1])
        assert sorted(seen) == list(range(203))  # every row once
        orders.append(seen)
        random_widths = [batch[0]["input_ids"].shape[1] for batch in random]
        # 203 rows fit in one group of 50 batches: each batch holds neighbours in length order
        assert sum(widths) < 0.6 * sum(random_widths)
    assert orders[0] != orders[1]  # a new order each epoch, the same for the same (seed, epoch)
    again = LengthGroupedSampler(random.sampler, token_lengths(data), 8, seed=0)
    again.set_epoch(1)
    assert list(again) == orders[1]
    # a shuffled transfer set keeps its rows per epoch (ratio) under grouping
    transfer = TransferDataset(data, _token_set([3] * 50, width=40, seed=1, label=-100), ratio=0.1)
    mixed = make_loader(IndexedDataset(transfer), batch_size=8, shuffle=True, seed=0, group_by_length=True)
    rows = [i for batch in mixed for i in batch[2].tolist()]
    assert len(rows) == 203 + 20 and sorted(i for i in rows if i < 203) == list(range(203))


def test_accelerate_deals_whole_grouped_batches_to_each_process():
    """Accelerate's sharding (as ``prepare`` does for 2 processes) gives process k grouped batches k, k+2, ...
    of the one-process order, each still cut to its own longest row."""
    from accelerate.data_loader import prepare_data_loader

    lengths = torch.randint(1, 41, (203,), generator=torch.Generator().manual_seed(3)).tolist()
    data = _token_set(lengths, width=40)

    def loader():
        return make_loader(IndexedDataset(data), batch_size=8, shuffle=True, seed=0, group_by_length=True)

    whole = [batch[2].tolist() for batch in loader()]  # 26 batches, the last one 3 rows
    seen = set()
    for process in (0, 1):
        shard = prepare_data_loader(loader(), num_processes=2, process_index=process, put_on_device=False)
        batches = list(shard)
        assert len(batches) == 13
        for number, (inputs, _labels, index) in enumerate(batches):
            rows = index.tolist()
            if process + 2 * number < len(whole) - 1:  # every full batch intact, in its place
                assert rows == whole[process + 2 * number]
            assert inputs["input_ids"].shape[1] == max(lengths[i] for i in rows)
            seen |= set(rows)
    assert seen == set(range(203))  # the short last batch is filled up with rows from the start


def test_the_teacher_cache_with_dynamic_padding_matches_the_full_width_cache(tmp_path):
    from alambic.core.cache import CachedTeacher, cache_teacher

    data = _token_set([3, 9, 2, 5, 4, 2, 7, 1], width=10)
    teacher = _tiny_bert()
    paths = {}
    for dynamic in (False, True):
        paths[dynamic] = tmp_path / f"cache-{dynamic}"
        cache_teacher(teacher, data, paths[dynamic], features=["hidden_states.2"], batch_size=3,
                      shard_size=5, dynamic_padding=dynamic)  # fmt: skip
    index = torch.arange(8)
    inputs, _ = data.get_batch(index.tolist())
    full = CachedTeacher(paths[False], teacher=teacher, dataset=data)(inputs, index)
    short = CachedTeacher(paths[True], teacher=teacher, dataset=data)(inputs, index)
    torch.testing.assert_close(short["logits"], full["logits"], **close(full["logits"]))
    states, reference = short["hidden_states.2"], full["hidden_states.2"]
    assert states.shape == reference.shape == (8, 10, 16)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(states[real], reference[real], **close(reference))  # every real token
    # the columns cut from every batch (no row is 10 tokens long) hold zeros; the full-width cache, the
    # teacher's outputs at padding
    assert states[:, 9].count_nonzero() == 0 and reference[:, 9].count_nonzero() > 0
    manifest = json.loads((paths[True] / "manifest.json").read_text())
    assert manifest["token_axes"] == {"logits": [], "hidden_states.2": [0]} and manifest["width"] == 10


class _TokenLM(nn.Module):
    """Next-token logits ``[B, T, V]`` from an embedding and a causal convolution (no attention)."""

    def __init__(self):
        super().__init__()
        self.embed, self.out = nn.Embedding(40, 8), nn.Linear(8, 40)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.out(self.embed(input_ids).cumsum(1))


class _TokenCNN(nn.Module):
    """A Kim-style classifier: its ``conv`` output ``[B, 12, T - 2]`` has more channels than tokens."""

    def __init__(self):
        super().__init__()
        self.embed, self.conv, self.head = nn.Embedding(40, 8), nn.Conv1d(8, 12, 3), nn.Linear(12, 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.head(self.conv(self.embed(input_ids).transpose(1, 2)).amax(-1))


@pytest.mark.parametrize("kind", ["top-k language model", "convolution over tokens"])
def test_a_cache_finds_each_outputs_token_axes_and_pads_and_cuts_only_those(tmp_path, kind):
    """Top-k log-probabilities (``tail_mass`` is ``[B, T]``) and a ``[B, C, T - 2]`` feature map with more
    channels than tokens: cached on cut batches they are padded back along their token axis only, and
    read back for a narrower batch they are cut along it (not along the channels)."""
    from alambic.core.cache import CachedTeacher, cache_teacher

    lengths = [3, 9, 3, 5, 4, 3, 7, 4]
    data = _token_set(lengths, width=10)
    torch.manual_seed(0)
    teacher, settings = (
        (_TokenLM(), {"top_k": 4}) if kind.startswith("top-k") else (_TokenCNN(), {"features": ["conv"]})
    )
    paths = {}
    for dynamic in (False, True):
        paths[dynamic] = tmp_path / f"cache-{dynamic}"
        manifest = cache_teacher(
            teacher, data, paths[dynamic], batch_size=3, dynamic_padding=dynamic, **settings
        )
        axes = manifest["token_axes"]
        if kind.startswith("top-k"):
            assert axes == {"topk_log_probs": [0], "topk_ids": [0], "tail_mass": [0]}
        else:
            assert axes == {"logits": [], "conv": [1]} and manifest["fields"]["conv"]["shape"] == [12, 8]
    name = "logits" if kind.startswith("top-k") else "conv"
    cached = {dynamic: CachedTeacher(paths[dynamic], teacher=teacher, dataset=data) for dynamic in paths}
    for rows, width in (([0, 1, 2, 3, 4, 5, 6, 7], 9), ([0, 2, 5], 3)):  # one column cut, then seven
        index = torch.tensor(rows)
        inputs = trim_padding((data.get_batch(rows)[0], None))[0]
        assert inputs["input_ids"].shape[1] == width
        full, short = (cached[dynamic](inputs, index)[name] for dynamic in (False, True))
        assert (
            full.shape
            == short.shape
            == ((len(rows), width, 40) if name == "logits" else (len(rows), 12, width - 2))
        )
        for row, length in enumerate(lengths[i] for i in rows):  # outputs that see only real tokens
            real = full[row, :length] if name == "logits" else full[row, :, : length - 2]
            cut = short[row, :length] if name == "logits" else short[row, :, : length - 2]
            torch.testing.assert_close(cut, real, **close(real))
        if name == "conv":  # and the feature map is the teacher's own on the cut batch
            with torch.no_grad():
                live = teacher.conv(teacher.embed(inputs["input_ids"]).transpose(1, 2))
            torch.testing.assert_close(full, live, **close(live))


def test_a_cache_without_token_axes_is_read_by_shape_and_a_teacher_that_needs_full_width_is_refused(tmp_path):
    from alambic.core.cache import CachedTeacher, cache_teacher

    data = _token_set([3, 9, 2, 5], width=10)
    teacher = _tiny_bert()
    cache_teacher(teacher, data, tmp_path / "cache", features=["hidden_states.2"], batch_size=2)
    index = torch.arange(4)
    inputs = trim_padding((data.get_batch(index.tolist())[0], None))[0]
    recorded = CachedTeacher(tmp_path / "cache", teacher=teacher, dataset=data)(inputs, index)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    del manifest["token_axes"]  # as a cache written before the axes were recorded
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps(manifest))
    by_shape = CachedTeacher(tmp_path / "cache", teacher=teacher, dataset=data)(inputs, index)
    assert recorded["hidden_states.2"].shape == by_shape["hidden_states.2"].shape == (4, 9, 16)
    assert torch.equal(recorded["hidden_states.2"], by_shape["hidden_states.2"])

    class FullWidthOnly(_TokenCNN):
        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            if input_ids.shape[1] != 10:
                raise ValueError("expects 10 tokens")
            return super().forward(input_ids)

    from alambic.errors import ConfigError

    with pytest.raises(
        ConfigError, match="cannot run on batches cut to their longest row .*expects 10 tokens"
    ):
        cache_teacher(FullWidthOnly(), data, tmp_path / "refused", batch_size=2, dynamic_padding=True)
    assert not (tmp_path / "refused").exists()
    manifest = cache_teacher(FullWidthOnly(), data, tmp_path / "full", batch_size=2)  # full width: cached
    assert "token_axes" not in manifest  # read by shape


class _StridedCNN(_TokenCNN):
    """Its ``conv`` feature map has ``(T - 3) // 2 + 1`` columns: not one per token."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 12, 3, stride=2)


def test_an_output_that_does_not_grow_one_entry_per_token_is_never_cut_wrongly(tmp_path):
    from alambic.core.cache import CachedTeacher, cache_teacher
    from alambic.errors import ConfigError

    lengths = [3, 9, 3, 5, 4, 3, 7, 4]
    # conv columns: 5 at 11 tokens, 4 at 10 (as if one per token), 2 at 5: only the second probe sees it
    data = _token_set(lengths, width=11)
    teacher = _StridedCNN()
    manifest = cache_teacher(teacher, data, tmp_path / "cache", features=["conv"], batch_size=3)
    assert manifest["token_axes"] == {"logits": [], "conv": None}
    cached = CachedTeacher(tmp_path / "cache", teacher=teacher, dataset=data)
    inputs = data.get_batch([0, 1])[0]
    assert cached(inputs, torch.tensor([0, 1]))["conv"].shape == (2, 12, 5)  # full width: as stored
    with pytest.raises(ConfigError, match="'conv' does not grow by one entry per token.*dynamic_padding"):
        cached(trim_padding((inputs, None))[0], torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="'conv' .* does not grow by one entry per token"):
        cache_teacher(teacher, data, tmp_path / "cut", features=["conv"], batch_size=3, dynamic_padding=True)
    assert not (tmp_path / "cut").exists()
    with pytest.raises(ConfigError, match="the data set to cache is empty"):
        cache_teacher(teacher, torch.utils.data.Subset(data, []), tmp_path / "empty")


def test_a_run_grouping_by_length_trains_on_batches_of_similar_length(tmp_path, monkeypatch):
    import alambic.data.loaders as loaders

    folder, data = _varied_sst2(tmp_path)
    widths: dict[bool, list[int]] = {False: [], True: []}
    grouped = False

    def recording(batch):
        out = trim_padding(batch)
        widths[grouped].append(out[0]["input_ids"].shape[1])
        return out

    monkeypatch.setattr(loaders, "trim_padding", recording)
    for grouped in (False, True):
        settings = {"group_by_length": True} if grouped else {"dynamic_padding": True}
        run_dir = _teacher_run(tmp_path, folder, data, f"run-{grouped}", **settings)
        assert (run_dir / "teacher" / "model.safetensors").is_file()
    # 64 rows in 8 training batches; the evaluation batches (16 rows), cut in both runs, are recorded too
    assert sum(widths[True]) < sum(widths[False])
    assert max(widths[True]) == max(widths[False]) == 21


def test_the_teacher_cache_with_dynamic_padding_leaves_data_without_a_mask_in_index_order(tmp_path):
    from alambic.core.cache import CachedTeacher, cache_teacher

    images = torch.utils.data.TensorDataset(torch.randn(6, 5), torch.zeros(6, dtype=torch.long))
    teacher = torch.nn.Linear(5, 3)
    cache_teacher(teacher, images, tmp_path / "cache", batch_size=4, dynamic_padding=True)
    cached = CachedTeacher(tmp_path / "cache", teacher=teacher, dataset=images)
    index = torch.arange(6)
    with torch.no_grad():
        expected = teacher(images.tensors[0])
    logits = cached(images.tensors[0], index)["logits"]
    torch.testing.assert_close(logits, expected, **close(expected))
