"""Text augmentation for distillation (alambic.data.augment, alambic augment): masking at its rate, true
nearest neighbours in the embedding table, contiguous n-grams, determinism, the file written once and
reused, and one-line errors for bad inputs."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from alambic.cli import app
from alambic.config.augment import augment_settings
from alambic.data.augment import (
    augment_sentence,
    augment_texts,
    nearest_neighbours,
    replaceable_tokens,
    sentence_words,
    sidecar_path,
    write_augmented,
)
from alambic.errors import ConfigError, OutputError

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
runner = CliRunner()

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "a", ",", "##s"]
POSITIVE, NEGATIVE = ["good", "great", "fine"], ["bad", "awful", "poor"]
OTHER = ["the", "film", "was", "plot", "acting", "and"]
VOCAB = SPECIAL + POSITIVE + NEGATIVE + OTHER
SETTINGS = {"copies": 20, "mask": 0.1, "neighbours": 0.1, "ngram": 0.25, "k": 2, "max_ngram": 5, "seed": 0}


def _tokenizer(tmp_path=None):
    vocab = {word: index for index, word in enumerate(VOCAB)}
    if int(transformers.__version__.split(".")[0]) >= 5:  # transformers 5 takes the vocabulary itself
        return transformers.BertTokenizer(vocab=vocab)
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))


def _embeddings():
    """Each word its own direction, plus a share of its group's: a word's nearest neighbours are its group,
    in a known order (good: great, then fine; bad: awful, then poor)."""
    table = np.eye(len(VOCAB)) * 0.5
    for group in (POSITIVE, NEGATIVE):
        for rank, word in enumerate(group):
            table[VOCAB.index(word), 0] = 1.0  # the shared direction
            table[VOCAB.index(word), 1] = 0.1 * rank  # great sits between good and fine
    for word in NEGATIVE:
        table[VOCAB.index(word), 0] = -1.0
    return table.astype(np.float32)


def test_nearest_neighbours_are_the_closest_by_cosine_in_any_chunking():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(60, 5))
    candidates = np.arange(3, 60)
    queries = np.array([3, 10, 59, 20])
    found = nearest_neighbours(table, queries, candidates, 4, chunk=3)
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    for query, row in zip(queries, found, strict=True):
        similarity = unit[candidates] @ unit[query]
        similarity[candidates == query] = -np.inf
        np.testing.assert_array_equal(row, candidates[np.argsort(-similarity)[:4]])
    # ties are ordered by id; a query is never its own neighbour
    tied = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    np.testing.assert_array_equal(nearest_neighbours(tied, np.array([1]), np.arange(4), 2), [[0, 2]])


def test_only_whole_word_tokens_with_letters_are_replaceable(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    replaceable = replaceable_tokens(tokenizer, len(VOCAB))
    assert [VOCAB[index] for index in np.flatnonzero(replaceable)] == POSITIVE + NEGATIVE + OTHER


def _draws(tmp_path, text, copies=400, **settings):
    tokenizer = _tokenizer(tmp_path)
    (words,) = sentence_words(tokenizer, [text])
    options = {"mask": 0.0, "neighbours": 0.0, "ngram": 0.0, "max_ngram": 5, **settings}
    neighbour_text = {VOCAB.index("good"): ["great", "fine"], VOCAB.index("bad"): ["awful", "poor"]}
    return augment_sentence(
        text, words, np.random.default_rng(0), copies=copies, mask_token="[MASK]",
        neighbour_text=neighbour_text, **options,
    )  # fmt: skip


def test_masking_replaces_words_at_its_rate_and_keeps_the_others(tmp_path):
    text = "the film was good , the plot was bad and the acting was fine"
    words = text.split()
    draws = _draws(tmp_path, text, mask=0.3)
    masked = kept = 0
    for draw in draws:
        out = draw.split()
        assert len(out) == len(words)  # one mask per word, nothing else changed
        masked += sum(new == "[MASK]" for new in out)
        kept += sum(new == old for new, old in zip(out, words, strict=True))
    assert masked + kept == len(draws) * len(words)
    assert masked / (len(draws) * len(words)) == pytest.approx(0.3, abs=0.02)  # 5,600 words: sd 0.006


def test_neighbour_replacement_picks_one_of_the_k_nearest_and_only_for_whole_words(tmp_path):
    draws = _draws(tmp_path, "the good films, bad plot", neighbours=1.0)
    firsts = {draw.split()[1] for draw in draws}
    assert firsts == {"great", "fine"}  # both neighbours of "good", chosen at random
    assert {draw.split()[3] for draw in draws} == {"awful", "poor"}
    assert all(draw.startswith("the ") and " films, " in draw and draw.endswith(" plot") for draw in draws)
    # through augment_texts: the neighbours come from the embedding table (k = 1: the nearest)
    tokenizer = _tokenizer(tmp_path)
    settings = {**SETTINGS, "mask": 0.0, "neighbours": 1.0, "ngram": 0.0, "k": 1}
    lines, _ = augment_texts(["good , bad"], tokenizer, _embeddings(), **settings)
    assert lines == ["great , awful"]  # every draw the same, written once


def test_an_ngram_is_a_contiguous_slice_of_1_to_max_ngram_words(tmp_path):
    text = "the film was good , the plot was bad"
    words = text.split()
    draws = _draws(tmp_path, text, ngram=1.0, max_ngram=4)
    lengths, starts = set(), set()
    for draw in draws:
        out = draw.split()
        lengths.add(len(out))
        found = [start for start in range(len(words)) if words[start : start + len(out)] == out]
        assert found, draw
        starts.update(found)
    assert lengths == {1, 2, 3, 4} and starts == set(range(len(words)))


def test_augmentation_is_deterministic_for_a_seed_and_per_sentence(tmp_path):
    tokenizer, table = _tokenizer(tmp_path), _embeddings()
    texts = ["the film was good , the plot was bad", "the acting was fine and the plot was poor"]
    first, counts = augment_texts(texts, tokenizer, table, **SETTINGS)
    assert augment_texts(texts, tokenizer, table, **SETTINGS)[0] == first
    assert augment_texts(texts, tokenizer, table, **{**SETTINGS, "seed": 1})[0] != first
    # a sentence's draws depend on the seed and its index, not on the other sentences
    other = ["the plot was bad and the acting was poor , the film was awful", texts[1]]
    changed, _ = augment_texts(other, tokenizer, table, **SETTINGS)
    alone = [augment_texts([text], tokenizer, table, **SETTINGS)[0] for text in (texts[0], other[0])]
    assert [line for line in first if line not in alone[0]] == [
        line for line in changed if line not in alone[1]
    ]
    assert len(set(first)) == len(first) and not set(first) & set(texts)  # new sentences only
    assert counts["drawn"] == 40 and counts["written"] == len(first) <= 40


def test_the_file_is_written_once_and_reused_for_the_same_settings(tmp_path, monkeypatch):
    tokenizer, table = _tokenizer(tmp_path), _embeddings()
    texts = ["the film was good , the plot was bad"]
    out = tmp_path / "transfer.txt"
    record = write_augmented(texts, out, tokenizer, table, describe={"source": "x"}, **SETTINGS)
    lines = out.read_text().splitlines()
    assert not record["reused"] and len(lines) == record["counts"]["written"] > 5
    stored = json.loads(sidecar_path(out).read_text())
    assert stored["key"]["settings"]["seed"] == 0 and stored["describe"] == {"source": "x"}
    stamp = out.stat().st_mtime_ns
    monkeypatch.setattr("alambic.data.augment.augment_texts", lambda *a, **k: pytest.fail("recomputed"))
    assert write_augmented(texts, out, tokenizer, table, **SETTINGS)["reused"]
    assert out.stat().st_mtime_ns == stamp
    monkeypatch.undo()
    assert not write_augmented(texts, out, tokenizer, table, **{**SETTINGS, "seed": 1})["reused"]
    out.write_text("edited\n")  # a changed output is not trusted
    assert not write_augmented(texts, out, tokenizer, table, **{**SETTINGS, "seed": 1})["reused"]
    assert out.read_text() != "edited\n"
    foreign = tmp_path / "mine.txt"
    foreign.write_text("keep me\n")
    with pytest.raises(OutputError, match="not an augmented file alambic wrote"):
        write_augmented(texts, foreign, tokenizer, table, **SETTINGS)
    assert foreign.read_text() == "keep me\n"


def test_settings_and_tokenizers_that_cannot_work_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="mask \\+ neighbours .* must be <= 1"):
        augment_settings(mask=0.6, neighbours=0.5)
    with pytest.raises(ConfigError, match="copies: Input should be greater than or equal to 1"):
        augment_settings(copies=0)
    tokenizer, table = _tokenizer(tmp_path), _embeddings()
    with pytest.raises(ConfigError, match="too few for 20 neighbours"):
        augment_texts(["good"], tokenizer, table, **{**SETTINGS, "k": 20})


def _teacher_folder(tmp_path):
    config = transformers.BertConfig(
        vocab_size=len(VOCAB), hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
        max_position_embeddings=16,
    )  # fmt: skip
    folder = tmp_path / "teacher"
    transformers.BertModel(config).save_pretrained(folder)
    _tokenizer(tmp_path).save_pretrained(folder)
    return folder


def test_the_cli_augments_a_tsv_once_and_refuses_bad_inputs(tmp_path):
    folder = _teacher_folder(tmp_path)
    source = tmp_path / "train.tsv"
    source.write_text("sentence\tlabel\nthe film was good\t1\nthe plot was awful\t0\n")
    out = tmp_path / "transfer.txt"
    command = ["augment", str(source), "--teacher", f"hf:{folder}", "--out", str(out), "--k", "2"]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and out.is_file() and "label" not in out.read_text()
    result = runner.invoke(app, command)
    assert result.exit_code == 0 and "up to date" in " ".join(result.output.split())
    (tmp_path / "bad.tsv").write_text("text\tlabel\nthe film\t1\n")
    cases = {
        "does not exist": ["augment", str(tmp_path / "missing.txt")],
        "header with 'sentence'": ["augment", str(tmp_path / "bad.tsv")],
        "must be <= 1": ["augment", str(source), "--mask", "0.7", "--neighbours", "0.7"],
        "--teacher takes hf:": ["augment", str(source), "--teacher", "nowhere"],
    }
    for message, arguments in cases.items():
        teacher = [] if "--teacher" in arguments else ["--teacher", f"hf:{folder}"]
        result = runner.invoke(app, [*arguments, *teacher, "--out", str(tmp_path / "other.txt")])
        assert result.exit_code == 2, (message, result.output)
        assert message in result.output and "Traceback" not in result.output
