"""Packed rows: attention stays inside each example, and losses and gradients equal padded rows
(`data.collate_packed`, `packing`, `attention.PACKED_SDPA`)."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llama_tune import attention, data, packing
from llama_tune.objective import TargetTokenLoss
from llama_tune.schema import DataConfig, SplitsConfig


def _rows(data_root: Path, tokenizer, folder: str, count: int) -> list[data.Example]:
    config = DataConfig(
        source=str(data_root / folder),
        task="instruction",
        max_length=256,
        max_train_rows=count,
        splits=SplitsConfig(validation=None, test=None),
    )
    return data.build(config, tokenizer).train.examples


@pytest.fixture(scope="module")
def real_rows(data_root: Path, tokenizer) -> list[data.Example]:
    """Alpaca rows (one answer) and ShareGPT conversations (earlier answers in the loss)."""
    alpaca = _rows(data_root, tokenizer, "instruction/alpaca_en_demo", 4)
    sharegpt = _rows(data_root, tokenizer, "instruction/sharegpt_dummy", 3)
    assert any(example.earlier_answers for example in sharegpt)
    return alpaca + sharegpt


def _model(folder: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    attention.use_training_attention(model, packed=True)
    assert model.config._attn_implementation == attention.PACKED_SDPA
    return model


def _per_example_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[float]:
    """Each example's summed target cross-entropy: a padded batch's rows, or a packed row's
    examples in order."""
    logits = model(**batch, use_cache=False).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=data.IGNORE_INDEX, reduction="none"
    )
    if "position_ids" not in batch:
        return losses.sum(dim=1).tolist()
    example = packing.example_index(batch["position_ids"])[:, :-1]
    return torch.zeros(int(example.max()) + 1).index_add_(0, example[0], losses[0]).tolist()


def test_collate_packed_lays_examples_end_to_end(real_rows, tokenizer) -> None:
    padded = data.collate(real_rows, tokenizer.pad_token_id, 16)
    packed = data.collate_packed(real_rows)
    lengths = [len(example.input_ids) for example in real_rows]
    assert packed["input_ids"].shape == (1, sum(lengths))
    assert "attention_mask" not in packed
    bounds = packing.example_bounds(packed["position_ids"][0])
    assert [end - start for start, end in bounds] == lengths
    for row, (start, end) in enumerate(bounds):
        assert packed["position_ids"][0, start:end].tolist() == list(range(end - start))
        assert packed["input_ids"][0, start:end].tolist() == real_rows[row].input_ids
        # The same labels as the padded row (whose first token is never predicted either).
        assert (
            packed["labels"][0, start + 1 : end].tolist()
            == padded["labels"][row, 1 : end - start].tolist()
        )
        assert packed["labels"][0, start] == data.IGNORE_INDEX


def test_a_packed_forward_finds_its_examples_once(
    tiny_model_dir, real_rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Finding a row's examples syncs with the device: once per forward, not once per layer.
    model = _model(tiny_model_dir)
    assert model.config.num_hidden_layers > 1
    found = []
    monkeypatch.setattr(packing, "example_bounds", _counted(found))
    for batch in (data.collate_packed(real_rows[:3]), data.collate_packed(real_rows[3:5])):
        model(**batch, use_cache=False)
    assert len(found) == 2
    # Position ids made under inference mode keep no version to check: found every time.
    with torch.inference_mode():
        model(**data.collate_packed(real_rows[:2]), use_cache=False)
    assert len(found) == 2 + model.config.num_hidden_layers


def _counted(found: list) -> object:
    find = packing.example_bounds

    def example_bounds(row: torch.Tensor) -> list[tuple[int, int]]:
        found.append(row)
        return find(row)

    return example_bounds


def test_packed_rows_attend_alike_through_variable_length_attention(
    tiny_model_dir, real_rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a GPU, torch's varlen flash attention takes every example of a packed batch in one
    # call. It runs only there: here a stand-in with its contract (examples laid end to end,
    # offsets, causal window, grouped key heads) checks the layout around it, two packed rows
    # against one SDPA call per example.
    model = _model(tiny_model_dir)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    rows = [data.collate_packed(real_rows[:3]), data.collate_packed(real_rows[3:6])]
    length = min(row["input_ids"].shape[1] for row in rows)
    batch = {name: torch.cat([row[name][:, :length] for row in rows]) for name in rows[0]}

    def forward_and_gradients() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logits = model(**batch, use_cache=False).logits
        logits.square().mean().backward()
        return logits.detach(), [param.grad.clone() for param in model.parameters()]

    expected_logits, expected_gradients = forward_and_gradients()
    calls = []
    monkeypatch.setattr(attention, "varlen_attn", _varlen_stand_in(calls))
    monkeypatch.setattr(attention, "_varlen_dtype", lambda *_: torch.float32)
    logits, gradients = forward_and_gradients()
    assert len(calls) == model.config.num_hidden_layers
    # The offsets go to the device once per forward, not once per layer.
    assert all(offsets is calls[0] for offsets in calls)
    torch.testing.assert_close(logits, expected_logits)
    for gradient, expected in zip(gradients, expected_gradients, strict=True):
        torch.testing.assert_close(gradient, expected)


def _varlen_stand_in(calls: list) -> object:
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **options):
        """torch's varlen_attn on [tokens, heads, dim], by one SDPA call per sequence."""
        calls.append(cu_seq_q)
        assert cu_seq_q is cu_seq_k
        assert max_q == max_k
        assert options["window_size"] == (-1, 0)
        assert cu_seq_q.dtype == torch.int32
        edges = cu_seq_q.tolist()
        assert max_q == max(end - start for start, end in pairwise(edges))
        pieces = [
            torch.nn.functional.scaled_dot_product_attention(
                *(states[start:end].transpose(0, 1) for states in (query, key, value)),
                is_causal=True,
                scale=options["scale"],
                enable_gqa=options["enable_gqa"],
            ).transpose(0, 1)
            for start, end in pairwise(edges)
        ]
        return torch.cat(pieces)

    return varlen_attn


