"""Token-level perturbations: embedding neighbours and gradient-guided (HotFlip) substitutions.

Both work on an encoded example directly: the tokens of the input field inside the prompt are
replaced, the template and the target stay as they are. The substitutes come from the model's
own input-embedding matrix (cosine nearest neighbours), so no word list is needed and any
language the tokenizer covers works. HotFlip (Ebrahimi et al., 2018) ranks each candidate by the
first-order change of the loss, (e_candidate - e_token) . dloss/de_token, and takes the best.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llama_tune import data, inference, models
from llama_tune.adversarial.text_noise import edit_count, spelling_variants, words_of
from llama_tune.objective import ALONE, ModelCalls, target_cross_entropy, target_token_losses

SENTINEL = "\x00"


def input_positions(
    example: data.Example, formatter: data.TaskFormatter, tokenizer: PreTrainedTokenizerBase
) -> list[int]:
    """Positions in `example.input_ids` of the tokens that spell its input field(s).

    The field's place in the prompt is found by rendering the prompt with a sentinel in its place;
    tokens whose characters lie wholly inside the field are its tokens. A truncated prompt only
    matches up to where it was cut.
    """
    special = formatter.chat_template(tokenizer) is None
    encoded = tokenizer(example.prompt, add_special_tokens=special, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    matching = 0
    while (
        matching < min(len(ids), example.prompt_length)
        and ids[matching] == example.input_ids[matching]
    ):
        matching += 1
    positions: list[int] = []
    for name in formatter.task.input_fields:
        marked = formatter.prompt(example.fields | {name: SENTINEL}, tokenizer)
        start = marked.index(SENTINEL)
        end = start + len(example.fields[name])
        positions += [
            i
            for i in range(matching)
            if start < offsets[i][1] <= end and _starts_inside(marked, offsets[i][0], start)
        ]
    return sorted(set(positions))


def _starts_inside(prompt: str, token_start: int, field_start: int) -> bool:
    """A token starts inside the field, or just before it with only the space that leads it."""
    return token_start >= field_start or prompt[token_start:field_start].isspace()


def token_texts(tokenizer: PreTrainedTokenizerBase, vocabulary: int) -> list[str]:
    """Each token's text with the space it carries.

    A SentencePiece decoder drops the space that leads the first token decoded ("▁good" alone
    decodes as "good", like the word piece "good"), so each token is decoded after a one-letter
    anchor and the anchor's text removed.
    """
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"]
    lead = tokenizer.decode(anchor)
    paired = tokenizer.batch_decode([[*anchor, token_id] for token_id in range(vocabulary)])
    return [
        text[len(lead) :] if text.startswith(lead) else tokenizer.decode([token_id])
        for token_id, text in enumerate(paired)
    ]


EXCLUDED = -2.0
"""The similarity given to tokens that may not replace a token: below any cosine."""


class Substitutes:
    """Tokens that may replace a token: its nearest neighbours by cosine similarity of the
    model's input embeddings, or its spellings one typo away that are tokens themselves.

    Special and added tokens and tokens that decode to nothing are never offered. A token that
    starts a word (its text begins with a space) is only replaced by one that does too, and a
    word piece by a word piece, so substitutions never glue or split words.
    """

    def __init__(self, embeddings: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> None:
        vocabulary = len(tokenizer)
        whole = embeddings[:vocabulary].detach()
        if not whole.is_meta:  # a process of a sharded run that made no weights takes the main's
            # In CPU memory wherever the model is: an fp32 copy of a 128k x 4096 vocabulary is
            # 2.1 GB that each GPU would hold beside its model (whole beside ZeRO-3's
            # partitions), while a search is a [new tokens, vocabulary] product, cheap on a CPU.
            whole = whole.to("cpu")
        self.unit = torch.nn.functional.normalize(whole.float(), dim=1)
        usable = torch.ones(vocabulary, dtype=torch.bool)
        usable[tokenizer.all_special_ids] = False
        usable[list(tokenizer.added_tokens_decoder)] = False
        starts_word = torch.zeros(vocabulary, dtype=torch.bool)
        self.texts = token_texts(tokenizer, vocabulary)
        self.by_text: dict[str, int] = {}
        for token_id, text in enumerate(self.texts):
            starts_word[token_id] = text[:1].isspace()
            if usable[token_id] and not text.strip():
                usable[token_id] = False
            if usable[token_id] and "\ufffd" not in text:
                self.by_text.setdefault(text, token_id)
        self.usable = usable
        self.starts_word = starts_word
        self._nearest: dict[int, list[int]] = {}
        self._searched: dict[int, int] = {}
        """How many neighbours each token's `_nearest` list was searched for."""
        self._spellings: dict[int, list[int]] = {}

    def nearest(self, token_id: int, count: int) -> list[int]:
        """The `count` usable tokens closest to `token_id`, closest first, itself excluded."""
        return self.nearest_many([token_id], count)[0]

    def nearest_many(self, token_ids: list[int], count: int) -> list[list[int]]:
        """`nearest` for several tokens; the ones not seen before are found in one product.
        A token has fewer than `count` when fewer tokens may replace it."""
        missing = sorted({t for t in token_ids if self._searched.get(t, 0) < count})
        if missing:
            similarity = self.unit[missing] @ self.unit.T
            similarity[:, ~self.usable] = EXCLUDED
            rows = torch.arange(len(missing))
            other_kind = self.starts_word[None, :] != self.starts_word[missing][:, None]
            similarity[other_kind] = EXCLUDED
            similarity[rows, missing] = EXCLUDED
            top = similarity.topk(min(count, similarity.shape[1]))
            for token_id, values, found in zip(
                missing, top.values.tolist(), top.indices.tolist(), strict=True
            ):
                # Past the tokens that may replace it, the search reaches excluded ones
                # (special tokens, the other kind, itself): never offered.
                self._nearest[token_id] = [
                    index for value, index in zip(values, found, strict=True) if value > EXCLUDED
                ]
                self._searched[token_id] = count
        return [self._nearest[token_id][:count] for token_id in token_ids]

    def spellings(self, token_id: int) -> list[int]:
        """Usable tokens whose text is one typo (text.spelling_variants) from `token_id`'s,
        with the same leading space; none for tokens without a letter (punctuation, digits)."""
        if token_id not in self._spellings:
            text = self.texts[token_id]
            word = text.lstrip()
            lead = text[: len(text) - len(word)]
            found = {self.by_text.get(lead + variant) for variant in spelling_variants(word)}
            self._spellings[token_id] = sorted(found - {None, token_id})
        return self._spellings[token_id]

    def misspellings(
        self, input_ids: list[int], position: int, lexicon: frozenset[str]
    ) -> list[int]:
        """The spellings of the token at `position` that make no new word of `lexicon` in the
        word holding it (from the token that starts that word to the next one that starts one):
        'fun' may become 'fnu' but not 'run'."""
        start = position
        while start > 0 and not self.starts_word[input_ids[start]]:
            start -= 1
        end = position + 1
        while end < len(input_ids) and not self.starts_word[input_ids[end]]:
            end += 1
        word = input_ids[start:end]
        before = set(words_of("".join(self.texts[token_id] for token_id in word)))
        kept = []
        for candidate in self.spellings(input_ids[position]):
            word[position - start] = candidate
            after = set(words_of("".join(self.texts[token_id] for token_id in word)))
            if not (after - before) & lexicon:
                kept.append(candidate)
        return kept


