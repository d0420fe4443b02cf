"""The `--arch` notation, the parameter count (equation 1) and the width solver (equation 2).

An architecture is a list of hidden blocks `depth*width`: "[2*128, 4*64]" is two hidden layers
of 128 neurons followed by four of 64. "[]" has no hidden layer (logistic regression).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from importlib import resources

N_IN = 784
N_OUT = 10

# Bounds that keep a typo from asking for terabytes: the study's largest net has 1.6M
# parameters and its deepest 2048 layers.
MAX_WIDTH = 1 << 20
MAX_LAYERS = 100_000
MAX_PARAMS = 1 << 31


class ArchError(ValueError):
    """An architecture string that cannot be parsed or describes an absurd network."""


@dataclass(frozen=True)
class Arch:
    """A SimpleMLP shape: the widths of its hidden layers, in order, plus the I/O sizes."""

    blocks: tuple[tuple[int, int], ...]  # (depth, width) as written
    n_in: int = N_IN
    n_out: int = N_OUT

    @property
    def hidden(self) -> tuple[int, ...]:
        """Width of every hidden layer, first to last."""
        return tuple(w for depth, w in self.blocks for _ in range(depth))

    @property
    def depth(self) -> int:
        """Number of hidden layers."""
        return sum(d for d, _ in self.blocks)

    @property
    def widths(self) -> tuple[int, ...]:
        """Input size, every hidden width, output size: layer i maps widths[i] -> widths[i+1]."""
        return (self.n_in, *self.hidden, self.n_out)

    @property
    def n_linear(self) -> int:
        """Number of Linear layers (hidden layers plus the output head)."""
        return self.depth + 1

    @property
    def params(self) -> int:
        """Trainable parameters, equation (1)."""
        return param_count(self.hidden, self.n_in, self.n_out)

    @property
    def is_homogeneous(self) -> bool:
        """True for the study's L*W shapes (one block, or none)."""
        return len(self.blocks) <= 1

    def __str__(self) -> str:
        return "[" + ", ".join(f"{d}*{w}" for d, w in self.blocks) + "]"

    @property
    def short(self) -> str:
        """The study's spelling: "18*18" for one block, the bracketed form otherwise."""
        if len(self.blocks) == 1:
            d, w = self.blocks[0]
            return f"{d}*{w}"
        return str(self)

    def flops_per_sample(self) -> int:
        """Multiply-adds x 2 of one forward pass for one image."""
        w = self.widths
        return sum(2 * a * b for a, b in zip(w[:-1], w[1:]))

    def layer_table(self) -> list[tuple[str, int, int, int]]:
        """Rows (name, in, out, parameters) for every Linear layer."""
        w = self.widths
        rows = []
        for i, (a, b) in enumerate(zip(w[:-1], w[1:])):
            name = f"hidden {i + 1}" if i < self.depth else "output"
            rows.append((name, a, b, b * (a + 1)))
        return rows


_BLOCK = re.compile(r"^(\d+)\s*[*xX×]\s*(\d+)$")


def parse_arch(text: str, n_in: int = N_IN, n_out: int = N_OUT) -> Arch:
    """Parse "[2*128, 4*64]" (brackets optional, `x` for `*`, spaces anywhere) into an Arch."""
    if not isinstance(text, str):
        raise ArchError(f"architecture must be a string, got {type(text).__name__}")
    s = text.strip()
    if not s:
        raise ArchError("empty architecture; write [] for a net without hidden layers")
    opens, closes = s.startswith("["), s.endswith("]")
    pairs = s.count("[")
    if pairs > 1 and pairs == s.count("]"):
        raise ArchError(f"one pair of brackets per architecture: {text!r} has {pairs} (write [1*128, 2*64] "
                        f"for one net of several blocks)")
    if opens != closes or pairs != int(opens) or s.count("]") != int(closes):
        raise ArchError(f"unbalanced brackets in architecture {text!r}")
    body = s[1:-1].strip() if opens else s
    if not body:
        return Arch((), n_in, n_out)
    blocks = []
    for part in body.split(","):
        m = _BLOCK.match(part.strip())
        if not m:
            raise ArchError(
                f"bad block {part.strip()!r} in architecture {text!r}: expected DEPTH*WIDTH, e.g. 2*128"
            )
        if len(m.group(1)) > 7 or len(m.group(2)) > 8:
            raise ArchError(f"block {part.strip()!r} is absurdly large")
        depth, width = int(m.group(1)), int(m.group(2))
        if depth < 1 or width < 1:
            raise ArchError(f"block {part.strip()!r}: depth and width must be at least 1")
        if width > MAX_WIDTH:
            raise ArchError(f"block {part.strip()!r}: width {width} exceeds {MAX_WIDTH}")
        blocks.append((depth, width))
    total_depth = sum(d for d, _ in blocks)
    if total_depth > MAX_LAYERS:
        raise ArchError(f"architecture {text!r} has {total_depth} layers (limit {MAX_LAYERS})")
    arch = Arch(tuple(blocks), n_in, n_out)
    if arch.params > MAX_PARAMS:
        raise ArchError(f"architecture {text!r} has {arch.params:,} parameters (limit {MAX_PARAMS:,})")
    return arch


