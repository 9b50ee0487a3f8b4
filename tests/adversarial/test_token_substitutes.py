"""Embedding neighbours, spellings and the gradient-guided (HotFlip) attack, on real SST-2 rows;
word starts under a SentencePiece decoder."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from llama_tune import data, schema
from llama_tune.adversarial import token_substitutes
from llama_tune.adversarial.text_noise import edit_count, lexicon, spelling_variants, words_of
from llama_tune.objective import ModelCalls, target_cross_entropy


@pytest.fixture(scope="module")
def real_model(builtin_dir: Path):
    return AutoModelForCausalLM.from_pretrained(builtin_dir).eval()


@pytest.fixture(scope="module")
def neighbours(real_model, tokenizer) -> token_substitutes.Substitutes:
    return token_substitutes.Substitutes(real_model.get_input_embeddings().weight, tokenizer)


@pytest.fixture(scope="module")
def sst2(tokenizer, data_root: Path) -> tuple[data.TaskFormatter, list[data.Example]]:
    settings = schema.DataConfig(
        source=str(data_root / "classification" / "sst2"),
        task="classification",
        splits={"train": "validation", "validation": None},
        max_train_rows=8,
    )
    built = data.build(settings, tokenizer)
    return data.TaskFormatter(settings, built.labels), built.train.examples


def test_input_positions_spell_the_input_field(sst2, tokenizer) -> None:
    formatter, examples = sst2
    for example in examples:
        positions = token_substitutes.input_positions(example, formatter, tokenizer)
        assert positions == list(range(positions[0], positions[-1] + 1))
        assert positions[-1] < example.prompt_length
        spelled = tokenizer.decode([example.input_ids[i] for i in positions]).strip()
        assert spelled == example.fields["text"].strip()


def test_neighbours_are_real_ordinary_tokens(neighbours, tokenizer) -> None:
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    for word in [" good", " terrible", " film", "ing"]:
        (token_id,) = tokenizer(word, add_special_tokens=False)["input_ids"]
        found = neighbours.nearest(token_id, 10)
        assert len(set(found)) == 10
        assert token_id not in found
        for other in found:
            assert 0 <= other < len(tokenizer)
            assert other not in special
            decoded = tokenizer.decode([other])
            assert decoded.strip()
            # Word starts stay word starts, pieces stay pieces.
            assert decoded[:1].isspace() == word[:1].isspace()


def test_neighbour_substitutions_are_seeded_and_within_budget(sst2, neighbours, tokenizer):
    formatter, examples = sst2
    for index, example in enumerate(examples):
        positions = token_substitutes.input_positions(example, formatter, tokenizer)
        first = token_substitutes.neighbour_substitutions(
            example, positions, neighbours, 5, 0.2, random.Random(index)
        )
        again = token_substitutes.neighbour_substitutions(
            example, positions, neighbours, 5, 0.2, random.Random(index)
        )
        assert first == again
        assert len(first) <= -(-0.2 * len(positions) // 1)
        assert set(first) <= set(positions)
        for position, token_id in first.items():
            assert token_id in neighbours.nearest(example.input_ids[position], 5)
        perturbed = token_substitutes.with_tokens(example, first)
        assert (
            perturbed.input_ids[example.prompt_length :]
            == example.input_ids[example.prompt_length :]
        )


def _losses(model, examples: list[data.Example], pad_token_id: int) -> torch.Tensor:
    """Each example's summed target cross-entropy under `model`."""
    losses = []
    with torch.no_grad():
        for example in examples:
            batch = data.collate([example], pad_token_id, 1)
            hidden = model.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
            losses.append(
                target_cross_entropy(model.lm_head, hidden[:, :-1], batch["labels"]).item()
            )
    return torch.tensor(losses)


def test_spellings_are_real_tokens_one_typo_away(neighbours, tokenizer) -> None:
    for word, expected in [(" good", {" god", " goods", " Good"}), ("ing", {"ings", "in"})]:
        (token_id,) = tokenizer(word, add_special_tokens=False)["input_ids"]
        found = neighbours.spellings(token_id)
        spelled = {tokenizer.decode([other]) for other in found}
        assert expected <= spelled
        assert token_id not in found
        assert not set(found) & (
            set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        )
        for text in spelled:
            assert text[:1].isspace() == word[:1].isspace()
            assert text.strip() in spelling_variants(word.strip())
    (comma,) = tokenizer(" ,", add_special_tokens=False)["input_ids"]
    assert neighbours.spellings(comma) == []


