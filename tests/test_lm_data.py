"""Language-model data from local files: tokenizers, text windows, prompt/completion and chat JSONL, packing."""

import json
from pathlib import Path

import pytest
import torch

from alambic.data import IndexedDataset, build_datasets, dataset_fingerprint, make_loader
from alambic.data.lm import IGNORE_INDEX, build_lm_datasets, cut_windows
from alambic.data.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer, load_tokenizer
from alambic.errors import ConfigError, DataError

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list) -> Path:
    return _write(path, "".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny byte-level BPE tokenizer with an EOS, a pad token and a Jinja chat template; no download."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    model.train_from_iterator(["hello world, the user asks and the assistant answers"], trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<eos>", pad_token="<pad>")
    hf.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    folder = tmp_path_factory.mktemp("hf-tokenizer")
    hf.save_pretrained(str(folder))
    return folder


def test_text_windows_and_stride_match_the_encoded_text(tmp_path):
    text = "the quick brown fox jumps over the lazy dog"
    train, valid, info, tokenizer = build_lm_datasets(
        "text",
        train_file=_write(tmp_path / "train.txt", text),
        valid_file=_write(tmp_path / "v.txt", text[:9]),
        block_size=8,
        stride=5,
    )
    encoded = list(text.encode())
    assert train.starts.tolist() == list(range(0, len(encoded) - 8 + 1, 5))  # last partial window dropped
    assert len(train) == (len(encoded) - 8) // 5 + 1
    for index, start in enumerate(train.starts.tolist()):
        item = train[index]
        assert item["input_ids"].tolist() == encoded[start : start + 8]
        assert item["labels"].tolist() == item["input_ids"].tolist()  # HF convention: the model shifts
    batch = train.get_batch([2, 0])
    assert torch.equal(batch["input_ids"], torch.stack([train[2]["input_ids"], train[0]["input_ids"]]))
    assert valid.starts.tolist() == [0]  # validation windows never overlap; 9 bytes hold one of 8
    assert train.unit_counts.tolist() == [7] * len(train) and info.unit == "byte"
    assert (info.num_classes, info.input_shape, info.class_names) == (256, (8,), [])
    assert tokenizer.vocab_size == 256


def test_validation_split_is_cut_before_tokenizing(tmp_path):
    text = "".join(chr(ord("a") + index % 26) for index in range(100))
    train, valid, _, tokenizer = build_lm_datasets(
        "text",
        train_file=_write(tmp_path / "t.txt", text),
        valid_fraction=0.2,
        block_size=6,
        stride=1,
        tokenizer="chars",
    )
    assert train.ids.tolist() == tokenizer.encode(text[:80])
    assert valid.ids.tolist() == tokenizer.encode(text[80:])
    last = train.starts.max().item() + 6
    assert last == 80  # stride 1 reaches the split's last token and no further
    assert len(valid) == 20 // 6


def test_byte_and_char_tokenizers_round_trip_and_save(tmp_path):
    text = "Héllo, wörld ☃\n"
    for spec in ("bytes", "chars"):
        tokenizer = load_tokenizer(spec, corpus=text)
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        tokenizer.save(tmp_path / spec)
        loaded = load_tokenizer(str(tmp_path / spec))
        assert type(loaded) is type(tokenizer) and loaded.encode(text) == ids
        assert loaded.vocab_size == tokenizer.vocab_size
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer) and len(ByteTokenizer().encode("é")) == 2
    chars = load_tokenizer("chars", corpus=text)
    assert isinstance(chars, CharTokenizer) and chars.chars == "".join(sorted(set(text)))
    assert chars.unit == "char" and chars.encode("H") == [chars.chars.index("H")]


def test_char_tokenizer_names_an_unknown_character():
    tokenizer = load_tokenizer("chars", corpus="abc")
    with pytest.raises(DataError, match="'z' is not among the 3 characters") as error:
        tokenizer.encode("abz")
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="corpus"):
        load_tokenizer("chars")
    with pytest.raises(ConfigError, match="not a folder"):
        load_tokenizer("no/such/tokenizer")


