"""The channel rule for ``torch.einsum``: the tracked axis keeps its letter.

A letter that reaches the output carries the channels there (MaxViT's heads in
``"B G H I D, B G H J D -> B G H I J"``); every operand spelling it either carries the same
channels, broadcasts along it, or is a parameter sliced with them. A letter summed away carries
them into a parameter that reads them, as a Linear would (``"b l d, d e -> b l e"``): the
parameter's other axis writes a new space. Any other contraction over the channels blocks them;
a dot product of two operands' channels says so.

Multi-query attention (one key/value head shared by every query head) keeps the query heads
and leaves the shared head whole, as the matmul rule does.

A mixin of :class:`~secateur.graph._ops.OpRules`, which provides ``info``, ``set``, ``fresh``,
``block_all``, ``unify``, ``add_param``, ``flag_shared_kv``, ``are_heads`` and
``same_rows_same_space``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def einsum_letters(equation: str, ndims: Sequence[int]) -> tuple[list[str], str] | None:
    """Per operand one letter per axis, and the output's letters, with ``...`` spelled out as
    placeholder characters (broadcast from the right); None when the equation does not fit
    operands of ``ndims`` axes. Implicit outputs follow torch: the ellipsis axes, then the
    letters used once, in alphabetical order."""
    text = equation.replace(" ", "")
    inputs, arrow, output = text.partition("->")
    terms = inputs.split(",")
    if len(terms) != len(ndims) or any(t.count("...") > 1 for t in [*terms, output]):
        return None
    named = [len(t.replace("...", "")) for t in terms]
    extra = [n - k if "..." in t else 0 for t, n, k in zip(terms, ndims, named, strict=True)]
    if any(e < 0 for e in extra) or any(
        "..." not in t and k != n for t, n, k in zip(terms, ndims, named, strict=True)
    ):
        return None
    width = max(extra, default=0)
    dots = "".join(chr(0x100 + i) for i in range(width))  # not letters: no clash possible
    spelled = [t.replace("...", dots[width - e :]) for t, e in zip(terms, extra, strict=True)]
    if not all(c.isalpha() for t in spelled for c in t):
        return None
    if arrow:
        result = output.replace("...", dots)
    else:
        used = "".join(t.replace("...", "") for t in terms)
        result = dots + "".join(sorted(c for c in set(used) if used.count(c) == 1))
    if len(set(result)) != len(result) or any(c not in "".join(spelled) for c in result):
        return None
    return spelled, result


class EinsumRule:
    """The ``einsum`` rule; see the module docstring."""

    def einsum(self, args: tuple, out: object) -> bool:
        equation, operands = (args[0], args[1:]) if args else (None, ())
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = tuple(operands[0])
        if not isinstance(equation, str) or not isinstance(out, torch.Tensor):
            return False
        if not operands or not all(isinstance(t, torch.Tensor) for t in operands):
            return False
        parsed = einsum_letters(equation, [t.dim() for t in operands])
        if parsed is None or len(parsed[1]) != out.dim():
            return False
        letters, result = parsed
        tracked = [(t, s, self.info(t)) for t, s in zip(operands, letters, strict=True)]
        tracked = [(t, s, info) for t, s, info in tracked if info is not None]
        if len({s[info[1]] for _, s, info in tracked}) > 1:
            tracked = self._shared_head_einsum(tracked, letters, result)
        channel = {s[info[1]] for _, s, info in tracked}
        if len(channel) != 1:
            return False
        letter = channel.pop()
        if any(s.count(letter) > 1 for s in letters):
            return False  # a diagonal along the channels
        if letter not in result:
            return self._reads_channels(operands, letters, tracked, letter, result, out)
        axis = result.index(letter)
        layout = None
        for t, _, (lt, d) in tracked:
            if t.shape[d] != out.shape[axis]:
                return False
            layout = lt if layout is None else self.unify(layout, lt)
            if layout is None:
                return False
        for t, s in zip(operands, letters, strict=True):
            broadcast = letter not in s or t.shape[s.index(letter)] == 1
            if (
                self.info(t) is None
                and not broadcast
                and not self.add_param(t, s.index(letter), layout)
            ):
                return False  # a constant with its own value per channel
        self.set(out, layout, axis)
        return True

    def _shared_head_einsum(self, tracked: list, letters: list[str], result: str) -> list:
        """Multi-query attention written as einsum: operands whose channels run along a
        letter every operand and the output share (whole query heads) go on; the others hold
        channels inside one key/value head shared by them all, which stays whole. Returns the
        operands that go on, or ``tracked`` when that is not the case."""
        batch = set(result).intersection(*map(set, letters))
        heads = [item for item in tracked if item[1][item[2][1]] in batch]
        inner = [item for item in tracked if item[1][item[2][1]] not in batch]
        if not heads or not inner or len({s[info[1]] for _, s, info in heads}) != 1:
            return tracked
        if not all(self.are_heads(info[0]) for _, _, info in heads):
            return tracked  # not attention: a per-token gate, say
        for _, _, (layout, _) in inner:
            self.table.block_layout(layout, "a key/value head shared by every query head")
        self.flag_shared_kv(heads[0][2][0])
        return heads

    def _reads_channels(self, operands, letters, tracked, letter, result, out) -> bool:  # noqa: ANN001
        """The channels summed away against one 2-D parameter (a Linear written as einsum):
        the parameter's axis along them reads them, its other axis writes a new space."""
        readers = [(t, s) for t, s in zip(operands, letters, strict=True) if letter in s]
        if len(tracked) == len(readers) == 2:
            # a dot product of two tensors' channels (Mamba2's ``C`` against ``B`` over the
            # state, attention scores over a head's dims): a width such code may scale by
            # would not follow them; both stay whole, and so does the result
            self.block_all([t for t, _, _ in tracked], out, "summed against another's channels")
            return True
        params = [(t, s) for t, s in readers if self.info(t) is None]
        if len(tracked) != 1 or len(params) != 1 or len(readers) != 2:
            return False
        weight, s = params[0]
        if weight.dim() != 2 or s.replace(letter, "") not in result:
            return False
        (t, ts, (_, d)) = tracked[0]
        if weight.shape[s.index(letter)] != t.shape[d]:
            return False  # broadcast along the channels: not a weight per channel
        written = s.replace(letter, "")
        if any(
            written in other for t, other in zip(operands, letters, strict=True) if t is not weight
        ):
            return False  # the new axis is shared with the input: not a plain projection
        if not self.add_param(weight, s.index(letter), tracked[0][2][0]):
            return False
        axis = result.index(written)
        self.fresh(out, axis)
        produced = self.info(out)[0]
        if self.add_param(weight, s.index(written), produced, role="param_out"):
            self.same_rows_same_space(weight, s.index(written), produced)
        return True
