"""ROUGE-L (Lin 2004) against values computed by hand: the longest common subsequence, its precision,
recall and F-measure, and the tokens compared."""

import pytest

from alambic.core.rouge import lcs_length, mean_rouge_l, rouge_l, rouge_tokens


def test_tokens_are_lowercased_runs_of_letters_and_digits():
    assert rouge_tokens("Sci/Tech, mostly.") == ["sci", "tech", "mostly"]
    assert rouge_tokens("  World!\n2024 Élan_vital ") == ["world", "2024", "élan", "vital"]
    assert rouge_tokens("...") == []


@pytest.mark.parametrize(
    ("first", "second", "length"),
    [
        ("a b c b d a b", "b d c a b a", 4),  # CLRS's example: b c b a
        ("a b c", "a b c", 3),
        ("a b c", "c b a", 1),
        ("a b c", "d e", 0),
        ("", "a", 0),
        ("x a y b z c", "a b c", 3),  # a subsequence, not a substring
    ],
)
def test_longest_common_subsequence(first, second, length):
    assert lcs_length(first.split(), second.split()) == length
    assert lcs_length(second.split(), first.split()) == length


def test_rouge_l_precision_recall_and_f_by_hand():
    # candidate 6 tokens, reference 6, LCS "the cat on the mat" = 5: P = R = F = 5/6
    score = rouge_l("the cat sat on the mat", "the cat is on the mat")
    assert score == pytest.approx({"precision": 5 / 6, "recall": 5 / 6, "f": 5 / 6}, abs=1e-12)
    # candidate 2 tokens, reference 4, LCS 2 ("police killed"): P = 1, R = 1/2, F = 2PR/(P+R) = 2/3
    score = rouge_l("police killed", "police killed the gunman")
    assert score == pytest.approx({"precision": 1.0, "recall": 0.5, "f": 2 / 3}, abs=1e-12)
    # Lin 2004's example: S2 "police kill the gunman" and S3 "the gunman kill police" against the
    # reference "police killed the gunman": LCS 3 and 2 of 4, so F = 3/4 and 1/2
    assert rouge_l("police kill the gunman", "police killed the gunman")["f"] == pytest.approx(0.75)
    assert rouge_l("the gunman kill police", "police killed the gunman")["f"] == pytest.approx(0.5)


def test_case_and_punctuation_do_not_count_and_an_empty_side_scores_zero():
    assert rouge_l("Sports.", "sports")["f"] == pytest.approx(1.0)
    assert rouge_l("The answer is: Sci/Tech", "Sci/Tech")["f"] == pytest.approx(
        2 * 1 * 0.4 / 1.4
    )  # P 2/5, R 1
    assert rouge_l("", "sports") == {"precision": 0.0, "recall": 0.0, "f": 0.0}
    assert rouge_l("sports", "") == {"precision": 0.0, "recall": 0.0, "f": 0.0}


def test_mean_over_pairs():
    assert mean_rouge_l(["a b", "c"], ["a b", "d"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one each"):
        mean_rouge_l(["a"], [])
