"""Chat data for real: JSONL conversations rendered by the chat template of a GGUF file's tokenizer (a tiny
llama GGUF written by the ``gguf`` package in the test, ChatML template), the loss on every assistant
turn; prompt files; sequence-level KD on a prompt file (teacher answers written once, reused on resume);
ROUGE-L of greedy answers in summary.json and report.md."""

import json

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
pytest.importorskip("gguf", reason="the gguf package (in the hf extra) is not installed")

from test_gguf import write_tiny_gguf  # noqa: E402

from alambic.config import config_from_dict  # noqa: E402
from alambic.core import llm  # noqa: E402
from alambic.core.evaluate_lm import answer_rouge  # noqa: E402
from alambic.data.lm import (  # noqa: E402
    IGNORE_INDEX,
    build_lm_datasets,
    encode_chat,
    encode_prompt,
    fit_row,
    read_prompts,
)
from alambic.data.tokenizers import load_tokenizer  # noqa: E402
from alambic.errors import ConfigError, DataError  # noqa: E402
from alambic.run.pipeline import run  # noqa: E402

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "the hill?"},
    {"role": "assistant", "content": "on the other one"},
    {"role": "user", "content": "and then"},
    {"role": "assistant", "content": "there in an inn"},
]


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(gguf_file):
    return load_tokenizer(str(gguf_file))