def test_misspellings_leave_out_typos_that_make_a_word(neighbours, tokenizer) -> None:
    def texts(found: list[int]) -> set[str]:
        return {tokenizer.decode([token_id]) for token_id in found}

    # A whole word: " fun" may not become " run" (nor " Run"), which the lexicon holds.
    ids = tokenizer(" it is fun", add_special_tokens=False)["input_ids"]
    spelled = texts(neighbours.spellings(ids[-1]))
    assert " run" in spelled
    kept = texts(neighbours.misspellings(ids, len(ids) - 1, frozenset({"it", "is", "fun", "run"})))
    assert kept == {text for text in spelled if text.strip().lower() != "run"}
    assert " Fun" in kept  # the same word, only its case flipped
    # A word piece is judged by the whole word: " bl" + "and" may not become "blend" or "blind".
    ids = tokenizer(" it is bland", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([token_id]) for token_id in ids[-2:]] == [" bl", "and"]
    words = frozenset({"blend", "blind", "bland"})
    spelled = texts(neighbours.spellings(ids[-1]))
    kept = texts(neighbours.misspellings(ids, len(ids) - 1, words))
    assert {"end", "ind"} <= spelled - kept
    # "blAnd" is the same word ("bland"), only its case flipped.
    assert kept == {piece for piece in spelled if f"bl{piece}".lower() not in words - {"bland"}}
    # In " blandly" the same pieces make no word of the lexicon.
    ids = tokenizer(" it is blandly", add_special_tokens=False)["input_ids"]
    assert {"end", "ind"} <= texts(neighbours.misspellings(ids, len(ids) - 2, words))


@pytest.fixture(scope="module")
def sst2_lexicon(data_root: Path) -> frozenset[str]:
    settings = schema.DataConfig(
        source=str(data_root / "classification" / "sst2"), task="classification"
    )
    return lexicon(data.training_inputs(data.TaskFormatter(settings)))


def _random_substitutions(example, positions, options_for, budget, rng) -> dict[int, int]:
    """The baseline: random positions that have options, each given a random option."""
    count = edit_count(budget, len(positions), rng)
    options = dict(zip(positions, options_for(example.input_ids, positions), strict=True))
    eligible = [position for position in positions if options[position]]
    chosen = rng.sample(eligible, min(count, len(eligible)))
    return {position: rng.choice(options[position]) for position in sorted(chosen)}