def param_count(hidden: tuple[int, ...] | list[int], n_in: int = N_IN, n_out: int = N_OUT) -> int:
    """Equation (1): H1(N_in+1) + sum H_{i+1}(H_i+1) + N_out(H_L+1)."""
    sizes = [n_in, *hidden]
    return sum(b * (a + 1) for a, b in zip(sizes, [*hidden, n_out]))


def solve_width(target_params: int, depth: int, n_in: int = N_IN, n_out: int = N_OUT) -> float:
    """Equation (2), generalised: the width W of a depth*W net with `target_params` parameters.

    For depth L the count is (L-1) W^2 + (n_in + n_out + L) W + n_out, a quadratic in W
    (linear for L = 1). With the paper's sizes n_in + n_out = 794, exactly equation (2).
    """
    if depth < 1:
        raise ArchError("depth must be at least 1")
    lin = n_in + n_out + depth
    if depth == 1:
        return (target_params - n_out) / lin
    a = depth - 1
    return (-lin + math.sqrt(lin * lin + 4 * a * (target_params - n_out))) / (2 * a)


def matched_arch(reference: Arch, depth: int) -> Arch:
    """The depth*W net whose parameter count is closest to `reference`'s."""
    guess = max(1, round(solve_width(reference.params, depth, reference.n_in, reference.n_out)))
    candidates = [w for w in (guess - 1, guess, guess + 1) if w >= 1]
    best = min(candidates,
               key=lambda w: abs(param_count([w] * depth, reference.n_in, reference.n_out) - reference.params))
    return Arch(((depth, best),), reference.n_in, reference.n_out)


def study_architectures() -> list[Arch]:
    """The 98 architectures of the paper's study, in the authors' order."""
    text = resources.files("psa").joinpath("resources/study_architectures.txt").read_text()
    return [parse_arch(line) for line in text.split() if line.strip()]


def study_matching() -> dict[str, str]:
    """Table IV's 'Matched'/'Asymmetric' label of each study architecture.

    The paper prints 59 rows; the other 39 (4*W, W*4, squares 9..32) are labelled from its
    text: 4*W nets were solved against 1*W nets, the rest are mirrors or fill-in squares.
    """
    text = resources.files("psa").joinpath("resources/table_iv.csv").read_text()
    rows = [line.split(",") for line in text.strip().splitlines()[1:]]
    return {r[0]: r[2] for r in rows}


def is_parameter_matched(arch: Arch) -> bool:
    """Table IV's label for a study architecture; for any other shape, whether equation (2)
    solved against one of the study's 1*W nets (W >= 4) gives exactly this depth*width."""
    label = study_matching().get(arch.short)
    if label is not None:
        return label == "Matched"
    if not arch.is_homogeneous or not arch.blocks:
        return False
    depth, width = arch.blocks[0]
    if depth > width:
        return False
    if depth == 1:
        return width >= 4
    refs = [a for a in study_architectures() if a.blocks[0][0] == 1 and a.blocks[0][1] >= 4]
    return any(matched_arch(ref, depth).blocks[0][1] == width for ref in refs)