def test_a_packed_row_keeps_attention_inside_each_example(tiny_model_dir, real_rows) -> None:
    model = _model(tiny_model_dir).eval()
    first, second, third = real_rows[0], real_rows[4], real_rows[1]
    packed = data.collate_packed([first, second, third])
    with torch.no_grad():
        logits = model(**packed).logits[0]
        alone = [model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in (first, second)]
        # Another first example: the later ones' logits do not move (block-diagonal attention).
        changed = dict(packed, input_ids=packed["input_ids"].clone())
        changed["input_ids"][0, 1 : len(first.input_ids)] = 42
        changed_logits = model(**changed).logits[0]
    split = len(first.input_ids)
    torch.testing.assert_close(logits[:split], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        logits[split : split + len(second.input_ids)], alone[1], rtol=0, atol=1e-5
    )
    assert (changed_logits[:split] - logits[:split]).abs().max() > 1e-3
    torch.testing.assert_close(changed_logits[split:], logits[split:], rtol=0, atol=0)


def test_padded_rows_read_as_with_sdpa(tiny_model_dir, real_rows, tokenizer) -> None:
    """The packed attention is SDPA itself for padded rows and for generation."""
    packed_model = _model(tiny_model_dir).eval()
    sdpa_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    batch = data.collate(real_rows[:3], tokenizer.pad_token_id, 16)
    prompt = torch.tensor([real_rows[0].input_ids[:20]])
    with torch.no_grad():
        ours, theirs = (
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for model in (packed_model, sdpa_model)
        )
        generated = [
            model.generate(prompt, max_new_tokens=8, do_sample=False)
            for model in (packed_model, sdpa_model)
        ]
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-5)
    assert generated[0].tolist() == generated[1].tolist()


