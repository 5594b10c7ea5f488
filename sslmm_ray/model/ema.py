"""Mean-teacher helpers: the teacher is an exponential moving average of the student."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student`` in eval mode (no dropout in the views it scores).

    A DDP-wrapped student is unwrapped: the teacher is a plain module, never synchronised
    (each rank updates it from the same student weights, so it stays identical everywhere).
    """
    teacher = copy.deepcopy(getattr(student, "module", student))
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``t <- decay * t + (1 - decay) * s`` for parameters; buffers are copied from the student.

    A DDP-wrapped student is unwrapped, so the teacher stays a plain module.
    """
    student = getattr(student, "module", student)
    teacher = getattr(teacher, "module", teacher)
    t_params = [p for _, p in sorted(teacher.named_parameters())]
    s_params = [p.detach() for _, p in sorted(student.named_parameters())]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameters")
    torch._foreach_lerp_(t_params, s_params, 1.0 - decay)
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers(), strict=True):
        t_buf.copy_(s_buf)