def _labelled_text(tokenizer, ids, labels):
    """The text of each run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def test_a_conversation_takes_its_loss_on_every_assistant_turn_of_the_gguf_template(tokenizer):
    ids, labels = encode_chat(CONVERSATION, tokenizer)
    assert ids == tokenizer.chat_ids(CONVERSATION)  # the whole conversation, as the template renders it
    assert _labelled_text(tokenizer, ids, labels) == [
        "on the other one<|im_end|>\n",
        "there in an inn<|im_end|>\n",
    ]
    # one assistant turn: the loss on it alone, the rest is prompt
    ids, labels = encode_chat(CONVERSATION[:3], tokenizer)
    assert _labelled_text(tokenizer, ids, labels) == ["on the other one<|im_end|>\n"]
    prompt = tokenizer.chat_ids(CONVERSATION[:2], add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt and set(labels[: len(prompt)]) == {IGNORE_INDEX}


def test_jsonl_chat_rows_with_a_gguf_tokenizer_count_every_assistant_token(tokenizer, gguf_file, tmp_path):
    rows = [
        {"messages": CONVERSATION},
        {"messages": CONVERSATION[:3]},
        {"prompt": "the", "completion": "hill"},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    train, valid, info, loaded = build_lm_datasets(
        "jsonl", train_file=path, valid_file=path, tokenizer=str(gguf_file), max_length=256
    )
    labels = train.columns["labels"]
    expected = [
        len(tokenizer.encode("on the other one<|im_end|>\n"))
        + len(tokenizer.encode("there in an inn<|im_end|>\n")),
        len(tokenizer.encode("on the other one<|im_end|>\n")),
        len(tokenizer.encode("hill")) + 1,  # EOS appended to a completion
    ]
    assert (labels != IGNORE_INDEX).sum(1).tolist() == expected


def test_fit_row_drops_the_prompt_start_then_the_end():
    ids, labels = [1, 2, 3, 4, 5, 6], [IGNORE_INDEX] * 3 + [4, 5, 6]
    assert fit_row(ids, labels, 6) == (ids, labels)
    assert fit_row(ids, labels, 4) == ([3, 4, 5, 6], [IGNORE_INDEX, 4, 5, 6])
    assert fit_row(ids, labels, 3) == ([3, 4, 5], [IGNORE_INDEX, 4, 5])  # one prompt token kept
    # two turns: only the leading prompt goes first, a later prompt stays inside the row
    ids, labels = [1, 2, 3, 4, 5, 6], [IGNORE_INDEX, IGNORE_INDEX, 3, IGNORE_INDEX, 5, 6]
    assert fit_row(ids, labels, 5) == ([2, 3, 4, 5, 6], [IGNORE_INDEX, 3, IGNORE_INDEX, 5, 6])


def test_a_conversation_opening_with_the_assistant_is_one_line(tmp_path):
    from alambic.data.lm import read_jsonl

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}))
    with pytest.raises(DataError, match="line 1: the conversation must open"):
        read_jsonl(path)


def test_prompt_files_give_prompts_and_reference_answers(tokenizer, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(row)
            for row in [
                {"messages": CONVERSATION[:2]},
                {"messages": CONVERSATION[:3]},
                {"prompt": "the hill?"},
                {"prompt": "the hill?", "completion": "on it"},
            ]
        )
    )
    rows = read_prompts(path)
    assert [row["reference"] for row in rows] == [None, "on the other one", None, "on it"]
    assert rows[1]["messages"] == CONVERSATION[:2]  # the final assistant message is the reference
    rendered = tokenizer.chat_ids(CONVERSATION[:2], add_generation_prompt=True)
    assert encode_prompt(rows[0], tokenizer) == encode_prompt(rows[1], tokenizer) == rendered
    as_user = tokenizer.chat_ids([{"role": "user", "content": "the hill?"}], add_generation_prompt=True)
    assert encode_prompt(rows[2], tokenizer) == as_user  # a prompt text is one user message
    assert encode_prompt(rows[2], load_tokenizer("bytes")) == list(b"the hill?")  # no template: as it is
    path.write_text('{"messages": []}\n')
    with pytest.raises(DataError, match="line 1: expected") as raised:
        read_prompts(path)
    assert "\n" not in str(raised.value)


class Counter(nn.Module):
    """A causal LM without a cache whose next token is always the last one + 1 (mod its vocabulary)."""

    def __init__(self, vocabulary=12):
        super().__init__()
        self.vocabulary = vocabulary
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.nn.functional.one_hot((input_ids + 1) % self.vocabulary, self.vocabulary).float()
        return logits * 10 + self.weight


def test_answers_stop_at_eos_one_prompt_at_a_time():
    model = Counter()
    answers = llm.generate_answers(model, [[3], [7, 8], [0]], 5, stop_ids=(6,), top_k=1)
    assert answers == [[4, 5, 6], [9, 10, 11, 0, 1], [1, 2, 3, 4, 5]]  # stop kept; or new_tokens
    assert llm.generate_answers(model, [[3]], 5, top_k=1) == [[4, 5, 6, 7, 8]]  # no stop id: all of them


def test_answer_rouge_scores_greedy_answers_without_their_stop_token():
    words = {4: "four", 5: "five", 6: "<eos>", 9: "nine", 10: "ten", 11: "eleven", 0: "zero", 1: "one"}

    def decode(ids):
        return " ".join(words.get(token, str(token)) for token in ids)

    result = answer_rouge(
        Counter(), [[3], [8]], ["four five", "nine ten"], decode, new_tokens=4, stop_ids=(6,), samples=1
    )
    # "four five" vs "four five": 1; "nine ten eleven zero" vs "nine ten": P 2/4, R 1, F 2/3
    assert result["rouge_l"] == pytest.approx((1 + 2 / 3) / 2)
    assert result["answers"] == [
        {"prompt": "3", "reference": "four five", "answer": "four five", "rouge_l": 1.0}
    ]
    assert result["prompts"] == 2 and result["decoding"] == "greedy"


def _chat_files(tmp_path):
    words = ["the", "other", "one", "ran", "in", "and", "on", "hill", "there", "an", "inner"]
    rows = []
    for index in range(12):
        question = " ".join(words[(index + k) % len(words)] for k in range(3))
        answer = words[index % len(words)]
        rows.append(
            {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        )
    train, held_out = tmp_path / "train.jsonl", tmp_path / "held-out.jsonl"
    train.write_text("\n".join(json.dumps(row) for row in rows[:8]))
    held_out.write_text("\n".join(json.dumps(row) for row in rows[8:]))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"messages": row["messages"][:1]}) for row in rows[:8]))
    return train, held_out, prompts


def _chat_config(tmp_path, gguf_file, **evaluate):
    train, held_out, prompts = _chat_files(tmp_path)
    steps = {"epochs": 1, "batch_size": 4, "optimizer": "adamw", "lr": 0.001, "log_every": 5}
    return config_from_dict(
        {
            "name": "chat",
            "output_dir": str(tmp_path / "runs"),
            "task": "causal-lm",
            "data": {
                "dataset": "jsonl",
                "train_file": str(train),
                "valid_file": str(held_out),
                "max_length": 64,
            },
            "teacher": {"model": {"arch": f"hf:{gguf_file}"}},
            "student": {"model": {"arch": "derive:teacher", "kwargs": {"layers": 1}}},
            "stages": ["baseline", "distill", "evaluate", "report"],
            "baseline": {"train": steps},
            "distill": {
                "terms": [{"loss": "lm_ce"}],
                "train": steps,
                "sequence_kd": {"prompts_file": str(prompts), "new_tokens": 6, "top_k": 1},
            },
            "evaluate": {
                "batch_sizes": [1],
                "latency_repeats": 1,
                "rouge": {"file": str(held_out), "max_prompts": 3, "new_tokens": 5, "samples": 2, **evaluate},
            },
        }
    )


def test_sequence_kd_on_a_prompt_file_and_rouge_l_in_the_summary_and_report(
    gguf_file, tokenizer, tmp_path, monkeypatch
):
    config = _chat_config(tmp_path, gguf_file)
    calls = []
    original = llm.generate_answers
    monkeypatch.setattr(
        "alambic.run.lm_distill.generate_answers",
        lambda *a, **k: calls.append(len(a[1])) or original(*a, **k),
    )
    reports = []

    class Progress:  # the CLI's ProgressBar's evaluation method
        def evaluation(self, label, done, total, unit):
            reports.append((label, done, total, unit))

        def __call__(self, stage, step, total, values):  # training steps
            pass

    run_dir = run(config, progress=Progress())
    assert calls == [1, 8]  # the pre-flight's longest prompt, then the file's 8 prompts once
    assert ("teacher answers", 8, 8, "prompts") in reports
    assert ("evaluate distilled answers", 3, 3, "prompts") in reports
    folder = run_dir / "teacher_generations"
    settings = json.loads((folder / "settings.json").read_text())
    assert (
        settings["prompts_file"] == config.distill.sequence_kd.prompts_file
        and len(settings["prompts_sha256"]) == 64
    )
    from alambic.run.lm_distill import prompt_ids, stored_answers

    prompts, answers = stored_answers(folder)
    assert prompts == prompt_ids(config.distill.sequence_kd.prompts_file, tokenizer)
    assert all(1 <= len(answer) <= 6 for answer in answers)
    assert all(2 not in answer[:-1] for answer in answers)  # nothing after EOS (<|im_end|>, id 2)

    summary = json.loads((run_dir / "summary.json").read_text())
    for name in ("teacher", "baseline", "distilled"):
        rouge = summary["models"][name]["rouge"]
        assert (
            rouge["reference"] == "the file's answers"
            and rouge["prompts"] == 3
            and len(rouge["answers"]) == 2
        )
        assert 0.0 <= rouge["rouge_l"] <= 1.0 and summary["models"][name]["rouge_l"] == rouge["rouge_l"]
        assert (
            rouge["answers"][0]["prompt"] == "there an inner" and rouge["answers"][0]["reference"] == "there"
        )
    report = (run_dir / "report.md").read_text()
    assert "## Answers (ROUGE-L)" in report and "- reference: `there`" in report

    # resumed with the same settings and file: the stored answers are read back, nothing generated
    calls.clear()
    run(config, run_dir=run_dir, resume=True)
    assert calls == [1]  # the pre-flight only


class _Accelerator:
    is_main_process, device = True, "cpu"

    def wait_for_everyone(self):
        pass


def test_prompt_file_answers_are_made_again_when_the_file_the_settings_or_the_teacher_change(
    tokenizer, tmp_path, monkeypatch
):
    from alambic.config.sections import SequenceKDConfig
    from alambic.run import lm_distill

    calls = []
    original = llm.generate_answers
    monkeypatch.setattr(lm_distill, "generate_answers", lambda *a, **k: calls.append(1) or original(*a, **k))
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "the hill?"}\n')
    settings = SequenceKDConfig(prompts_file=str(path), new_tokens=3, top_k=1)
    teacher = Counter(vocabulary=20)

    def answers(settings, teacher, seed=0):
        rows = lm_distill.prompt_file_set(
            tmp_path, settings, teacher, tokenizer, seed=seed, accelerator=_Accelerator()
        )
        return rows.columns["input_ids"].tolist()

    reports = []
    rows = lm_distill.prompt_file_set(
        tmp_path, settings, teacher, tokenizer, seed=0, accelerator=_Accelerator(),
        progress=lambda done, total: reports.append((done, total)),
    )  # fmt: skip
    assert reports == [(0, 1), (1, 1)]  # progress of the teacher's answers
    first = rows.columns["input_ids"].tolist()
    assert answers(settings, teacher) == first and len(calls) == 1  # read back
    path.write_text('{"prompt": "the other?"}\n')
    assert answers(settings, teacher) != first and len(calls) == 2  # the file's contents changed
    answers(settings.model_copy(update={"samples": 7, "batch_size": 3}), teacher)
    assert len(calls) == 2  # the window prompts' settings do not apply
    answers(settings.model_copy(update={"new_tokens": 2}), teacher)
    assert len(calls) == 3  # a setting changed
    with torch.no_grad():
        teacher.weight += 1
    answers(settings.model_copy(update={"new_tokens": 2}), teacher)
    assert len(calls) == 4  # the teacher changed
    answers(settings.model_copy(update={"new_tokens": 2}), teacher)
    lm_distill.prompt_file_set(
        tmp_path, settings.model_copy(update={"new_tokens": 2}), teacher, load_tokenizer("bytes"), seed=0,
        accelerator=_Accelerator(),
    )  # fmt: skip
    assert len(calls) == 5  # the prompts' token ids changed (another tokenizer)


def test_the_training_rows_take_the_loss_on_the_teacher_answers(gguf_file, tokenizer, tmp_path):
    from alambic.run.lm_distill import answer_rows

    rows = answer_rows([[5, 6, 7], [8]], [[9, 2], [10, 11, 12]], tokenizer)
    assert rows.columns["input_ids"][:, :4].tolist() == [[5, 6, 7, 9], [8, 10, 11, 12]]
    assert rows.columns["labels"].tolist() == [[-100, -100, -100, 9, 2], [-100, 10, 11, 12, -100]]
    assert rows.columns["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": "classification", "data": {"dataset": "digits"}}, "evaluate.rouge scores language models"),
        ({"data": {"tokenizer": "chars"}}, "data.tokenizer: chars"),
    ],
)
def test_prompt_settings_are_checked_in_one_line(tmp_path, gguf_file, change, message):
    config = _chat_config(tmp_path, gguf_file).model_dump(mode="json")
    if change.get("task") == "classification":
        config["distill"].pop("sequence_kd")
        config["distill"]["terms"] = [{"loss": "ce"}]
        config["student"]["model"] = {"arch": "mlp"}
        config["teacher"]["model"] = {"arch": "mlp"}
        config["baseline"]["terms"] = [{"loss": "ce"}]
        config["task"] = "classification"
        config["data"] = {"dataset": "digits"}
    else:
        config["data"].update(change["data"])
    with pytest.raises(Exception, match=message) as raised:
        config_from_dict(config)
    assert isinstance(raised.value, (ConfigError, ValueError))


def test_a_rouge_file_without_answers_fails_before_the_run_directory(tmp_path, gguf_file):
    config = _chat_config(tmp_path, gguf_file)
    config.evaluate.rouge.file = config.distill.sequence_kd.prompts_file  # prompts without answers
    with pytest.raises(DataError, match="row 1 has no reference answer"):
        run(config)
    assert not (tmp_path / "runs").exists()