def test_a_packed_row_ends_in_a_filler_to_its_bucket(real_rows, tokenizer) -> None:
    # The filler bounds the row lengths a run meets (bf16 kernels are built per shape).
    plain = data.collate_packed(real_rows)
    filled = data.collate_packed(real_rows, tokenizer.pad_token_id, 16)
    length = plain["input_ids"].shape[1]
    filler = filled["input_ids"].shape[1] - length
    assert filled["input_ids"].shape[1] % 16 == 0
    assert 0 < filler < 16
    for name, values in plain.items():
        assert filled[name][:, :length].tolist() == values.tolist()
    assert filled["input_ids"][0, length:].tolist() == [tokenizer.pad_token_id] * filler
    assert filled["labels"][0, length:].tolist() == [data.IGNORE_INDEX] * filler
    # A segment of its own: the examples' bounds are unchanged, the filler's follow them.
    bounds = packing.example_bounds(filled["position_ids"][0])
    assert bounds == [*packing.example_bounds(plain["position_ids"][0]), (length, length + filler)]


@pytest.mark.parametrize("bucket", [1, 16])
def test_packed_losses_and_gradients_equal_padded_ones(
    tiny_model_dir, real_rows, tokenizer, bucket: int
) -> None:
    model = _model(tiny_model_dir).train()
    padded = data.collate(real_rows, tokenizer.pad_token_id, 16)
    packed = data.collate_packed(real_rows, tokenizer.pad_token_id, bucket)
    with torch.no_grad():
        expected = _per_example_losses(model, padded)
        actual = _per_example_losses(model, packed)
    # With a filler, its segment follows the examples and scores nothing.
    assert actual[len(real_rows) :] == ([0.0] if bucket > 1 else [])
    torch.testing.assert_close(actual[: len(real_rows)], expected, rtol=1e-4, atol=1e-4)

    objective = TargetTokenLoss(model)
    gradients = []
    for batch in (padded, packed):
        model.zero_grad()
        objective(**batch)["ce"].backward()
        gradients.append([p.grad.clone() for p in model.parameters()])
    for padded_grad, packed_grad in zip(*gradients, strict=True):
        torch.testing.assert_close(packed_grad, padded_grad, rtol=1e-4, atol=1e-5)


def test_short_half_precision_rows_train_their_attention_in_fp32(
    tiny_model_dir, real_rows, tokenizer, monkeypatch
) -> None:
    """On a CPU, half-precision rows up to SHORT_ROWS tokens train their attention in fp32 with
    autocast off (faster there), also where autocast would cast an fp32 model's; longer rows
    and forwards without gradients keep the half-precision attention."""
    seen: list[tuple[torch.dtype, bool]] = []
    real_sdpa = attention.sdpa_attention_forward

    def spy(module, query, *args, **kwargs):
        seen.append((query.dtype, torch.is_autocast_enabled("cpu")))
        return real_sdpa(module, query, *args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    attention.use_training_attention(model, packed=False)
    model.get_input_embeddings().requires_grad_(True)
    short = data.collate(real_rows[:2], tokenizer.pad_token_id, 16)
    assert short["input_ids"].shape[1] <= attention.SHORT_ROWS
    inputs = {"input_ids": short["input_ids"], "attention_mask": short["attention_mask"]}
    logits = model(**inputs).logits
    assert seen == [(torch.float32, False)] * 2
    assert logits.dtype == torch.bfloat16
    seen.clear()
    with torch.no_grad():
        model(**inputs)
    long = torch.tensor([real_rows[0].input_ids * 4])[:, : attention.SHORT_ROWS + 16]
    model(input_ids=long)
    assert seen == [(torch.bfloat16, False)] * 4
    seen.clear()
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**inputs)
        model(input_ids=long)
    assert seen == [(torch.float32, False)] * 2 + [(torch.float32, True)] * 2
