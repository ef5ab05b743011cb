"""The learned LoRA update of two training runs, compared as a whole (shared by the compiled-training tests)."""

from __future__ import annotations

import torch


def lora_update_difference(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """||ours - reference|| / ||reference|| over every LoRA up-projection (``lora_B``, zero at the start, so what the
    run learned). AdamW's first steps move each element by about lr x sign(gradient), so rounding flips near-zero
    elements: the update as a whole is what can be compared. Fails if the reference learned nothing."""
    keys = [k for k in reference if "lora_B" in k]
    diff = sum(float((ours[k] - reference[k]).norm() ** 2) for k in keys) ** 0.5
    norm = sum(float(reference[k].norm() ** 2) for k in keys) ** 0.5
    assert norm > 0, "the reference run learned no LoRA update"
    return diff / norm
