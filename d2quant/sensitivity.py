"""What each weight matrix's quantization error costs the model: what --target-bpw allocates by.

For a matrix t and a candidate grid c:

* its error is ``E_t(c) = sum_j imp_j sum_i (W_ij - Q_ij)^2``, with ``imp_j`` the mean squared input
  of column j on the calibration tokens (diag(H): what an importance matrix holds; uniform for the
  embedding table, which is looked up, not multiplied) and Q the grid's rounding fitted with that
  importance;
* its cost is ``L_t(c) = alpha_t E_t(c)``, with ``alpha_t`` measured, not assumed: the KL divergence
  from the float model when W_t alone is perturbed by Gaussian noise of weighted energy
  ``PROBE_LEVEL x sum_j imp_j sum_i W_ij^2``, per unit of that energy. KL is quadratic in a small
  output perturbation, so, to second order, linear in E, and the probes make the costs of
  different matrices comparable (a matrix whose error the model amplifies gets a large alpha).

The calibrating GPTQ lowers every E by its error feedback; the allocation only needs the costs'
order across matrices and types, which the rounding errors give.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from d2quant.grids import grid_from_spec
from d2quant.solver import single_thread

PROBE_LEVEL = 0.01  # relative weighted energy of the probe noise (a 4-5 bit error's order)


@dataclass
class MatrixCost:
    name: str
    shape: tuple[int, int]
    alpha: float  # KL per unit of weighted error
    errors: dict[str, float]  # candidate label -> E_t

    def loss(self, kind: str) -> float:
        return self.alpha * self.errors[kind]


@torch.no_grad()
def collect_importance(model, tokens: torch.Tensor, batch: int = 8,
                       scope: str = "model.layers.") -> dict[str, torch.Tensor]:
    """Mean squared input per column of every nn.Linear under ``scope`` (what llama-imatrix
    collects with its default scope: the decoder layers). tokens: [n, seqlen] ids."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(mod, inp, out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    model = model.eval()
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith(scope)]
    try:
        for b0 in range(0, tokens.shape[0], batch):
            model(input_ids=tokens[b0:b0 + batch], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: (s / counts[n]).float() for n, s in sums.items()}


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), -1)


class _Replay:
    """The probe tokens' inputs to every decoder layer, captured in one forward, so a perturbed
    matrix of layer i is scored by running layers i.. only: the layers before it compute what they
    did unperturbed (about half the probes' cost)."""

    def __init__(self, model, tokens: torch.Tensor):
        self.model, self.tokens = model, tokens
        self.layers = model.model.layers
        self.inputs: list[tuple[tuple, dict]] = []  # per layer, then the final norm's
        grab = lambda mod, args, kwargs: self.inputs.append((args, kwargs))  # noqa: E731
        handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in (*self.layers, model.model.norm)]
        try:
            self.ref = self.log_probs(None)
        finally:
            for h in handles:
                h.remove()

    def log_probs(self, start: int | None) -> torch.Tensor:
        """Log-probabilities from decoder layer ``start`` on (None: the whole model; the number of
        layers: the head alone)."""
        if start is None:
            return _log_probs(self.model(input_ids=self.tokens, use_cache=False).logits)
        args, kwargs = self.inputs[start]
        h = args[0] if args else kwargs["hidden_states"]
        for j in range(start, len(self.layers)):
            a, kw = self.inputs[j]
            out = self.layers[j](h, *a[1:], **{k: v for k, v in kw.items() if k != "hidden_states"})
            h = out[0] if isinstance(out, tuple) else out
        logits = self.model.lm_head(self.model.model.norm(h))
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return _log_probs(logits)


def _start_layer(name: str, n_layers: int) -> int | None:
    """Where a perturbed matrix's effect starts: its decoder layer; None for the embedding table
    (the whole model runs); ``n_layers`` for an untied lm_head (the head alone)."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return int(parts[2])
    return None if name == "model.embed_tokens" else n_layers


@torch.no_grad()
def kl_alphas(model, tokens: torch.Tensor, importance: dict[str, torch.Tensor], names: list[str],
              seed: int = 0) -> dict[str, float]:
    """alpha_t (module doc) for every matrix in ``names`` on ``tokens`` (a few short windows)."""
    replay = _Replay(model, tokens)
    ref, ref_p = replay.ref, replay.ref.exp()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        w = model.get_submodule(name).weight
        imp = importance.get(name, torch.ones(w.shape[1]))
        energy = float((w.detach().double() ** 2 * imp.double()).sum())
        noise = torch.randn(w.shape, generator=gen)
        noise *= (PROBE_LEVEL * energy / float((noise.double() ** 2 * imp.double()).sum())) ** 0.5
        saved = w.detach().clone()
        w.add_(noise.to(w.dtype))
        try:
            lp = replay.log_probs(_start_layer(name, len(replay.layers)))
        finally:
            w.copy_(saved)
        kl = float((ref_p * (ref - lp)).sum(-1).mean())
        out[name] = max(kl, 1e-12) / (PROBE_LEVEL * energy)
    return out


def weighted_error(w: torch.Tensor, spec: dict, importance: torch.Tensor) -> float:
    """E_t on one grid: the importance-weighted rounding's weighted squared error."""
    grid = grid_from_spec(spec)
    with single_thread():
        codes, params = grid.quantize_matrix(w, importance)
        e = grid.dequantize_matrix(codes, params) - w
    return float(((e.double() ** 2) * importance.double()).sum())


def measure(model, tokens: torch.Tensor, probe_tokens: torch.Tensor,
            candidates: dict[str, dict[str, dict | None]], on_matrix=None,
            alphas: dict[str, float] | None = None) -> dict[str, MatrixCost]:
    """The cost of every candidate for every matrix (a ``None`` spec stands for float: error 0).

    model: the float model (left unchanged). candidates: matrix name -> {label: grid spec}.
    alphas: the probes' result of an earlier measurement on the same tokens, to add candidates to
    it without probing again.
    """
    imp = collect_importance(model, tokens, scope="")
    head = getattr(model, "lm_head", None)
    for name in candidates:
        if name in imp:
            continue
        w = model.get_submodule(name).weight
        if head is not None and head.weight is w:  # a tied table: its cost is that of the output
            imp[name] = imp["lm_head"]
        else:  # an embedding table is looked up, not multiplied: every column alike
            imp[name] = torch.ones(w.shape[1])
    if alphas is None:
        alphas = kl_alphas(model, probe_tokens, imp, list(candidates))
    out = {}
    for i, (name, specs) in enumerate(candidates.items()):
        w = model.get_submodule(name).weight.detach().float()
        errors = {label: 0.0 if s is None else weighted_error(w, s, imp[name]) for label, s in specs.items()}
        out[name] = MatrixCost(name, tuple(w.shape), alphas[name], errors)
        if on_matrix:
            on_matrix(i + 1, len(candidates))
    return out
