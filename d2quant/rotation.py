"""Offline block-Hadamard rotation of the residual stream (a pure weight transform).

RMSNorm weights are first fused into the linears that read the norm (norm weights become 1), so
the norm commutes with any orthogonal Q: norm(Qx) = Q norm(x). With x' = Q x: embeddings E' = E Q^T,
readers W' = W Q^T, writers W' = Q W. Rotation spreads outlier channels, which makes low-bit grids
fit better. The final norm's weight is fused into lm_head, so a tied lm_head must be untied.
"""

from __future__ import annotations

import torch

from d2quant.errors import D2Error
from d2quant.families import family_of_hf


def hadamard(n: int) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix of order n (a power of two)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / h.shape[0] ** 0.5


def block_size(hidden: int) -> int:
    """The largest power of two <= 128 that divides the hidden size."""
    b = 128
    while b > 1 and hidden % b:
        b //= 2
    if b < 8:
        raise D2Error(f"hidden size {hidden} has no power-of-two block >= 8 for rotation; use --no-rotate")
    return b


def _rotation(hidden: int) -> torch.Tensor:
    b = block_size(hidden)
    return torch.block_diag(*[hadamard(b)] * (hidden // b))


def _family(model):
    fam = family_of_hf(model.config.architectures or [], model.config.model_type)
    if not fam.rotation:
        raise D2Error(f"rotation does not apply to {fam.name}: its norms do not commute with a "
                      "rotation of the residual stream; use --no-rotate")
    return fam


def _readers(fam, layer) -> list[tuple[torch.nn.Module, list[torch.nn.Module]]]:
    """(norm, the linears reading its output) of a decoder layer."""
    return [(layer.get_submodule(fam.attn_norm), [layer.get_submodule(lin.path) for lin in fam.qkv]),
            (layer.get_submodule(fam.mlp_norm), [layer.get_submodule(lin.path) for lin in fam.gate_up])]


@torch.no_grad()
def fuse_norms(model) -> None:
    """Scale the reader linears' input columns by the preceding RMSNorm weight; set that weight to 1."""
    fam, inner = _family(model), model.model
    for layer in inner.layers:
        for norm, readers in _readers(fam, layer):
            for lin in readers:
                lin.weight.mul_(norm.weight.double().to(lin.weight.dtype)[None, :])
            norm.weight.fill_(1.0)
    head = model.lm_head
    if head.weight is inner.embed_tokens.weight or model.config.tie_word_embeddings:
        head.weight = torch.nn.Parameter(inner.embed_tokens.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    head.weight.mul_(inner.norm.weight[None, :])
    inner.norm.weight.fill_(1.0)


@torch.no_grad()
def rotate(model) -> int:
    """Fuse norms and rotate the residual stream in place; returns the Hadamard block size."""
    fuse_norms(model)
    fam, inner = _family(model), model.model
    q = _rotation(inner.embed_tokens.weight.shape[1])

    def read(lin):  # W' = W Q^T
        lin.weight.copy_((lin.weight.double() @ q.T).to(lin.weight.dtype))

    def write(lin):  # W' = Q W, b' = Q b
        lin.weight.copy_((q @ lin.weight.double()).to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.copy_((q @ lin.bias.double()).to(lin.bias.dtype))

    emb = inner.embed_tokens.weight
    emb.copy_((emb.double() @ q.T).to(emb.dtype))
    for layer in inner.layers:
        for _, readers in _readers(fam, layer):
            for lin in readers:
                read(lin)
        write(layer.get_submodule(fam.o.path))
        write(layer.get_submodule(fam.down.path))
    read(model.lm_head)
    return block_size(emb.shape[1])
