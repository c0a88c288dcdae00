"""A training batch's plan, made on the host when the batch is collated and carried in the batch.

A batch whose rows differ much in length (the longest of each length-grouped mega-batch: PIQA's longest examples,
243 tokens, with ones of 60) is split into groups of similar length, each padded only to its own longest, when
that saves more padded positions than another pass of the decoder costs. The plan names each decoder pass's rows,
its length and its answer positions, and the positions all passes hold (what the activation budget needs): the
collator has the labels on the host already, so nothing waits for the GPU to find them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from common.data import IGNORE_INDEX, round_up

# What one more decoder pass costs, in padded positions: on an H200 a step's fixed cost (~100 ms of kernel launches)
# is worth a few thousand positions of a long batch's work (~55 positions a millisecond).
SPLIT_COST_POSITIONS = 4096
MAX_LENGTH_GROUPS = 4
GROUP_ROWS = 8  # groups are whole multiples of this many rows (but the last)


class Pass(NamedTuple):
    """One decoder pass: its rows of the batch (None: all, in order), its length, and its answer positions
    (indices into labels[:, 1:].reshape(-1) of the pass's rows): host tensors."""

    rows: torch.Tensor | None
    length: int
    answers: torch.Tensor


class BatchPlan:
    """The decoder passes of one training batch. A plain class, not a dataclass: DDP copies the tensors of a
    dataclass argument to the GPU, and the plan's tensors are the host's."""

    def __init__(self, passes: list[Pass], whole: Pass, rows: int):
        self.passes = passes  # the length groups, or [whole]
        self.whole = whole  # the batch in one pass (a sharded model runs it so)
        self.rows = rows
        self.decoder_positions = sum((rows if p.rows is None else len(p.rows)) * p.length for p in passes)

    def unsplit(self) -> BatchPlan:
        return BatchPlan([self.whole], self.whole, self.rows)


def plan_batch(attention_mask: torch.Tensor, labels: torch.Tensor, length_multiple: int | None = None,
               split: bool = True) -> BatchPlan:
    """The plan of a collated batch (host tensors). `length_multiple`: the collator's pad_to_multiple_of, which the
    length groups keep; `split` False: one pass whatever the lengths."""
    rows, width = labels.shape
    whole = Pass(None, width, answer_positions(labels))
    groups = right_padded_groups(attention_mask, length_multiple) if split else None
    if groups is None:
        return BatchPlan([whole], whole, rows)
    passes = []
    for group_rows, length in groups:
        host_rows = torch.tensor(group_rows)
        passes.append(Pass(host_rows, length, answer_positions(labels.index_select(0, host_rows)[:, :length])))
    return BatchPlan(passes, whole, rows)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose next label is not IGNORE_INDEX, as indices into labels[:, 1:].reshape(-1)."""
    return labels[:, 1:].reshape(-1).ne(IGNORE_INDEX).nonzero().squeeze(1)


class PlannedCollator:
    """A training collator that adds the batch's plan under "plan"."""

    def __init__(self, inner, length_multiple: int | None = None, split: bool = True):
        self.inner = inner
        self.length_multiple = length_multiple
        self.split = split

    def __call__(self, features: list[dict]) -> dict:
        batch = self.inner(features)
        plan = plan_batch(batch["attention_mask"], batch["labels"], self.length_multiple, self.split)
        batch["plan"] = plan
        return batch


def right_padded_groups(attention_mask: torch.Tensor, length_multiple: int | None = None
                        ) -> list[tuple[list[int], int]] | None:
    """The length groups of a right-padded batch (the training collator's), or None to run it as it is: one group,
    or padding not on the right. With `length_multiple`, each group is padded to a multiple of it (at most to the
    batch's width)."""
    mask = attention_mask.cpu()
    if mask.shape[1] < 2 or not bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return None
    lengths = [min(mask.shape[1], round_up(length, length_multiple)) for length in mask.sum(1).tolist()]
    groups = length_groups(lengths, SPLIT_COST_POSITIONS, MAX_LENGTH_GROUPS)
    return groups if len(groups) > 1 else None


def length_groups(lengths: list[int], split_cost: int = SPLIT_COST_POSITIONS,
                  max_groups: int = MAX_LENGTH_GROUPS) -> list[tuple[list[int], int]]:
    """Rows (indices into `lengths`) in groups of similar length, each with its longest length: the split with the
    fewest padded positions, each group after the first counted as `split_cost` positions more."""
    order = sorted(range(len(lengths)), key=lambda row: -lengths[row])
    longest = [lengths[row] for row in order]  # longest first: a group's rows are padded to its first row's length
    if len(order) * longest[0] - sum(longest) <= split_cost:  # all the padding there is would not pay for a split
        return [(order, longest[0])]
    cuts = list(range(0, len(order), GROUP_ROWS)) + [len(order)]
    # best[k][j]: the fewest positions for rows order[:cuts[j]] in k + 1 groups, and where its last group starts
    best = [[((cuts[j] * longest[0]), 0) for j in range(len(cuts))]]
    for _ in range(1, max_groups):
        best.append([min(((best[-1][i][0] + (cuts[j] - cuts[i]) * longest[cuts[i]], i) for i in range(1, j)),
                         default=(float("inf"), 0)) for j in range(len(cuts))])
    groups = min(range(max_groups), key=lambda k: best[k][-1][0] + k * split_cost)
    bounds, j = [], len(cuts) - 1
    for k in range(groups, -1, -1):
        i = best[k][j][1]
        bounds.append((cuts[i], cuts[j]))
        j = i
    return [(order[start:end], longest[start]) for start, end in reversed(bounds)]
