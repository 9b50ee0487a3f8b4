"""Embedding-space adversarial training: the epsilon ball, every method trains, accumulation,
processes and resume (on one process and on two) behave as without it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import torchrun
from llama_tune import attention, checkpoint, config, data, run_folder, schema, train
from llama_tune.adversarial import embedding
from llama_tune.objective import TargetTokenLoss, head_paired_sum


def _losses(run_dir: Path, key: str = "loss") -> list[float]:
    records = [json.loads(line) for line in (run_dir / run_folder.METRICS).open()]
    return [record[key] for record in records if key in record and "eval_loss" not in record]


def _two_examples(tokenizer) -> dict[str, torch.Tensor]:
    """A padded batch of two short examples with targets of different lengths."""
    examples = [
        data.Example("p", "t", [5, 6, 7, 8, 9, tokenizer.eos_token_id], 3, 0),
        data.Example("p", "t", [5, 6, tokenizer.eos_token_id], 2, 1),
    ]
    return data.collate(examples, tokenizer.pad_token_id, 8)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_projection_keeps_every_position_in_the_ball(norm: str) -> None:
    torch.manual_seed(0)
    offset = torch.randn(3, 7, 16) * 5
    inside = embedding.projected(offset, 0.5, norm)
    size = inside.norm(dim=-1) if norm == "l2" else inside.abs().amax(dim=-1)
    assert (size <= 0.5 + 1e-6).all()
    small = offset * 1e-3
    torch.testing.assert_close(embedding.projected(small, 0.5, norm), small)
    start = embedding.random_start(offset.shape, 0.5, norm, offset.device)
    size = start.norm(dim=-1) if norm == "l2" else start.abs().amax(dim=-1)
    assert (size <= 0.5 + 1e-6).all()


@pytest.mark.parametrize(("method", "norm"), [("fgm", "l2"), ("pgd", "l2"), ("pgd", "linf")])
def test_adversarial_offsets_respect_the_epsilon_ball(
    method: str, norm: str, tiny_model_dir: Path, tokenizer
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    settings = schema.AdversarialTrainConfig(method=method, norm=norm, epsilon=0.3, steps=3)
    objective = embedding.AdversarialObjective(TargetTokenLoss(model), settings).train()
    seen: list[torch.Tensor] = []
    model.get_input_embeddings().register_forward_hook(
        lambda _module, _inputs, output: seen.append(output.detach())
    )
    batch = _two_examples(tokenizer)
    sums = objective(**batch)
    assert set(sums) == {"ce", "adversarial_ce"}
    assert sums["adversarial_ce"] > sums["ce"]
    clean, adversarial = seen[0], seen[-1]
    offset = adversarial - clean
    size = offset.norm(dim=-1) if norm == "l2" else offset.abs().amax(dim=-1)
    real = batch["attention_mask"].bool()
    assert (size[real] <= 0.3 + 1e-5).all()
    assert (size[~real] == 0).all()
    if method == "fgm":
        # One full step of length epsilon along the gradient at every real position but the
        # last, which predicts nothing the loss counts (its gradient is zero).
        lengths = batch["attention_mask"].sum(dim=1)
        for row, length in enumerate(lengths.tolist()):
            torch.testing.assert_close(size[row, : length - 1], torch.full((length - 1,), 0.3))
            assert size[row, length - 1] == 0
    # Evaluation is clean: no offset, one forward.
    seen.clear()
    assert set(objective.eval()(**batch)) == {"ce"}
    assert len(seen) == 1


def test_smart_reads_its_clean_logits_from_the_clean_forward(
    tiny_model_dir: Path, tokenizer, monkeypatch
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    settings = schema.AdversarialTrainConfig(method="smart", epsilon=0.3, steps=2)
    objective = embedding.AdversarialObjective(TargetTokenLoss(model), settings).train()
    forwards: list[int] = []
    model.get_decoder().register_forward_hook(lambda *_: forwards.append(1))
    divergences: list[tuple[torch.Tensor, torch.Tensor]] = []
    symmetric_kl = embedding.symmetric_kl
    monkeypatch.setattr(
        embedding,
        "symmetric_kl",
        lambda clean, perturbed: (
            divergences.append((clean, perturbed)) or symmetric_kl(clean, perturbed)
        ),
    )
    batch = _two_examples(tokenizer)
    sums = objective(**batch)
    assert set(sums) == {"ce", "smoothness"}
    assert sums["smoothness"] > 0
    # One clean forward (the task loss's), one per ascent step, one at the final offset.
    assert len(forwards) == 1 + 2 + 1
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    predicting = batch["labels"][:, 1:] != data.IGNORE_INDEX
    for clean, _ in divergences:
        torch.testing.assert_close(clean.detach(), logits[:, :-1][predicting])
    # The final term's clean side keeps its graph: the smoothness trains the clean forward too.
    assert divergences[-1][0].requires_grad


METHODS = {
    "fgm": ["adversarial.train.method=fgm"],
    "pgd": ["adversarial.train.method=pgd", "adversarial.train.norm=linf"],
    "freelb": ["adversarial.train.method=freelb", "adversarial.train.steps=2"],
    "smart": ["adversarial.train.method=smart", "adversarial.train.epsilon=0.5"],
    "neftune": ["adversarial.train.method=null", "adversarial.train.neftune_alpha=5"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_and_the_loss_falls(method: str, tiny_recipe) -> None:
    path = tiny_recipe(f"method-{method}", max_steps=8, lr=5e-3)
    result = train.run(config.load(path, METHODS[method]), path)
    losses = _losses(result.run_dir)
    assert len(losses) == 8
    assert losses[-1] < losses[0]
    term = {"smart": "smoothness_loss", "neftune": "loss"}.get(method, "adversarial_ce_loss")
    assert all(value > 0 for value in _losses(result.run_dir, term))


@pytest.mark.parametrize("weights", ["full", "qlora"])
def test_full_fine_tuning_and_qlora_train_adversarially(weights: str, tiny_recipe) -> None:
    # Gradient checkpointing too: PGD takes gradients of the inputs through checkpointed layers.
    overrides = ["adversarial.train.method=pgd", "model.gradient_checkpointing=true"]
    overrides += ["adapter=null"] if weights == "full" else ["model.quantization=4bit"]
    path = tiny_recipe(f"weights-{weights}", max_steps=6, lr=5e-3)
    result = train.run(config.load(path, overrides), path)
    losses = _losses(result.run_dir)
    assert losses[-1] < losses[0]


def test_accumulation_gives_the_same_adversarial_steps(tiny_recipe) -> None:
    overrides = ["adversarial.train.method=pgd"]
    whole = tiny_recipe("whole", batch_size=8, grad_accumulation=1, max_steps=4)
    split = tiny_recipe("split", batch_size=2, grad_accumulation=4, max_steps=4)
    first = _losses(train.run(config.load(whole, overrides), whole).run_dir)
    second = _losses(train.run(config.load(split, overrides), split).run_dir)
    for a, b in zip(first, second, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)


def _train_on_two_processes(recipe: Path, arguments: list[str]) -> Path:
    """Train `recipe` on two gloo processes through torchrun; returns the run folder."""
    done = torchrun(["train", str(recipe), *arguments])
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    run_dir = recipe.parent / recipe.stem
    assert json.loads((run_dir / run_folder.SUMMARY).read_text())["processes"] == 2
    return run_dir


def test_two_processes_give_the_same_adversarial_steps(tiny_recipe) -> None:
    overrides = ["adversarial.train.method=pgd"]
    single = tiny_recipe("single", batch_size=8, max_steps=3)
    expected = _losses(train.run(config.load(single, overrides), single).run_dir)
    double = _train_on_two_processes(tiny_recipe("double", batch_size=4, max_steps=3), overrides)
    for a, b in zip(expected, _losses(double), strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)


def test_two_processes_resume_exactly(tiny_recipe, same_weights) -> None:
    # Each process draws dropout, NEFTune and FreeLB noise for its own batches, which (padded to
    # their own longest row) differ in size: each must get its own RNG states back.
    overrides = [
        "adversarial.train.method=freelb",
        "adversarial.train.neftune_alpha=5",
        "adapter.dropout=0.1",
        "train.length_bucket=1",
    ]
    straight = _train_on_two_processes(
        tiny_recipe("straight", batch_size=4, max_steps=4, checkpoint={"every": 3}), overrides
    )
    recipe = tiny_recipe("resumed", batch_size=4, max_steps=4, checkpoint={"every": 3})
    run_dir = recipe.parent / recipe.stem
    shutil.copytree(straight, run_dir)
    # What a crash after the step-3 checkpoint leaves: no adapter, an unfinished summary.
    shutil.rmtree(run_dir / run_folder.ADAPTER)
    summary = json.loads((run_dir / run_folder.SUMMARY).read_text())
    (run_dir / run_folder.SUMMARY).write_text(json.dumps(summary | {"status": "interrupted"}))
    (saved,) = checkpoint.complete_checkpoints(run_dir)
    # By step 3 the processes' batches have had different widths, so their states differ.
    first, second = torch.load(saved / checkpoint.RNG_FILE, weights_only=True)
    assert not torch.equal(first["torch"], second["torch"])
    _train_on_two_processes(recipe, [*overrides, "--resume"])
    same_weights(straight / run_folder.ADAPTER, run_dir / run_folder.ADAPTER)


def test_adversarial_training_resumes_exactly(resumes_exactly) -> None:
    overrides = [
        "adversarial.train.method=freelb",
        "adversarial.train.neftune_alpha=5",
        "adapter.dropout=0.1",
    ]
    resumes_exactly("freelb", overrides)


@pytest.mark.parametrize(("method", "norm"), [("fgm", "l2"), ("pgd", "linf")])
def test_a_packed_row_gives_the_padded_sums(
    method: str, norm: str, tiny_model_dir: Path, tokenizer
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    attention.use_training_attention(model, packed=True)
    settings = schema.AdversarialTrainConfig(method=method, norm=norm, epsilon=0.3, steps=2)
    objective = embedding.AdversarialObjective(TargetTokenLoss(model), settings).train()
    examples = [
        data.Example("p", "t", [5, 6, 7, 8, 9, tokenizer.eos_token_id], 3, 0),
        data.Example("p", "t", [5, 6, tokenizer.eos_token_id], 2, 1),
    ]
    expected = objective(**data.collate(examples, tokenizer.pad_token_id, 8))
    actual = objective(**data.collate_packed(examples))
    assert set(actual) == set(expected) == {"ce", "adversarial_ce"}
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=1e-6)


def test_neftune_scales_by_each_examples_own_length(tokenizer) -> None:
    examples = [
        data.Example("p", "t", [5, 6, 7, 8, 9, tokenizer.eos_token_id], 3, 0),
        data.Example("p", "t", [5, 6, tokenizer.eos_token_id], 2, 1),
    ]
    padded = data.collate(examples, tokenizer.pad_token_id, 8)
    packed = data.collate_packed(examples)
    in_rows = embedding.example_lengths(padded["input_ids"], padded["attention_mask"], None)
    assert in_rows.tolist() == [[6] * 6 + [0] * 2, [3] * 3 + [0] * 5]
    in_row = embedding.example_lengths(packed["input_ids"], None, packed["position_ids"])
    assert in_row.tolist() == [[6] * 6 + [3] * 3]
    noise = embedding.neftune_noise(in_rows, 64, 5.0)
    assert (noise[0, 6:] == 0).all()
    assert noise[1, :3].abs().max() <= 5.0 / (3 * 64) ** 0.5


@pytest.mark.parametrize("trained_head", [True, False], ids=["trained head", "frozen head"])
@pytest.mark.parametrize("clean_trains", [True, False], ids=["final term", "ascent step"])
def test_smart_divergence_in_chunks_equals_it_whole(trained_head: bool, clean_trains: bool) -> None:
    # Five pairs of positions, whole and two at a time: the divergence and the gradients of
    # both sides (and of a trained head) agree. An ascent step holds the clean side fixed.
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(trained_head)
    clean_states = torch.randn(5, 8, requires_grad=True)
    perturbed_states = clean_states.detach() + 0.3 * torch.randn(5, 8)
    perturbed_states.requires_grad_(True)
    clean_side = clean_states if clean_trains else clean_states.detach()
    expected = embedding.symmetric_kl(head(clean_side), head(perturbed_states))
    trained = [clean_states, perturbed_states] if clean_trains else [perturbed_states]
    trained += [head.weight] if trained_head else []
    expected_gradients = torch.autograd.grad(expected, trained)
    for chunk_size in (256, 2):
        for tensor in (clean_states, perturbed_states, head.weight):
            tensor.grad = None
        clean_side = clean_states if clean_trains else clean_states.detach()
        value = head_paired_sum(
            head, embedding.symmetric_kl, clean_side, perturbed_states, chunk_size
        )
        value.backward()
        torch.testing.assert_close(value.detach(), expected.detach())
        for tensor, gradient in zip(trained, expected_gradients, strict=True):
            torch.testing.assert_close(tensor.grad, gradient)
        assert clean_trains or clean_states.grad is None
        assert trained_head or head.weight.grad is None
