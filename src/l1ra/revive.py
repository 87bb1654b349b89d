"""How a revived rank starts: A rows from the module's weight gradient (`new_rank_init="gradient"`) and the grace
period that exempts a new rank from the L1 step (`new_rank_grace`).

Gradient rows. A revived slot has B column 0, so neither its gate nor its A row gets a gradient until B moves, and
B's gradient is `scaling * gate * G a` for the module's weight gradient `G = sum_t delta_t x_t^T`: the unit A row
that gets the largest B gradient is G's top right singular vector. l1ra never forms G (out x in for every module).
During the one optimizer step before a reallocation (`arm`), hooks on each adapter's `lora_A` (its input x, which
autograd keeps for lora_A's own weight gradient anyway) and `lora_B` (the gradient of its output, `scaling * delta`)
accumulate a single-pass randomized sketch of G (Tropp et al., "Practical sketching algorithms for low-rank matrix
approximation", 2017): `Y = G Omega` (out x k) and `W = Phi G` (l x in), with Gaussian test matrices drawn from a
seeded CPU generator (identical on every process). At the reallocation, G ~ Q X with `Q = orth(Y)`,
`X = (Phi Q)^+ W`; the new rows are the top right singular vectors of X with the surviving A rows projected out,
scaled to the norm of a fresh random row. Under several processes the sketches are summed over the default process
group (each process saw its own micro-batches), and the rows are broadcast from rank 0.
Cost: `(in + out) * (k + l)` multiply-adds per token and module, in that one step only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .slots import full, write_slots_

OVERSAMPLE = 8  # sketch columns beyond the adapter's capacity


def _gaussian(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(rows, cols, generator=generator, dtype=torch.float32)


class GradientSketch:
    """Running sketches `Y = G Omega` and `W = Phi G` of one module's weight gradient."""

    def __init__(self, omega: torch.Tensor, phi: torch.Tensor):
        self.omega, self.phi = omega, phi  # (in, k), (l, out); shared by modules of the same shape
        self.y = torch.zeros(phi.shape[1], omega.shape[1], device=omega.device)
        self.w = torch.zeros(phi.shape[0], omega.shape[0], device=omega.device)
        self.seen = False

    @torch.no_grad()
    def add(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """One micro-batch: `x` the module's input (..., in), `g` the gradient of its LoRA output (..., out)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.omega.device, torch.float32)
        g = g.detach().reshape(-1, g.shape[-1]).to(self.omega.device, torch.float32)
        self.y.addmm_(g.T, x @ self.omega)
        self.w.addmm_(self.phi @ g.T, x)
        self.seen = True

    def right_vectors(self) -> Optional[torch.Tensor]:
        """X (k x in) with G ~ Q X: its right singular vectors are G's (within the sketch). None if nothing seen."""
        if not self.seen:
            return None
        y, w, phi = self.y.double().cpu(), self.w.double().cpu(), self.phi.double().cpu()
        q = torch.linalg.qr(y).Q
        return torch.linalg.lstsq(phi @ q, w).solution


class GradientCapture:
    """The hooks and sketches of one armed step, for every adapter of an L1RA model."""

    def __init__(self, st, generator: torch.Generator):
        self.sketches: dict[str, GradientSketch] = {}
        self.handles = []
        self._inputs: dict[str, torch.Tensor] = {}
        shared: dict[tuple, torch.Tensor] = {}
        for name, layer in st.layers:
            a = layer.lora_A[st.adapter]
            b = layer.lora_B[st.adapter]
            k = layer.r[st.adapter] + OVERSAMPLE
            n_in, n_out = a.in_features, b.out_features
            device = a.weight.device if a.weight.device.type != "meta" else torch.device("cpu")
            omega = shared.setdefault(("omega", n_in, k, device), _gaussian(n_in, k, generator).to(device))
            phi = shared.setdefault(("phi", 2 * k + 1, n_out, device), _gaussian(2 * k + 1, n_out, generator).to(device))
            self.sketches[name] = GradientSketch(omega, phi)
            self.handles.append(a.register_forward_hook(self._keep_input(name)))
            self.handles.append(b.register_forward_hook(self._on_output(name)))

    def _keep_input(self, name: str):
        def hook(module, args, output):
            if torch.is_grad_enabled() and args:
                self._inputs[name] = args[0]
        return hook

    def _on_output(self, name: str):
        sketch = self.sketches[name]

        def hook(module, args, output):
            x = self._inputs.pop(name, None)
            if x is not None and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda g: sketch.add(x, g))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._inputs.clear()

    def summed(self) -> dict[str, GradientSketch]:
        """The sketches summed over the processes of the default group (each saw its own micro-batches)."""
        from .distributed import all_reduce_sum

        parts = [t for s in self.sketches.values() for t in (s.y, s.w)]
        seen = torch.tensor([float(s.seen) for s in self.sketches.values()])
        reduced = all_reduce_sum(parts + [seen])
        for i, s in enumerate(self.sketches.values()):
            s.y, s.w, s.seen = reduced[2 * i], reduced[2 * i + 1], bool(reduced[-1][i] > 0)
        return self.sketches