def with_tokens(example: data.Example, substitutions: dict[int, int]) -> data.Example:
    """A copy of `example` with the tokens at some positions replaced."""
    input_ids = list(example.input_ids)
    for position, token_id in substitutions.items():
        input_ids[position] = token_id
    return replace(example, input_ids=input_ids)


def neighbour_substitutions(
    example: data.Example,
    positions: list[int],
    neighbours: Substitutes,
    candidates: int,
    budget: float,
    rng: random.Random,
) -> dict[int, int]:
    """Random input tokens, each replaced by one of its `candidates` nearest neighbours."""
    chosen = rng.sample(positions, edit_count(budget, len(positions), rng))
    return {
        position: rng.choice(neighbours.nearest(example.input_ids[position], candidates))
        for position in sorted(chosen)
    }


# Swaps per example and round whose loss is measured by a forward pass; the first-order gain
# only ranks them. A typo moves a token far in embedding space, where the linear estimate is
# rough. Mean loss rise of the built-in model on 16 SST-2 rows, typo budget 0.15: first-order
# choice alone 0.78 nats (random typos from the same pool: 0.95), 2 checks 1.29, 4 checks 2.05,
# 8 checks 2.57 at 1.7x the time of 4.
EXACT_CHECKS = 4


@dataclass(frozen=True)
class AttackedModel:
    """The model a gradient attack queries, and how: its padding token, its precision, and
    the calls every process makes together when its weights are spread (FSDP, ZeRO-3)."""

    model: PreTrainedModel | PeftModel
    pad_token_id: int
    precision: str
    calls: ModelCalls = ALONE

    def filler(self) -> data.Example:
        """A two-token example for a process with nothing to attack in a call the others
        make; what the model says of it is dropped."""
        pad = self.pad_token_id
        return data.Example(prompt="", target="", input_ids=[pad, pad], prompt_length=1, row=-1)


