"""Teacher-forced scoring, the one forward pass that every loss and perplexity of the project comes from: the
evaluation's (hf_engine.TransformersEngine.loss) and the export's reference for the fidelity check
(fidelity.reference).

Rows are (token ids, prompt length): the prompt is context, the tokens after it are the answer, scored at the
positions that predict them, as training's loss does. Rows are right-padded into batches, so that the causal mask
keeps each row's positions what they are alone.
"""

from __future__ import annotations

from collections.abc import Iterator


def answer_logprobs(model, rows: list[tuple[list[int], int]], pad: int, batch_size: int) -> Iterator:
    """Per row, in order: the log-probabilities (float32, answer tokens x vocabulary) of the positions that predict
    its answer tokens. Call under torch.inference_mode() or no_grad()."""
    import torch

    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([list(i) + [pad] * (width - len(i)) for i, _ in batch], device=device)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, (seq, prompt) in enumerate(batch):
            yield torch.log_softmax(logits[row, prompt - 1 : len(seq) - 1].float(), dim=-1)
        del logits


def answer_nll(logprobs, answer: list[int]):
    """The answer tokens' negative log-likelihoods (a tensor, one per token) under `logprobs` (answer_logprobs)."""
    import torch

    target = torch.tensor(answer, device=logprobs.device)[:, None]
    return -logprobs.gather(1, target)[:, 0]