def test_prompt_completion_labels_mask_prompt_and_padding(tmp_path):
    rows = [{"prompt": "ab", "completion": "cde"}, {"prompt": "x", "completion": "y"}]
    path = _jsonl(tmp_path / "rows.jsonl", rows)
    train, _, info, _ = build_lm_datasets("jsonl", train_file=path, valid_file=path)
    batch = train.get_batch([0, 1])
    assert batch["input_ids"][0].tolist() == list(b"abcde")
    assert batch["input_ids"][1, :2].tolist() == list(b"xy")
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, *b"cde"],
        [IGNORE_INDEX, ord("y"), IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert train.unit_counts.tolist() == [3, 1] and info.input_shape == (5,)


def test_long_rows_lose_the_prompt_start_then_the_completion_end(tmp_path):
    rows = [{"prompt": "abcdef", "completion": "xy"}, {"prompt": "ab", "completion": "wxyz"}]
    path = _jsonl(tmp_path / "rows.jsonl", rows)
    train, _, _, _ = build_lm_datasets("jsonl", train_file=path, valid_file=path, max_length=4)
    batch = train.get_batch([0, 1])
    assert batch["input_ids"][0].tolist() == list(b"efxy")
    assert batch["input_ids"][1].tolist() == list(b"bwxy")  # one prompt token kept, the answer's end cut
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, *b"wxy"]


def test_hf_completions_end_with_eos_and_count_bytes(tmp_path, hf_folder):
    path = _jsonl(tmp_path / "rows.jsonl", [{"prompt": "hello ", "completion": "wörld"}])
    train, _, info, tokenizer = build_lm_datasets(
        "jsonl", train_file=path, valid_file=path, tokenizer=str(hf_folder)
    )
    assert isinstance(tokenizer, HFTokenizer) and info.unit == "byte"
    row = train[0]
    labelled = row["labels"][row["labels"] != IGNORE_INDEX].tolist()
    assert labelled[-1] == tokenizer.eos_id and tokenizer.decode(labelled) == "wörld<eos>"
    assert row["input_ids"].tolist() == tokenizer.encode("hello ") + labelled
    assert train.unit_counts.tolist() == [len("wörld".encode())]  # EOS stands for no text


def test_chat_rows_take_the_loss_on_every_assistant_message(tmp_path, hf_folder):
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world"},
        {"role": "user", "content": "the user asks"},
        {"role": "assistant", "content": "the assistant answers"},
    ]
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": messages}, {"messages": messages[:2]}])
    train, _, _, tokenizer = build_lm_datasets(
        "jsonl", train_file=path, valid_file=path, tokenizer=str(hf_folder)
    )
    prompt = tokenizer.chat_ids(messages[:-1], add_generation_prompt=True)
    full = tokenizer.chat_ids(messages)
    first_prompt = tokenizer.chat_ids(messages[:1], add_generation_prompt=True)
    first = tokenizer.chat_ids(messages[:2])
    row = train[0]
    assert row["input_ids"].tolist() == full
    assert row["labels"].tolist() == (
        [IGNORE_INDEX] * len(first_prompt)
        + first[len(first_prompt) :]
        + [IGNORE_INDEX] * (len(prompt) - len(first))
        + full[len(prompt) :]
    )
    assert tokenizer.decode(first[len(first_prompt) :]) == "world<eos>"
    assert tokenizer.decode(full[len(prompt) :]) == "the assistant answers<eos>"
    short = train[1]  # padded to the longer conversation with the pad token, masked
    real = int(short["attention_mask"].sum())
    assert (short["labels"][real:] == IGNORE_INDEX).all() and (
        short["input_ids"][real:] == tokenizer.pad_id
    ).all()
    assert tokenizer.decode(short["labels"][short["labels"] != IGNORE_INDEX].tolist()) == "world<eos>"


def test_chat_rows_need_a_tokenizer_with_a_chat_template(tmp_path):
    path = _jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    with pytest.raises(ConfigError, match="Hugging Face tokenizer"):
        build_lm_datasets("jsonl", train_file=path, valid_file=path)


def test_packing_concatenates_rows_into_blocks(tmp_path):
    rows = [
        {"prompt": "ab", "completion": "cde"},
        {"prompt": "f", "completion": "gh"},
        {"prompt": "i", "completion": "j"},
    ]
    path = _jsonl(tmp_path / "rows.jsonl", rows)
    train, _, info, _ = build_lm_datasets(
        "jsonl", train_file=path, valid_file=path, packing=True, block_size=4
    )
    assert set(train.columns) == {"input_ids", "labels"}  # no padding, no mask
    assert train.columns["input_ids"].tolist() == [
        list(b"abcd"),
        list(b"efgh"),
    ]  # "ij" dropped: a partial block
    assert train.columns["labels"].tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, *b"cd"],
        [ord("e"), IGNORE_INDEX, *b"gh"],
    ]
    assert train.unit_counts.tolist() == [2, 2] and info.input_shape == (4,)  # position 0 is never predicted


