"""Calibration tokens: from a text file, a folder of .txt files, the model itself, or a HF dataset."""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from d2quant.cpu import has_amx, native_matmul_dtype
from d2quant.errors import D2Error


def wikitext_dir() -> Path:
    """wikitext-2 as the project's data lives beside the checkout (../shared/data), or where
    $D2EXPORT_DATA points (a copy carried to another machine)."""
    root = os.environ.get("D2EXPORT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(root) / "wikitext-2"


GENERATED = ("self", "self-chat")


def mixture_sizes(nsamples: int, parts: int) -> list[int]:
    """Samples per source of a mixture: as equal as they divide, the earlier sources first."""
    return [nsamples // parts + (i < nsamples % parts) for i in range(parts)]


@dataclass
class CalibConfig:
    # path | "self" | "self-chat" | "hf:NAME[:CONFIG[:SPLIT]]", or several joined by "+" (a mixture:
    # the samples split evenly across them, e.g. "notes.txt+self-chat")
    calib: str = "self"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0

    @property
    def sources(self) -> list[str]:
        return [self.calib] if Path(self.calib).exists() else self.calib.split("+")

    @property
    def generated(self) -> bool:
        """The model writes (some of) this calibration text itself (by ``generator_id``)."""
        return any(part in GENERATED for part in self.sources)

    def __post_init__(self):
        if self.nsamples < 1 or self.seqlen < 16:
            raise D2Error(f"need --nsamples >= 1 and --seqlen >= 16, got {self.nsamples}, {self.seqlen}")
        parts = self.sources
        if not all(parts):
            raise D2Error(f"--calib {self.calib!r} has an empty part; join sources with a single '+' "
                          "(e.g. notes.txt+self-chat)")
        for part in parts:  # before any model is loaded or any text generated
            if part not in GENERATED and not part.startswith("hf:") and not Path(part).exists():
                raise D2Error(f"calibration text {part} does not exist; pass a .txt file, a folder of them, "
                              "'self', 'self-chat', hf:NAME, or a mixture A+B of those")
        if len(parts) > self.nsamples:
            raise D2Error(f"--calib mixes {len(parts)} sources but --nsamples is {self.nsamples}; "
                          "give at least one sample per source")


def read_text(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise D2Error(f"calibration folder {p} holds no .txt files")
        return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    if not p.is_file():
        raise D2Error(f"text file {p} does not exist; pass a .txt file, a folder of them, or 'self'")
    return p.read_text(encoding="utf-8", errors="replace")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _windows(ids: torch.Tensor, cfg: CalibConfig, what: str) -> torch.Tensor:
    if ids.numel() < cfg.seqlen:
        raise D2Error(f"calibration text {what} has {ids.numel()} tokens, fewer than one sample of "
                      f"--seqlen {cfg.seqlen}; give more text or a smaller --seqlen")
    g = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, ids.numel() - cfg.seqlen + 1, (cfg.nsamples,), generator=g)
    return torch.stack([ids[s:s + cfg.seqlen] for s in starts.tolist()])


def _hf_dataset_text(spec: str) -> str:
    parts = spec.split(":")[1:]
    name, config, split = parts[0], (parts[1] if len(parts) > 1 else None), \
        (parts[2] if len(parts) > 2 else "train")
    try:
        import datasets
    except ImportError:
        raise D2Error("--calib hf:... needs the `datasets` package: pip install datasets")
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise D2Error(f"cannot load dataset {name!r} ({type(e).__name__}); it needs network access "
                      "to the Hugging Face hub — offline, pass a text file or 'self'")
    col = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(str(t) for t in ds[col][:20000])


# What the model's own calibration text is made by; a cache of generated text names it with the
# dtype and attention kernel (generator_id). 2: a KV-cached decode loop, inverse-CDF draws; 1 was
# float32 with transformers' generate.
GENERATOR_VERSION = 2


def sampling_dtype(device: torch.device) -> torch.dtype:
    """What the model samples its own text in: bfloat16 where its matmuls are native, float32 where
    torch would emulate them (cpu.native_matmul_dtype). On an AVX2-only CPU SmolLM2's 32 x 512
    tokens took 418 s in bfloat16 and take 114 s in float32 (BENCHMARKS.md)."""
    return getattr(torch, native_matmul_dtype(device))


def sampling_attention(device: torch.device) -> str:
    """The attention kernel the model samples its own text with, by where it runs. Measured per
    decode step of 32 rows x 9 heads, one query over 500 keys (bench/cpu_speed.py attention): in
    bfloat16 on a CPU with AMX tiles torch's SDPA takes 1.41 ms and the eager matmuls 6.29 ms; on
    AVX-512 BF16 without AMX SDPA is 4x slower than eager, so the grouped eager runs there; in
    float32 on an AVX2-only CPU both take 1.5 ms, and SmolLM2's 32 x 512 tokens 114 s with SDPA
    against 119 s with the grouped eager; on CUDA, SDPA
    (transformers' default there; not measured here). A rule by the hardware, not a race timed at
    run time: the kernels round differently, so the text, and with it the file, would otherwise
    depend on the machine's load."""
    bf16_without_amx = device.type == "cpu" and sampling_dtype(device) == torch.bfloat16 and not has_amx()
    return "eager" if bf16_without_amx else "sdpa"


def generator_id(device: torch.device) -> str:
    """What wrote self-generated text on ``device``: the generator's version, its attention kernel,
    and its dtype where that is not bfloat16 (the ids of bfloat16 text predate the choice)."""
    dtype = "" if sampling_dtype(device) == torch.bfloat16 else "-float32"
    return f"{GENERATOR_VERSION}-{sampling_attention(device)}{dtype}"


def _grouped_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """transformers' eager attention (every family's: scale, optional softcap, additive mask, float32
    softmax cast back, then the values) with each key/value head read by its group of query heads
    where eager first copies it once per query head (repeat_kv), the whole KV cache at every decode
    step. In bfloat16, as sampling runs, the same numbers: the sampled tokens are identical
    (tests/test_calib_data.py; SmolLM2's 32 x 512). Decode steps of SmolLM2's 32 rows x 9 heads over
    500 keys: 13 ms eager, 0.5 ms so."""
    b, h, q, d = query.shape
    kvh = key.shape[1]
    g = h // kvh
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    # the cache's keys are a view of a longer buffer: transposed so, the matmul takes a slow path
    w = (torch.matmul(query.reshape(b, kvh, g * q, d), key.contiguous().transpose(2, 3)) * scaling)
    w = w.view(b, kvh, g, q, -1)
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if attention_mask is not None:  # [b, 1 or h, q, keys]
        w = w + attention_mask.reshape(b, -1, 1 if attention_mask.shape[1] == 1 else g, q, attention_mask.shape[-1])
    w = torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    out = torch.matmul(w.view(b, kvh, g * q, -1), value).view(b, h, q, d)
    return out.transpose(1, 2).contiguous(), w.view(b, h, q, -1)


GROUPED_EAGER = "d2export_eager"
AttentionInterface.register(GROUPED_EAGER, _grouped_eager)
AttentionMaskInterface.register(GROUPED_EAGER, eager_mask)  # eager's additive masks, not SDPA's


@contextmanager
def sampling_precision(model, device: torch.device):
    """The model in ``sampling_dtype`` with ``sampling_attention``'s kernel while it writes its own
    calibration text (its float32 parameters and attention kernel restored exactly after).

    On SmolLM2, 32 x 512 tokens on 2 AMD cores with AVX-512 BF16: 186 s in float32 with SDPA, 109 s
    in bfloat16 (its lm_head: 11.6 vs 41 ms per step of 32 rows). The text is still the model's
    own, sampled from slightly rounded logits."""
    kept = [(p, p.data) for p in model.parameters()]
    attention = model.config._attn_implementation
    dtype = sampling_dtype(device)
    try:
        for p, data in kept:
            p.data = data.to(dtype)
        kernel = sampling_attention(device)
        model.set_attn_implementation(GROUPED_EAGER if kernel == "eager" else kernel)
        yield model
    finally:
        for p, data in kept:
            p.data = data
        model.set_attn_implementation(attention)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def _cache_keyword(model) -> str:
    """transformers renamed forward's ``past_key_values`` to ``cache`` (5.2x); ask the model."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _draw(logits: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits) by inverse CDF: one uniform per row (torch.multinomial
    draws an exponential per vocabulary entry: 36 ms per step for 32 x 49152 here)."""
    c = torch.softmax(logits.float(), -1).cumsum(-1)
    u = torch.rand(c.shape[0], 1, generator=g, device=c.device) * c[:, -1:]
    # right: a zero-probability token (an equal cumulative step) is never the first c > u
    return torch.searchsorted(c, u, right=True).clamp(max=c.shape[1] - 1)


class _FilledInPlace(DynamicLayer):
    """A KV-cache layer written into a buffer of the final length: transformers' DynamicLayer grows
    by torch.cat, copying the whole cache every step (15 of 80 s of SmolLM2's 32 x 512 tokens). The
    attention reads the filled part as a view of the same values: the same sampled tokens."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            b, h, _, _ = key_states.shape
            self._k = key_states.new_empty(b, h, self.capacity, key_states.shape[-1])
            self._v = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
            self._n = 0
        n = self._n + key_states.shape[-2]
        self._k[:, :, self._n:n] = key_states
        self._v[:, :, self._n:n] = value_states
        self._n = n
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]
        return self.keys, self.values


def _kv_cache(model, capacity: int) -> DynamicCache:
    """A cache for ``capacity`` tokens; layers of another kind (sliding windows) stay transformers'."""
    cache = DynamicCache(config=model.config)
    cache.layers = [_FilledInPlace(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@torch.no_grad()
def self_generated(model, tokenizer, cfg: CalibConfig, device: torch.device, batch: int = 32) -> torch.Tensor:
    """Text sampled from the model itself (seeded): calibration that needs no data and no network.

    Each sample starts from BOS and one uniformly drawn token, so samples spread over topics instead
    of all continuing the same most-likely opening. Temperature 1, no top-k/top-p, end-of-text never
    drawn (every sample is ``seqlen`` tokens of text); a batch decodes together with a KV cache.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    vocab = model.config.vocab_size
    special = set(getattr(tokenizer, "all_special_ids", []))
    eos = torch.tensor(_eos_ids(model, tokenizer), dtype=torch.long, device=device)
    out = []
    for b0 in range(0, cfg.nsamples, batch):
        n = min(batch, cfg.nsamples - b0)
        first = torch.randint(0, vocab, (n, 1), generator=g)
        first = torch.where(torch.isin(first, torch.tensor(sorted(special) or [-1])), first.new_tensor(bos), first)
        ids = torch.cat([torch.full((n, 1), bos), first], 1).to(device)
        gb = torch.Generator(device=device).manual_seed(cfg.seed + b0)
        kv = {_cache_keyword(model): _kv_cache(model, cfg.seqlen)}  # filled in place
        step = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kv)
        banned = eos[eos < step.logits.shape[-1]]
        rows = [ids]
        for t in range(ids.shape[1], cfg.seqlen):
            logits = step.logits[:, -1].float()
            logits[:, banned] = float("-inf")
            rows.append(_draw(logits, gb))
            if t + 1 < cfg.seqlen:
                step = model(input_ids=rows[-1], use_cache=True, **kv)
        out.append(torch.cat(rows, 1).cpu())
    return torch.cat(out)


# Requests across what users ask a small model about; the model's own answers are calibration text
# of the kind it produces for them (fixed, so self-calibration stays reproducible).
CHAT_PROMPTS = (
    "Explain how vaccines train the immune system.", "Write a short story about a lighthouse keeper.",
    "What caused the fall of the Roman Empire?", "Write a Python function that merges two sorted lists.",
    "Give me a recipe for a vegetable curry.", "How does a bill become a law in the United States?",
    "Summarize the plot of Hamlet.", "What is the difference between weather and climate?",
    "Write an email asking my landlord to fix the heating.", "Explain recursion to a beginner programmer.",
    "What are the health benefits of regular exercise?", "Describe the water cycle.",
    "Write a SQL query that finds the top five customers by revenue.", "How do I change a flat tire?",
    "What is inflation and why does it happen?", "Write a poem about autumn in the city.",
    "Explain the theory of evolution by natural selection.", "Plan a three-day trip to Kyoto.",
    "How does a neural network learn?", "What should I consider when buying a used car?",
    "Explain the causes of the First World War.", "Write a bash script that backs up a folder.",
    "How do solar panels produce electricity?", "Give tips for a successful job interview.",
    "What is the Pythagorean theorem? Give an example.", "Describe the life cycle of a star.",
    "Write a dialogue between a customer and a barista.", "How does the stock market work?",
    "Explain what an API is with an example.", "What are good habits for better sleep?",
    "Translate 'good morning, how are you?' into French and Spanish and explain the grammar.",
    "Write a product description for a waterproof hiking backpack.",
)
CHAT_TEMPERATURES = (0.7, 1.0)


def _chat_ids(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                                  add_generation_prompt=True, return_dict=False))
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


@torch.no_grad()
def chat_generated(model, tokenizer, cfg: CalibConfig, device: torch.device, batch: int = 16) -> torch.Tensor:
    """The model's answers to CHAT_PROMPTS (through its chat template) sampled at CHAT_TEMPERATURES,
    prompt and answer together cut to ``seqlen`` tokens: the text a user's conversations produce."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows: dict[int, torch.Tensor] = {}
    for t_i, temperature in enumerate(CHAT_TEMPERATURES):
        todo = list(range(t_i, cfg.nsamples, len(CHAT_TEMPERATURES)))
        for b0 in range(0, len(todo), batch):
            idx = todo[b0:b0 + batch]
            prompts = [_chat_ids(tokenizer, CHAT_PROMPTS[(cfg.seed + i) % len(CHAT_PROMPTS)])[:cfg.seqlen // 2]
                       for i in idx]
            width = max(map(len, prompts))  # left-padded, as generation continues on the right
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            new = cfg.seqlen - min(map(len, prompts))
            torch.manual_seed(cfg.seed * 7919 + t_i * 104729 + b0)
            gen = model.generate(ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                                 temperature=temperature, max_new_tokens=new, min_new_tokens=new,
                                 pad_token_id=pad, use_cache=True).cpu()
            for row, i, p in zip(gen, idx, prompts):
                rows[i] = row[width - len(p):][:cfg.seqlen]
    return torch.stack([rows[i] for i in range(cfg.nsamples)])


def calibration_tokens(cfg: CalibConfig, model, tokenizer, device: torch.device) -> torch.Tensor:
    """[nsamples, seqlen] token ids; a mixture's sources in their order, each as if given alone."""
    parts = cfg.sources
    if len(parts) > 1:
        return torch.cat([calibration_tokens(CalibConfig(part, n, cfg.seqlen, cfg.seed), model, tokenizer, device)
                          for part, n in zip(parts, mixture_sizes(cfg.nsamples, len(parts)))])
    if cfg.generated:
        generate = self_generated if cfg.calib == "self" else chat_generated
        with sampling_precision(model.to(device), device):
            return generate(model, tokenizer, cfg, device)
    if cfg.calib.startswith("hf:"):
        return _windows(tokenize(tokenizer, _hf_dataset_text(cfg.calib)), cfg, cfg.calib)
    return _windows(tokenize(tokenizer, read_text(cfg.calib)), cfg, cfg.calib)
