"""``genai_config.json`` in onnxruntime-genai's format, so its generate() loop can drive the model."""

from __future__ import annotations

from d2quant.qmodel import QuantizedModel

def _token_id(qm: QuantizedModel, key: str):
    value = qm.spec.hf_config.get(key)
    if value is None and qm.tokenizer is not None:
        value = getattr(qm.tokenizer, key, None)
    return value


def genai_config(qm: QuantizedModel, filename: str) -> dict:
    spec = qm.spec
    eos = _token_id(qm, "eos_token_id")
    pad = _token_id(qm, "pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return {
        "model": {
            "bos_token_id": _token_id(qm, "bos_token_id"),
            "context_length": spec.max_positions,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": spec.heads,
                "num_hidden_layers": spec.layers,
                "num_key_value_heads": spec.kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": spec.family.genai_type,
            "vocab_size": spec.vocab,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True,
            "length_penalty": 1.0, "max_length": spec.max_positions, "min_length": 0,
            "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
            # the graph concatenates past and new keys (GQA without a preallocated buffer)
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