@pytest.mark.parametrize("pool", ["spelling", "misspellings", "neighbours"])
def test_gradient_attack_beats_random_substitutions(
    sst2, sst2_lexicon, neighbours, real_model, tokenizer, pool
):
    formatter, examples = sst2
    positions = [token_substitutes.input_positions(e, formatter, tokenizer) for e in examples]
    budget = 0.15

    def options_for(input_ids: list[int], where: list[int]) -> list[list[int]]:
        if pool == "spelling":
            return [neighbours.spellings(input_ids[p]) for p in where]
        if pool == "misspellings":
            return [neighbours.misspellings(input_ids, p, sst2_lexicon) for p in where]
        return neighbours.nearest_many([input_ids[p] for p in where], 10)

    attacked = token_substitutes.gradient_substitutions(
        token_substitutes.AttackedModel(real_model, tokenizer.pad_token_id, "no"),
        examples,
        positions,
        options_for,
        budget,
        [random.Random(i) for i in range(len(examples))],
    )
    randomised = [
        _random_substitutions(e, p, options_for, budget, random.Random(i))
        for i, (e, p) in enumerate(zip(examples, positions, strict=True))
    ]
    for example, chosen, where in zip(examples, attacked, positions, strict=True):
        assert set(chosen) <= set(where)
        assert len(chosen) <= -(-budget * len(where) // 1)
        for position, token_id in chosen.items():
            if pool == "neighbours":
                assert token_id in neighbours.nearest(example.input_ids[position], 10)
            else:
                assert token_id in neighbours.spellings(example.input_ids[position])
        if pool == "misspellings":
            attacked_example = token_substitutes.with_tokens(example, chosen)
            attacked_words = set(words_of(tokenizer.decode(attacked_example.input_ids)))
            clean_words = set(words_of(tokenizer.decode(example.input_ids)))
            assert not (attacked_words - clean_words) & sst2_lexicon
    for chosen, randomly in zip(attacked, randomised, strict=True):
        # The same seed draws the same number of substitutions for both.
        assert len(chosen) == len(randomly)
    pad = tokenizer.pad_token_id
    clean = _losses(real_model, examples, pad)
    gradient = _losses(
        real_model, list(map(token_substitutes.with_tokens, examples, attacked)), pad
    )
    random_ = _losses(
        real_model, list(map(token_substitutes.with_tokens, examples, randomised)), pad
    )
    assert (gradient - clean).mean() > 1.5 * (random_ - clean).mean() > 0
    assert (gradient > random_).float().mean() > 0.5
    assert not any(param.grad is not None for param in real_model.parameters())


def test_a_process_in_step_with_busier_ones_attacks_as_alone(
    sst2, neighbours, real_model, tokenizer
) -> None:
    # Under FSDP or ZeRO-3 every process makes the busiest one's calls: more rounds, more
    # batches of trial losses. The extra calls run on fillers and change nothing.
    formatter, examples = sst2
    examples = examples[:4]
    positions = [token_substitutes.input_positions(e, formatter, tokenizer) for e in examples]
    budget = 0.15

    def options_for(input_ids: list[int], where: list[int]) -> list[list[int]]:
        return [neighbours.spellings(input_ids[p]) for p in where]

    def attack(most, attacked_examples, where) -> tuple[list[dict[int, int]], int, int]:
        forwards, regathers = [], []
        calls = ModelCalls(contextlib.nullcontext, True, most, lambda: regathers.append(1))
        model = token_substitutes.AttackedModel(real_model, tokenizer.pad_token_id, "no", calls)
        rngs = [random.Random(i) for i in range(len(attacked_examples))]
        hook = real_model.get_decoder().register_forward_hook(lambda *_: forwards.append(1))
        try:
            chosen = token_substitutes.gradient_substitutions(
                model, attacked_examples, where, options_for, budget, rngs
            )
        finally:
            hook.remove()
        return chosen, len(forwards), len(regathers)

    alone, alone_forwards, rounds = attack(lambda count: count, examples, positions)
    assert any(alone)
    most_edits = max(
        edit_count(budget, len(where), random.Random(i)) for i, where in enumerate(positions)
    )
    busier, forwards, regathers = attack(lambda count: count + 2, examples, positions)
    assert busier == alone
    # Two more rounds than the most edits asked, each a gradient and two filler loss batches,
    # and two more loss batches in each of the rounds that attacked.
    assert regathers == most_edits + 2
    assert forwards == alone_forwards + 3 * (most_edits + 2 - rounds) + 2 * rounds
    # A process with nothing to attack makes the others' calls: here 2 rounds of a gradient
    # and 2 loss batches each.
    assert attack(lambda count: max(count, 2), [], []) == ([], 6, 2)


def _sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny tokenizer of the Llama-2 kind: "▁" marks a word start, and the decoder drops the
    space before the first token decoded."""
    pieces = ["<unk>", "▁a", "▁good", "▁god", "▁food", "good", "god", "▁film", "ing"]
    pieces += list("adfgilmno")
    model = models.Unigram([(piece, -1.0 if len(piece) > 1 else -5.0) for piece in pieces], 0)
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    backend.decoder = decoders.Metaspace(prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_word_starts_survive_a_decoder_that_drops_the_first_space() -> None:
    tokenizer = _sentencepiece_tokenizer()
    assert tokenizer.decode(tokenizer.convert_tokens_to_ids(["▁good"])) == "good"
    substitutes = token_substitutes.Substitutes(torch.randn(len(tokenizer), 8), tokenizer)
    piece = tokenizer.get_vocab()
    assert substitutes.texts[piece["▁good"]] == " good"
    assert substitutes.texts[piece["good"]] == "good"
    assert substitutes.starts_word[piece["▁good"]]
    assert not substitutes.starts_word[piece["good"]]
    assert substitutes.spellings(piece["▁good"]) == sorted([piece["▁god"], piece["▁food"]])
    assert substitutes.spellings(piece["good"]) == [piece["god"]]
    chosen = [piece["▁good"], piece["ing"]]
    for token_id, found in zip(chosen, substitutes.nearest_many(chosen, 3), strict=True):
        kinds = {bool(substitutes.starts_word[other]) for other in found}
        assert kinds == {bool(substitutes.starts_word[token_id])}


def test_the_neighbour_table_is_fp32_in_cpu_memory_or_a_shape_without_weights() -> None:
    # bf16 weights give an fp32 table off the accelerator; a sharded run's process without
    # weights (meta) keeps a shape for the main process's table to fill (`share_tables`).
    tokenizer = _sentencepiece_tokenizer()
    weights = torch.randn(len(tokenizer), 8, dtype=torch.bfloat16)
    unit = token_substitutes.Substitutes(weights, tokenizer).unit
    assert (unit.dtype, unit.device.type) == (torch.float32, "cpu")
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(len(tokenizer)))
    without_weights = token_substitutes.Substitutes(weights.to("meta"), tokenizer).unit
    assert without_weights.is_meta
    assert without_weights.shape == unit.shape


def test_more_neighbours_than_may_replace_a_token_offers_those_that_may() -> None:
    # `neighbours` above the vocabulary stopped training with topk's traceback; above the
    # tokens of a kind, it offered special tokens, the other kind and the token itself.
    tokenizer = _sentencepiece_tokenizer()
    substitutes = token_substitutes.Substitutes(torch.randn(len(tokenizer), 8), tokenizer)
    piece = tokenizer.get_vocab()
    for token in ["▁good", "ing"]:
        found = substitutes.nearest(piece[token], 10 * len(tokenizer))
        allowed = [
            other
            for other in range(len(tokenizer))
            if substitutes.usable[other]
            and substitutes.starts_word[other] == substitutes.starts_word[piece[token]]
            and other != piece[token]
        ]
        assert sorted(found) == allowed
        assert substitutes.nearest(piece[token], 2) == found[:2]
