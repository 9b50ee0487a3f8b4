"""Embedding neighbours, spellings and the gradient-guided (HotFlip) attack, on real SST-2 rows."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llama_tune import config, data
from llama_tune.adversarial import tokens
from llama_tune.adversarial.text import edit_count, spelling_variants
from llama_tune.train import target_cross_entropy


@pytest.fixture(scope="module")
def real_model(builtin_dir: Path):
    return AutoModelForCausalLM.from_pretrained(builtin_dir).eval()


@pytest.fixture(scope="module")
def neighbours(real_model, tokenizer) -> tokens.Substitutes:
    return tokens.Substitutes(real_model.get_input_embeddings().weight, tokenizer)


@pytest.fixture(scope="module")
def sst2(tokenizer, data_root: Path) -> tuple[data.TaskFormatter, list[data.Example]]:
    settings = config.DataConfig(
        source=str(data_root / "classification" / "sst2"),
        task="classification",
        splits={"train": "validation", "validation": None},
        max_train_rows=16,
    )
    built = data.build(settings, tokenizer)
    return data.TaskFormatter(settings, built.labels), built.train.examples


def test_input_positions_spell_the_input_field(sst2, tokenizer) -> None:
    formatter, examples = sst2
    for example in examples:
        positions = tokens.input_positions(example, formatter, tokenizer)
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
        positions = tokens.input_positions(example, formatter, tokenizer)
        first = tokens.neighbour_substitutions(
            example, positions, neighbours, 5, 0.2, random.Random(index)
        )
        again = tokens.neighbour_substitutions(
            example, positions, neighbours, 5, 0.2, random.Random(index)
        )
        assert first == again
        assert len(first) <= -(-0.2 * len(positions) // 1)
        assert set(first) <= set(positions)
        for position, token_id in first.items():
            assert token_id in neighbours.nearest(example.input_ids[position], 5)
        perturbed = tokens.with_tokens(example, first)
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


def _random_substitutions(example, positions, options_for, budget, rng) -> dict[int, int]:
    """The baseline: random positions that have options, each given a random option."""
    count = edit_count(budget, len(positions), rng)
    options = dict(
        zip(positions, options_for([example.input_ids[p] for p in positions]), strict=True)
    )
    eligible = [position for position in positions if options[position]]
    chosen = rng.sample(eligible, min(count, len(eligible)))
    return {position: rng.choice(options[position]) for position in sorted(chosen)}


@pytest.mark.parametrize("pool", ["spelling", "neighbours"])
def test_gradient_attack_beats_random_substitutions(sst2, neighbours, real_model, tokenizer, pool):
    formatter, examples = sst2
    positions = [tokens.input_positions(e, formatter, tokenizer) for e in examples]
    budget = 0.15

    def options_for(token_ids: list[int]) -> list[list[int]]:
        if pool == "spelling":
            return [neighbours.spellings(token_id) for token_id in token_ids]
        return neighbours.nearest_many(token_ids, 10)

    attacked = tokens.gradient_substitutions(
        real_model,
        examples,
        positions,
        options_for,
        budget,
        [random.Random(i) for i in range(len(examples))],
        tokenizer.pad_token_id,
        "no",
    )
    randomised = [
        _random_substitutions(e, p, options_for, budget, random.Random(i))
        for i, (e, p) in enumerate(zip(examples, positions, strict=True))
    ]
    for example, chosen, where in zip(examples, attacked, positions, strict=True):
        assert set(chosen) <= set(where)
        assert len(chosen) <= -(-budget * len(where) // 1)
        for position, token_id in chosen.items():
            assert token_id in options_for([example.input_ids[position]])[0]
    for chosen, randomly in zip(attacked, randomised, strict=True):
        # The same seed draws the same number of substitutions for both.
        assert len(chosen) == len(randomly)
    pad = tokenizer.pad_token_id
    clean = _losses(real_model, examples, pad)
    gradient = _losses(real_model, list(map(tokens.with_tokens, examples, attacked)), pad)
    random_ = _losses(real_model, list(map(tokens.with_tokens, examples, randomised)), pad)
    assert (gradient - clean).mean() > 1.5 * (random_ - clean).mean() > 0
    assert (gradient > random_).float().mean() > 0.5
    assert not any(param.grad is not None for param in real_model.parameters())