def test_malformed_jsonl_lines_name_the_file_and_line(tmp_path):
    good = json.dumps({"prompt": "a", "completion": "b"})
    cases = {
        "{not json": "line 2: not valid JSON",
        json.dumps({"prompt": "a"}): "line 2: expected",
        json.dumps(
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}
        ): "last message",
        json.dumps({"prompt": "a", "completion": ""}): "completion is empty",
    }
    for line, message in cases.items():
        path = _write(tmp_path / "bad.jsonl", f"{good}\n{line}\n{good}\n")
        with pytest.raises(DataError, match=message) as error:
            build_lm_datasets("jsonl", train_file=path, valid_file=path)
        assert "bad.jsonl" in str(error.value) and "\n" not in str(error.value)


def test_bad_sizes_and_short_data_are_one_line_errors(tmp_path):
    path = _write(tmp_path / "t.txt", "abcdefghij" * 3)
    with pytest.raises(ConfigError, match="block_size must be an integer >= 2"):
        build_lm_datasets("text", train_file=path, block_size=1)
    with pytest.raises(DataError, match="validation data is shorter than one block of 8 tokens"):
        build_lm_datasets("text", train_file=path, block_size=8, valid_fraction=0.1)
    with pytest.raises(DataError, match="does not exist"):
        build_lm_datasets("text", train_file=tmp_path / "missing.txt")


def test_hf_text_windows_count_the_bytes_of_their_predicted_tokens(tmp_path, hf_folder):
    text = "hello world, the user asks and the assistant answers. " * 4
    train, _, _, tokenizer = build_lm_datasets(
        "text", train_file=_write(tmp_path / "t.txt", text), tokenizer=str(hf_folder), block_size=5
    )
    assert len(train) > 3
    for index, start in enumerate(train.starts.tolist()):
        predicted = train.ids[start + 1 : start + 5].tolist()
        assert train.unit_counts[index].item() == len(tokenizer.decode(predicted).encode())


def test_build_datasets_reads_language_model_files(tmp_path):
    path = _write(tmp_path / "t.txt", "abcdefghij" * 20)
    train, test, info = build_datasets(
        "text", train_file=path, block_size=8, tokenizer="chars", train_subset=5
    )
    assert (len(train), info.num_classes, info.name) == (5, 10, "text")
    assert train.starts.tolist() == sorted(train.starts.tolist()) and len(set(train.starts.tolist())) == 5
    again = build_datasets("text", train_file=path, block_size=8, train_subset=5)[0]
    other = build_datasets("text", train_file=path, block_size=8, train_subset=5, seed=1)[0]
    assert torch.equal(again.starts, train.starts) and not torch.equal(other.starts, train.starts)  # seeded
    assert len(test) == 20 // 8
    with pytest.raises(ConfigError, match="needs train_file"):
        build_datasets("jsonl")


def test_loaders_index_and_fingerprint_token_dicts():
    blocks = cut_windows(torch.arange(40), ByteTokenizer(), block_size=8)
    batch = next(iter(make_loader(IndexedDataset(blocks), batch_size=3, shuffle=False)))
    assert set(batch) == {"input_ids", "labels", "index"} and batch["index"].tolist() == [0, 1, 2]
    assert IndexedDataset(blocks)[1]["index"] == 1
    changed = cut_windows(torch.arange(40).flip(0), ByteTokenizer(), block_size=8)
    assert dataset_fingerprint(blocks) == dataset_fingerprint(IndexedDataset(blocks))
    assert dataset_fingerprint(blocks) != dataset_fingerprint(changed)


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is absent")
@pytest.mark.parametrize(("spec", "vocab"), [("chars", 65), ("bytes", 256)])
def test_tiny_shakespeare_loads(spec, vocab):
    train, valid, info, tokenizer = build_lm_datasets(
        "text", train_file=SHAKESPEARE, tokenizer=spec, block_size=64
    )
    assert tokenizer.vocab_size == info.num_classes == vocab
    assert tokenizer.decode(train[0]["input_ids"].tolist()).startswith("First Citizen:")
    total = len(train.ids) + len(valid.ids)
    assert total == (1115394 if spec == "chars" else len(SHAKESPEARE.read_bytes()))
    assert abs(len(valid.ids) / total - 0.1) < 0.01
