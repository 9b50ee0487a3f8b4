"""A Llama model as one GGUF file, for llama.cpp-style runtimes, written with the `gguf` package.

The weights go in under llama.cpp's tensor names (the `gguf` package's own name map), the
query and key projections with their rows reordered for llama.cpp's rotary layout, norms in
float32 and every matrix in the asked type (quantised by the `gguf` package's numpy kernels).
The tokenizer goes in as llama.cpp reads byte-level BPE ("gpt2"): tokens, their types, merges,
special token ids and the chat template. Tensors are converted and written one at a time, so
memory holds the model once, not twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from llama_tune.errors import UserError

TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (gguf.GGMLQuantizationType.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (gguf.GGMLQuantizationType.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
"""The types `--gguf` offers: those the `gguf` package can write (the k-quants it only reads)."""


class GGUFError(UserError):
    """A model or tokenizer that llama-tune cannot write as GGUF."""


def check(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse, before anything is written, what this writer would get wrong: another
    architecture, rotary scaling (llama.cpp needs extra tensors for it) or a tokenizer that is
    not byte-level BPE (Llama 3, SmolLM; Llama 2's SentencePiece is not)."""
    if config.model_type != "llama":
        raise GGUFError(f"--gguf writes Llama models; this model is {config.model_type!r}")
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type != "default":
        raise GGUFError(
            f"--gguf: the model's rope_parameters use rope_type {rope_type!r}; only unscaled "
            "rotary embeddings are written (export without --gguf)"
        )
    if not _byte_level_bpe(tokenizer):
        raise GGUFError(
            "--gguf writes byte-level BPE tokenizers (Llama 3, SmolLM); this tokenizer is "
            f"{type(tokenizer).__name__} (export without --gguf)"
        )


def _byte_level_bpe(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    model, decoder = backend.model, backend.decoder
    return (
        type(model).__name__ == "BPE"
        and not model.byte_fallback
        and type(decoder).__name__ == "ByteLevel"
    )


def write(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_folder: Path,
    path: Path,
    gguf_type: str,
    pre_tokenizer: str | None,
) -> None:
    """Write `model` (float32 weights) and `tokenizer`, saved in `tokenizer_folder`, to `path`.

    `pre_tokenizer` is llama.cpp's name for how text is split before BPE (`tokenizer.ggml.pre`);
    without it llama.cpp falls back to its default split and says so when loading.
    """
    tensor_type, file_type = TYPES[gguf_type]
    config = model.config
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_hyperparameters(writer, config, path.stem, file_type)
    _add_tokenizer(writer, tokenizer, tokenizer_folder, config.vocab_size, pre_tokenizer)
    tensors = list(_named_tensors(model))
    for name, weight in tensors:
        kind = _tensor_type(weight, tensor_type)
        shape = gguf.quant_shape_to_byte_shape(weight.shape, kind)
        writer.add_tensor_info(name, shape, np.dtype(np.uint8), int(np.prod(shape)), kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _name, weight in tensors:
        array = weight.detach().to("cpu", torch.float32).numpy()
        writer.write_tensor_data(gguf.quants.quantize(array, _tensor_type(weight, tensor_type)))
    writer.close()


def _tensor_type(
    weight: torch.Tensor, asked: gguf.GGMLQuantizationType
) -> gguf.GGMLQuantizationType:
    """llama.cpp keeps vectors (norms) in float32; a matrix whose rows do not split into the
    type's blocks is written in float16 instead."""
    if weight.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[asked]
    return asked if weight.shape[-1] % block_size == 0 else gguf.GGMLQuantizationType.F16


def _add_hyperparameters(
    writer: gguf.GGUFWriter, config: PretrainedConfig, name: str, file_type: int
) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(
    writer: gguf.GGUFWriter,
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_folder: Path,
    vocab_size: int,
    pre_tokenizer: str | None,
) -> None:
    """Tokens by id (byte-level strings, as the BPE vocabulary spells them), added special
    tokens marked as control tokens, embedding rows beyond the tokenizer as unused padding;
    merges, special ids and the chat template from the saved tokenizer files."""
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for token_id in range(vocab_size):
        if token_id >= len(tokenizer):
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(tokenizer.convert_ids_to_tokens(token_id))
        if token_id not in added:
            types.append(gguf.TokenType.NORMAL)
        else:
            special = added[token_id].special
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    if pre_tokenizer is not None:
        writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(
        writer, quiet=True
    )


def _named_tensors(model: PreTrainedModel) -> Iterator[tuple[str, torch.Tensor]]:
    """Each weight under its llama.cpp name; a tied output head is not written twice."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = config.tie_word_embeddings
    for hf_name, weight in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFError(f"--gguf: no llama.cpp name for the weight {hf_name}")
        if hf_name.endswith("self_attn.q_proj.weight"):
            weight = _rotary_rows(weight, config.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            weight = _rotary_rows(weight, config.num_key_value_heads)
        yield name, weight


def _rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder a query or key projection's rows for llama.cpp's rotary layout.

    Transformers rotates each head's first half of dimensions against its second half;
    llama.cpp rotates neighbouring pairs. Interleaving the two halves of each head's rows makes
    llama.cpp's pairs the pairs transformers rotates together.
    """
    rows, columns = weight.shape
    halves = weight.reshape(heads, 2, rows // heads // 2, columns)
    return halves.transpose(1, 2).reshape(rows, columns)
