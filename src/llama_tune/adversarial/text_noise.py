"""Character- and word-level perturbations of input text: the noise real users type.

Each function takes the text, a budget (the fraction of words an edit may touch) and a seeded
`random.Random`, so the same seed gives the same perturbation. The number of words touched is
the budget times the word count, rounded at random up or down so that its mean is exact and it
never exceeds the ceiling. Whitespace between words is kept as it was.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from collections.abc import Iterable

KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _keyboard_neighbours() -> dict[str, str]:
    """Letters next to each letter on a QWERTY keyboard.

    Each row sits about half a key right of the row above, so the letter at column c touches
    columns c and c + 1 of the row above and c - 1 and c of the row below ("a": q w s z).
    """
    position = {
        letter: (row, column)
        for row, letters in enumerate(KEYBOARD_ROWS)
        for column, letter in enumerate(letters)
    }
    touching = {(0, -1), (0, 1), (-1, 0), (-1, 1), (1, -1), (1, 0)}
    return {
        letter: "".join(
            other
            for other, (other_row, other_column) in position.items()
            if (other_row - row, other_column - column) in touching
        )
        for letter, (row, column) in position.items()
    }


KEYBOARD_NEIGHBOURS = _keyboard_neighbours()


def edit_count(budget: float, units: int, rng: random.Random) -> int:
    """How many of `units` to change: budget x units, randomly rounded (mean exact)."""
    return math.floor(budget * units + rng.random())


def _split_words(text: str) -> tuple[str, list[str], list[str]]:
    """(leading whitespace, words, the whitespace after each word)."""
    leading = re.match(r"\s*", text).group()
    pieces = re.findall(r"(\S+)(\s*)", text[len(leading) :])
    return leading, [word for word, _ in pieces], [space for _, space in pieces]


def _join_words(leading: str, words: list[str], spaces: list[str]) -> str:
    return leading + "".join(word + space for word, space in zip(words, spaces, strict=True))


def _edit_word(word: str, rng: random.Random) -> str:
    """One character edit inside a word: swap, delete, insert or keyboard substitution."""
    letters = [index for index, char in enumerate(word) if char.isalpha()]
    operations = ["delete", "insert", "keyboard"]
    swappable = [i for i in letters if i + 1 in letters and word[i] != word[i + 1]]
    if swappable:
        operations.append("swap")
    operation = rng.choice(operations)
    if operation == "swap":
        i = rng.choice(swappable)
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    i = rng.choice(letters)
    if operation == "delete":
        return word[:i] + word[i + 1 :]
    if operation == "insert":
        return word[:i] + rng.choice(string.ascii_lowercase) + word[i:]
    lower = word[i].lower()
    substitutes = KEYBOARD_NEIGHBOURS.get(lower) or string.ascii_lowercase.replace(lower, "")
    substitute = rng.choice(substitutes)
    return word[:i] + (substitute.upper() if word[i].isupper() else substitute) + word[i + 1 :]


def spelling_variants(word: str) -> set[str]:
    """Every spelling one typo away from `word` that still holds a letter: one deletion,
    adjacent swap, substitution or insertion of a letter (a-z, or one the word already has),
    or one character's case flipped. Words without a letter (punctuation, numbers) have none."""
    if not any(char.isalpha() for char in word):
        return set()
    letters = set(string.ascii_lowercase) | {char.lower() for char in word if char.isalpha()}
    splits = [(word[:i], word[i:]) for i in range(len(word) + 1)]
    variants = {head + tail[1:] for head, tail in splits if tail}
    variants |= {head + tail[1] + tail[0] + tail[2:] for head, tail in splits if len(tail) > 1}
    variants |= {head + letter + tail[1:] for head, tail in splits if tail for letter in letters}
    variants |= {head + letter + tail for head, tail in splits for letter in letters}
    variants |= {head + tail[0].swapcase() + tail[1:] for head, tail in splits if tail}
    variants.discard(word)
    return {variant for variant in variants if any(char.isalpha() for char in variant)}


def words_of(text: str) -> list[str]:
    """The lower-cased runs of letters in `text`; digits, apostrophes and punctuation split them."""
    return re.findall(r"[^\W\d_]+", text.lower())


def lexicon(texts: Iterable[str], min_count: int = 2) -> frozenset[str]:
    """The words (`words_of`) seen at least `min_count` times in `texts`: a typo that lands on one
    makes another word, not a misspelling. Twice, so that a typo the data holds once stays out."""
    counts = Counter(word for line in texts for word in words_of(line))
    return frozenset(word for word, count in counts.items() if count >= min_count)


def char_noise(text: str, budget: float, rng: random.Random) -> str:
    """Typos in `budget` of the words with two or more letters, one edit per word."""
    leading, words, spaces = _split_words(text)
    eligible = [i for i, word in enumerate(words) if sum(char.isalpha() for char in word) >= 2]
    for i in rng.sample(eligible, edit_count(budget, len(eligible), rng)):
        words[i] = _edit_word(words[i], rng)
    return _join_words(leading, words, spaces)


def word_noise(text: str, budget: float, rng: random.Random) -> str:
    """Word deletions, swaps of neighbours and duplications touching `budget` of the words.

    A swap touches two words. Every word is touched at most once and one word always remains.
    """
    leading, words, spaces = _split_words(text)
    remaining = edit_count(budget, len(words), rng)
    untouched = set(range(len(words)))
    deleted: set[int] = set()
    duplicated: set[int] = set()
    while remaining > 0 and untouched:
        i = rng.choice(sorted(untouched))
        operations = ["duplicate"]
        if len(words) - len(deleted) > 1:
            operations.append("delete")
        if remaining >= 2 and i + 1 in untouched:
            operations.append("swap")
        operation = rng.choice(operations)
        if operation == "swap":
            words[i], words[i + 1] = words[i + 1], words[i]
            untouched -= {i, i + 1}
            remaining -= 2
            continue
        (deleted if operation == "delete" else duplicated).add(i)
        untouched.discard(i)
        remaining -= 1
    kept_words: list[str] = []
    kept_spaces: list[str] = []
    for i, (word, space) in enumerate(zip(words, spaces, strict=True)):
        if i in deleted:
            continue
        if i in duplicated:
            kept_words.append(word)
            kept_spaces.append(" ")
        kept_words.append(word)
        kept_spaces.append(space)
    if deleted and kept_spaces and len(words) - 1 in deleted:
        # The old last word's trailing whitespace (usually none) ends the text again.
        kept_spaces[-1] = spaces[-1]
    return _join_words(leading, kept_words, kept_spaces)


TEXT_METHODS = {"char": char_noise, "word": word_noise}