def arm(st, seed: int) -> None:
    """Start sketching every adapter's weight gradient for the coming optimizer step (idempotent)."""
    if getattr(st, "capture", None) is None:
        generator = torch.Generator(device="cpu").manual_seed((seed * 7_919 + st.reallocations) % (2**63))
        st.capture = GradientCapture(st, generator)


def disarm(st) -> Optional[dict[str, GradientSketch]]:
    """Stop sketching; the summed sketches of the armed step (None if none was armed)."""
    capture = getattr(st, "capture", None)
    if capture is None:
        return None
    capture.remove()
    st.capture = None
    return capture.summed()


def fresh_row_norm() -> float:
    """Expected norm of a row drawn like PEFT's default A init (U(-1/sqrt(in), 1/sqrt(in)) per entry): sqrt(1/3)."""
    return math.sqrt(1.0 / 3.0)


@torch.no_grad()
def gradient_rows(sketch: Optional[GradientSketch], kept_rows: torch.Tensor, n: int,
                  fallback: torch.Tensor) -> torch.Tensor:
    """`n` A rows (n x in, fp32, CPU): the top right singular directions of the sketched gradient orthogonal to
    `kept_rows` (the adapter's surviving A rows), then `fallback` rows (random, made orthogonal) where the sketch has
    fewer directions; orthonormal among themselves and to `kept_rows`, scaled to a fresh row's norm."""
    n_in = fallback.shape[1]
    kept = kept_rows.detach().double().cpu()
    basis = torch.linalg.qr(kept.T).Q if kept.numel() else torch.zeros(n_in, 0, dtype=torch.float64)
    candidates = []
    x = sketch.right_vectors() if sketch is not None else None
    if x is not None:
        x = x - (x @ basis) @ basis.T
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        if s.numel() and s[0] > 0:
            candidates.append(vh[s > s[0] * 1e-6][:n])
    candidates.append(fallback.double())
    rows = torch.cat(candidates)
    chosen = []
    for row in rows:  # Gram-Schmidt against the kept rows and the rows chosen so far, in order of preference
        for _ in range(2):
            row = row - basis @ (basis.T @ row)
            for c in chosen:
                row = row - (c @ row) * c
        norm = row.norm()
        if norm > 1e-8:
            chosen.append(row / norm)
        if len(chosen) == n:
            break
    out = torch.stack(chosen) if chosen else torch.zeros(0, n_in, dtype=torch.float64)
    return (out * fresh_row_norm()).float()


# ---------------------------------------------------------------------------------------------------------------
# Grace: new ranks exempt from the L1 step


def start_grace(st, name: str, slots: list[int], grace: int) -> None:
    """Revived `slots` of module `name` skip the L1 step for the next `grace` optimizer steps."""
    if grace > 0 and slots:
        record = st.grace.setdefault(name, {})
        for s in slots:
            record[int(s)] = st.step + grace


def end_grace(st, name: str, slots) -> None:
    record = st.grace.get(name)
    if record:
        for s in slots:
            record.pop(int(s), None)
        if not record:
            del st.grace[name]


def grace_to_json(grace: dict) -> list:
    return [[name, slot, until] for name, record in sorted(grace.items()) for slot, until in sorted(record.items())]


def grace_from_json(items: list) -> dict[str, dict[int, int]]:
    grace: dict[str, dict[int, int]] = {}
    for name, slot, until in items:
        grace.setdefault(name, {})[int(slot)] = int(until)
    return grace


def held_gates(st, step: int) -> list[tuple[torch.Tensor, list[int], torch.Tensor]]:
    """(gate, slots, their values now) for the slots still in grace at optimizer step `step`; forgets ended ones."""
    gates = st.gates()
    held = []
    for name in list(st.grace):
        record = {s: until for s, until in st.grace[name].items() if until >= step}
        if not record:
            del st.grace[name]
            continue
        st.grace[name] = record
        slots = sorted(record)
        gate = gates[name]
        held.append((gate, slots, full(gate)[slots].clone()))
    return held


@torch.no_grad()
def restore_held(held) -> None:
    """Put back the held slots' gate values (after the proximal step), inside the box [0, 1]."""
    for gate, slots, values in held:
        write_slots_(gate, 0, slots, values.clamp(0.0, 1.0))