def gradient_substitutions(
    attacked: AttackedModel,
    examples: list[data.Example],
    positions: list[list[int]],
    options_for: Callable[[list[int], list[int]], list[list[int]]],
    budget: float,
    rngs: list[random.Random],
) -> list[dict[int, int]]:
    """For each example, the substitutions that most raise the model's loss.

    `options_for(input_ids, positions)` gives the tokens that may replace the token at each of
    `positions` of the (partly attacked) `input_ids`: spellings, misspellings or embedding
    neighbours. Greedy, one substitution per example per round, as in
    HotFlip with exact re-ranking: a forward and backward of the batch gives every input
    token's loss gradient at the current perturbation; the EXACT_CHECKS swaps with the largest
    first-order gain are scored by a forward pass and the one with the highest loss is kept.
    Rounds go on until each example has its `budget` of substitutions or no options left (on
    every process, when the processes attack together). The model's parameters get no
    gradient and its training mode is restored.
    """
    calls = attacked.calls
    wanted = [
        edit_count(budget, len(usable), rng) for usable, rng in zip(positions, rngs, strict=True)
    ]
    chosen: list[dict[int, int]] = [{} for _ in examples]
    for _ in range(calls.most(max(wanted, default=0))):
        active = [i for i in range(len(examples)) if len(chosen[i]) < wanted[i]]
        if calls.most(len(active)) == 0:
            break
        current = [with_tokens(examples[i], chosen[i]) for i in active]
        gradient = input_gradients(attacked, current)
        swaps: list[tuple[int, list[int], list[list[int]]]] = []
        for row, i in enumerate(active):
            untouched = [p for p in positions[i] if p not in chosen[i]]
            options = _padded_options(current[row].input_ids, untouched, options_for)
            if options:
                swaps.append((row, untouched, options))
            else:
                wanted[i] = len(chosen[i])
        trials = [
            (active[row], position, token)
            for row, position, token in _first_order_best(attacked, swaps, gradient)
        ]
        if calls.most(len(trials)) == 0:
            break
        trial_examples = [
            with_tokens(examples[i], chosen[i] | {position: token}) for i, position, token in trials
        ]
        losses = example_losses(attacked, trial_examples)
        worst_for_model: dict[int, tuple[float, int, int]] = {}
        for (i, position, token), loss in zip(trials, losses.tolist(), strict=True):
            if i not in worst_for_model or loss > worst_for_model[i][0]:
                worst_for_model[i] = (loss, position, token)
        for i, (_, position, token) in worst_for_model.items():
            chosen[i][position] = token
    return chosen


def _padded_options(
    input_ids: list[int],
    positions: list[int],
    options_for: Callable[[list[int], list[int]], list[list[int]]],
) -> list[list[int]]:
    """For each of `positions`, its options followed by its own token, all padded with that
    token to one width (a padded option is never chosen); none when no position has any."""
    option_lists = [
        [token for token in found if token != input_ids[p]]
        for found, p in zip(options_for(input_ids, positions), positions, strict=True)
    ]
    width = max(map(len, option_lists), default=0)
    if width == 0:
        return []
    return [
        found + [input_ids[p]] * (width + 1 - len(found))
        for found, p in zip(option_lists, positions, strict=True)
    ]


