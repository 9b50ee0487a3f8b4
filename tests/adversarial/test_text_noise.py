"""Character and word noise: seeded, within budget, whitespace kept, keyboard neighbours."""

from __future__ import annotations

import difflib
import math
import random

import pytest

from llama_tune.adversarial import text_noise

SENTENCE = (
    "the acting is superb , and the story moves along at a brisk pace\n"
    "until its oddly rushed final act ."
)


@pytest.mark.parametrize("method", ["char", "word"])
def test_same_seed_same_perturbation(method: str) -> None:
    perturb = text_noise.TEXT_METHODS[method]
    first = perturb(SENTENCE, 0.3, random.Random(7))
    assert first == perturb(SENTENCE, 0.3, random.Random(7))
    others = {perturb(SENTENCE, 0.3, random.Random(seed)) for seed in range(8)}
    assert len(others) > 1
    assert first != SENTENCE


@pytest.mark.parametrize("budget", [0.05, 0.2, 0.5, 1.0])
def test_char_noise_touches_at_most_the_budget_of_words(budget: float) -> None:
    words = SENTENCE.split()
    eligible = sum(sum(char.isalpha() for char in word) >= 2 for word in words)
    for seed in range(30):
        noisy = text_noise.char_noise(SENTENCE, budget, random.Random(seed)).split()
        assert len(noisy) == len(words)
        changed = sum(a != b for a, b in zip(words, noisy, strict=True))
        assert changed <= math.ceil(budget * eligible)
        # One character edit per changed word.
        for a, b in zip(words, noisy, strict=True):
            assert abs(len(a) - len(b)) <= 1


@pytest.mark.parametrize("budget", [0.1, 0.3, 1.0])
def test_word_noise_touches_at_most_the_budget_of_words(budget: float) -> None:
    words = SENTENCE.split()
    for seed in range(30):
        noisy = text_noise.word_noise(SENTENCE, budget, random.Random(seed)).split()
        matcher = difflib.SequenceMatcher(a=words, b=noisy, autojunk=False)
        kept = sum(block.size for block in matcher.get_matching_blocks())
        # Every original word not kept in place was deleted or moved by a swap.
        assert len(words) - kept <= math.ceil(budget * len(words))
        assert noisy


def test_budget_is_met_on_average() -> None:
    words = SENTENCE.split()
    noisy = [text_noise.char_noise(SENTENCE, 0.25, random.Random(s)).split() for s in range(400)]
    changed = [sum(a != b for a, b in zip(words, other, strict=True)) for other in noisy]
    eligible = sum(sum(char.isalpha() for char in word) >= 2 for word in words)
    assert abs(sum(changed) / len(changed) - 0.25 * eligible) < 0.3


def test_whitespace_and_short_texts_survive() -> None:
    noisy = text_noise.char_noise(SENTENCE, 1.0, random.Random(0))
    assert noisy.count("\n") == 1
    assert text_noise.word_noise("one", 1.0, random.Random(0)) in {"one", "one one"}
    assert text_noise.char_noise("a . !", 1.0, random.Random(0)) == "a . !"
    assert text_noise.word_noise("", 1.0, random.Random(0)) == ""


def _typo_distance(first: str, second: str) -> int:
    """Edits (insert, delete, substitute, adjacent swap) between two strings."""
    previous_row: list[int] = []
    row = list(range(len(second) + 1))
    for i in range(1, len(first) + 1):
        before, previous_row, row = previous_row, row, [i] + [0] * len(second)
        for j in range(1, len(second) + 1):
            cost = first[i - 1] != second[j - 1]
            row[j] = min(previous_row[j] + 1, row[j - 1] + 1, previous_row[j - 1] + cost)
            if i > 1 and j > 1 and first[i - 1] == second[j - 2] and first[i - 2] == second[j - 1]:
                row[j] = min(row[j], before[j - 2] + 1)
    return row[-1]


def test_keyboard_neighbours_follow_the_staggered_rows() -> None:
    expected = {"a": "qwsz", "s": "weadzx", "g": "tyfhvb", "m": "jkn", "p": "ol", "z": "asx"}
    for letter, neighbours in expected.items():
        assert sorted(text_noise.KEYBOARD_NEIGHBOURS[letter]) == sorted(neighbours)
    assert all(
        letter in text_noise.KEYBOARD_NEIGHBOURS[neighbour]
        for letter, neighbours in text_noise.KEYBOARD_NEIGHBOURS.items()
        for neighbour in neighbours
    )


def test_spelling_variants_are_one_typo_away() -> None:
    variants = text_noise.spelling_variants("good")
    assert {"god", "goods", "Good", "ogod", "food", "goad"} <= variants
    assert "good" not in variants
    assert all(_typo_distance("good", variant) == 1 for variant in variants)
    # 4 deletions (3 distinct), 3 swaps, 26x4 substitutions, 26x5 insertions, 4 case flips.
    assert len(variants) < 3 + 3 + 26 * 4 + 26 * 5 + 4
    assert text_noise.spelling_variants(",") == text_noise.spelling_variants("1999") == set()
    # Letters the word holds are offered too, so any alphabet gets its own typos.
    assert {"gäbä", "gäeb", "Gäbe"} <= text_noise.spelling_variants("gäbe")


def test_lexicon_holds_the_words_seen_often_enough() -> None:
    assert text_noise.words_of("Don't go-kart 2 Größe!") == ["don", "t", "go", "kart", "größe"]
    lines = ["a good film", "A GOOD cast", "a film"]
    assert text_noise.lexicon(lines) == {"a", "good", "film"}
    assert text_noise.lexicon(lines, min_count=3) == {"a"}
