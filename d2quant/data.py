"""Calibration tokens: from a text file, a folder of .txt files, the model itself, or a HF dataset."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from d2quant.errors import D2Error


def wikitext_dir() -> Path:
    """wikitext-2 as the project's data lives beside the checkout (../shared/data), or where
    $D2EXPORT_DATA points (a copy carried to another machine)."""
    root = os.environ.get("D2EXPORT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(root) / "wikitext-2"


@dataclass
class CalibConfig:
    calib: str = "self"  # path | "self" | "hf:NAME[:CONFIG[:SPLIT]]"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self):
        if self.nsamples < 1 or self.seqlen < 16:
            raise D2Error(f"need --nsamples >= 1 and --seqlen >= 16, got {self.nsamples}, {self.seqlen}")


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


@torch.no_grad()
def self_generated(model, tokenizer, cfg: CalibConfig, device: torch.device, batch: int = 32) -> torch.Tensor:
    """Text sampled from the model itself (seeded): calibration that needs no data and no network.

    Each sample starts from BOS and one uniformly drawn token, so samples spread over topics instead
    of all continuing the same most-likely opening.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    vocab = model.config.vocab_size
    special = set(getattr(tokenizer, "all_special_ids", []))
    out = []
    for b0 in range(0, cfg.nsamples, batch):
        n = min(batch, cfg.nsamples - b0)
        first = torch.randint(0, vocab, (n, 1), generator=g)
        first = torch.where(torch.isin(first, torch.tensor(sorted(special) or [-1])), first.new_tensor(bos), first)
        ids = torch.cat([torch.full((n, 1), bos), first], 1).to(device)
        torch.manual_seed(cfg.seed + b0)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                             top_p=1.0, temperature=1.0, max_length=cfg.seqlen, min_length=cfg.seqlen,
                             pad_token_id=bos, use_cache=True)
        out.append(gen[:, :cfg.seqlen].cpu())
    return torch.cat(out)


def calibration_tokens(cfg: CalibConfig, model, tokenizer, device: torch.device) -> torch.Tensor:
    """[nsamples, seqlen] token ids."""
    if cfg.calib == "self":
        return self_generated(model.to(device), tokenizer, cfg, device)
    if cfg.calib.startswith("hf:"):
        return _windows(tokenize(tokenizer, _hf_dataset_text(cfg.calib)), cfg, cfg.calib)
    return _windows(tokenize(tokenizer, read_text(cfg.calib)), cfg, cfg.calib)