def _first_order_best(
    attacked: AttackedModel,
    swaps: list[tuple[int, list[int], list[list[int]]]],
    gradient: torch.Tensor,
) -> list[tuple[int, int, int]]:
    """(row, position, token) of each row's EXACT_CHECKS swaps with the largest first-order
    loss change, (e_candidate - e_token) . gradient, for `swaps` of (row, positions, each
    position's options ending with its own token). Every embedding comes from one call of
    the embedding layer, which every process makes (ZeRO-3 gathers its weights for it)."""
    device = gradient.device
    grids = [torch.tensor(options, device=device) for _, _, options in swaps]
    nothing = torch.zeros(0, dtype=torch.long, device=device)
    flat = torch.cat([grid.flatten() for grid in grids] or [nothing])
    embedding = models.causal_lm(attacked.model).get_input_embeddings()
    with torch.no_grad():
        vectors = embedding(flat).float().split([grid.numel() for grid in grids])
    best = []
    for (row, positions, _), grid, rows in zip(swaps, grids, vectors, strict=True):
        grid_vectors = rows.view(*grid.shape, -1)
        swapped = grid_vectors[:, :-1] - grid_vectors[:, -1:]
        gains = torch.einsum("pcd,pd->pc", swapped, gradient[row, positions])
        gains[grid[:, :-1] == grid[:, -1:]] = -torch.inf
        checks = min(EXACT_CHECKS, int(torch.isfinite(gains).sum()))
        for flat_index in gains.flatten().topk(checks).indices.tolist():
            position, option = divmod(flat_index, grid.shape[1] - 1)
            best.append((row, positions[position], int(grid[position, option])))
    return best


def example_losses(
    attacked: AttackedModel, examples: list[data.Example], batch_size: int = 64
) -> torch.Tensor:
    """[examples] summed target cross-entropy of each example, without gradients, in eval mode.

    When the processes attack together, each runs as many batches as the busiest (fillers
    where it has no examples left)."""
    model = attacked.model
    base = models.causal_lm(model)
    head = base.get_output_embeddings()
    device = head.weight.device
    batches = [
        examples[start : start + batch_size] for start in range(0, len(examples), batch_size)
    ]
    extra = attacked.calls.most(len(batches)) - len(batches)
    losses = []
    was_training = model.training
    model.eval()
    with torch.no_grad(), inference.autocast_for(model, attacked.precision):
        for rows in batches + [[attacked.filler()]] * extra:
            batch = data.collate(rows, attacked.pad_token_id, 16)
            batch = {name: value.to(device) for name, value in batch.items()}
            hidden = base.get_decoder()(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
            token_losses, selected = target_token_losses(head, hidden[:, :-1], batch["labels"])
            positions = selected.nonzero()[:, 0]
            summed = torch.zeros(len(selected), device=device)
            losses.append(summed.index_add_(0, positions, token_losses))
    model.train(was_training)
    return torch.cat(losses[: len(batches)]).cpu() if batches else torch.zeros(0)


def input_gradients(attacked: AttackedModel, examples: list[data.Example]) -> torch.Tensor:
    """[batch, length, width] gradient of the summed target cross-entropy w.r.t. each input
    embedding, in float32, with the model in eval mode and its parameters untouched. A process
    with no examples takes the gradient of a filler when the processes attack together."""
    model = attacked.model
    base = models.causal_lm(model)
    embedding = base.get_input_embeddings()
    # Lengths padded to multiples of 16, as in training: each new shape rebuilds bf16 kernels.
    batch = data.collate(examples or [attacked.filler()], attacked.pad_token_id, 16)
    batch = {name: value.to(embedding.weight.device) for name, value in batch.items()}
    was_training = model.training
    model.eval()
    with torch.enable_grad(), inference.autocast_for(model, attacked.precision):
        embedded = embedding(batch["input_ids"]).detach().requires_grad_(True)
        hidden = base.get_decoder()(
            inputs_embeds=embedded, attention_mask=batch["attention_mask"]
        ).last_hidden_state
        loss = target_cross_entropy(base.get_output_embeddings(), hidden[:, :-1], batch["labels"])
        (gradient,) = torch.autograd.grad(loss, embedded)
    model.train(was_training)
    attacked.calls.regather()
    return gradient.float()
