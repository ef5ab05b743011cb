"""The placeholder token (``<new1>``): add it to the tokenizer, initialise its embedding, train only its row.

Only the new row may learn, and nothing else in the table may move - not even through AdamW's weight decay (the
reference code hands the whole table to AdamW, so decay shrinks every row by ~2.4% over 10k steps; we don't
reproduce that). So instead of masking gradients of a (49409, D) table, training splices a small trainable
``(n_new, D)`` parameter in front of the frozen table (:class:`SplicedTokenEmbedding`): the optimiser never sees
the other rows, and they stay bit-identical by construction. After training the learned rows are written back into
the table (:func:`unsplice`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["add_placeholder_token", "check_new_token", "initial_embedding", "SplicedTokenEmbedding",
           "splice_new_rows", "unsplice", "token_rows", "set_token_rows"]

logger = logging.getLogger(__name__)


#: The rare token Custom Diffusion's code starts its modifier token from (id 42170 in CLIP's vocabulary).
RARE_INIT_TOKEN = "ktn"


def initial_embedding(tokenizer, table: torch.Tensor, class_word: str, mode: str = "piece") -> torch.Tensor:
    """The embedding a new token starts from.

    ``mode="piece"`` (reference code): the vocab entry of the class word *without* the end-of-word marker (``cat``,
    not ``cat</w>``), when it exists as one piece; otherwise (multi-word or rare class words) the ``"word"`` rule:
    the mean of the embeddings of the tokens the class word is split into in a prompt. ``mode="rare"`` (Custom
    Diffusion's code): the rare token ``ktn``, whatever the class word.
    """
    vocab = tokenizer.get_vocab()
    if mode == "rare":
        if RARE_INIT_TOKEN not in vocab:
            raise ValueError(f"token_init 'rare': the tokenizer has no {RARE_INIT_TOKEN!r} entry")
        return table[vocab[RARE_INIT_TOKEN]].detach().clone()
    if mode == "piece":
        piece = class_word.strip().lower()
        if piece in vocab:
            return table[vocab[piece]].detach().clone()
        logger.info("class word %r is not a single BPE piece; initialising from its word tokens", class_word)
    ids = tokenizer(class_word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"class word {class_word!r}: the tokenizer gives no tokens to initialise from")
    return table[torch.tensor(ids)].detach().mean(0).clone()


def _normalized(tokenizer, text: str) -> str:
    """``text`` as the tokenizer's normalizer sees it (unchanged for a tokenizer without one)."""
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    return normalizer.normalize_str(text) if normalizer is not None else text


def check_new_token(tokenizer, token: str) -> None:
    """A ``ValueError`` when ``token`` is, or reads as, a word the tokenizer already has. Needs the tokenizer alone,
    so training checks it before loading the base model (minutes), not only when the token is added."""
    vocab = tokenizer.get_vocab()
    # the tokenizer stores and matches an added token as it normalizes text (CLIP: lowercased), so 'Dog' would
    # become 'dog' and take over the class word in every prompt
    for form in dict.fromkeys((token, _normalized(tokenizer, token))):
        if form in vocab:
            read_as = "" if form == token else f" (the tokenizer reads it as {form!r})"
            raise ValueError(f"token {token!r}{read_as} is already in the tokenizer (pick another, e.g. '<new2>')")


def add_placeholder_token(tokenizer, text_encoder, token: str, class_word: str, init_mode: str = "piece",
                          init_vector: torch.Tensor | None = None) -> int:
    """Add ``token`` to the tokenizer, grow the text encoder's table by one row, initialise it; return its id.

    The row comes from ``init_vector`` when given (loading a trained module), else from the class word.
    """
    check_new_token(tokenizer, token)
    added = tokenizer.add_tokens([token])
    if added != 1:
        raise ValueError(f"token {token!r} could not be added to the tokenizer")
    token_id = tokenizer.convert_tokens_to_ids(token)
    embedding = text_encoder.get_input_embeddings()
    table = embedding.weight
    if init_vector is None:
        init_vector = initial_embedding(tokenizer, table, class_word, init_mode)
    if token_id != table.shape[0]:
        raise ValueError(f"token {token!r} got id {token_id} but the embedding table has {table.shape[0]} rows; "
                         "tokenizer and text encoder are out of step")
    grown = nn.Embedding(table.shape[0] + 1, table.shape[1], device=table.device, dtype=table.dtype)
    with torch.no_grad():
        grown.weight[:-1].copy_(table)
        grown.weight[-1].copy_(init_vector.to(table.device, table.dtype))
    grown.weight.requires_grad_(table.requires_grad)
    text_encoder.set_input_embeddings(grown)
    text_encoder.config.vocab_size = table.shape[0] + 1
    return token_id


def token_rows(text_encoder, token_ids: list[int]) -> torch.Tensor:
    """Current embedding rows of ``token_ids`` (works spliced or not)."""
    embedding = text_encoder.get_input_embeddings()
    if isinstance(embedding, SplicedTokenEmbedding):
        return torch.stack([embedding.row(i) for i in token_ids]).detach()
    return embedding.weight[token_ids].detach()


def set_token_rows(text_encoder, token_ids: list[int], rows: torch.Tensor) -> None:
    embedding = text_encoder.get_input_embeddings()
    with torch.no_grad():
        if isinstance(embedding, SplicedTokenEmbedding):
            for i, row in zip(token_ids, rows, strict=True):
                embedding.new_rows[embedding.index_of(i)].copy_(row)
        else:
            embedding.weight[token_ids] = rows.to(embedding.weight.dtype)


class SplicedTokenEmbedding(nn.Module):
    """A frozen embedding table with a few trainable rows spliced in.

    ``ids`` listed in ``token_ids`` read from ``new_rows`` (trainable); every other id reads the frozen ``base``.
    Same output as the plain table holding those rows.
    """

    def __init__(self, base: nn.Embedding, token_ids: list[int]):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.token_ids = list(token_ids)
        self.register_buffer("_ids", torch.tensor(self.token_ids, dtype=torch.long, device=base.weight.device),
                             persistent=False)
        self.new_rows = nn.Parameter(base.weight[self.token_ids].detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:  # what callers of get_input_embeddings().weight expect (dtype, shape)
        return self.base.weight

    def index_of(self, token_id: int) -> int:
        return self.token_ids.index(token_id)

    def row(self, token_id: int) -> torch.Tensor:
        return self.new_rows[self.index_of(token_id)]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        # (B, L, n_new): which positions hold which new token; a one-hot matmul keeps this branch-free.
        hits = (input_ids.unsqueeze(-1) == self._ids).to(out.dtype)
        spliced = hits @ self.new_rows.to(out.dtype)
        keep = 1.0 - hits.sum(-1, keepdim=True)
        return out * keep + spliced


def splice_new_rows(text_encoder, token_ids: list[int]) -> SplicedTokenEmbedding:
    """Freeze the table and make only ``token_ids`` trainable (see the module docstring). Idempotent."""
    embedding = text_encoder.get_input_embeddings()
    if isinstance(embedding, SplicedTokenEmbedding):
        return embedding
    spliced = SplicedTokenEmbedding(embedding, token_ids)
    text_encoder.set_input_embeddings(spliced)
    return spliced


def unsplice(text_encoder) -> nn.Embedding:
    """Write the learned rows back into the table and restore the plain ``nn.Embedding``."""
    embedding = text_encoder.get_input_embeddings()
    if not isinstance(embedding, SplicedTokenEmbedding):
        return embedding
    base = embedding.base
    with torch.no_grad():
        base.weight[embedding._ids] = embedding.new_rows.detach().to(base.weight.dtype)
    text_encoder.set_input_embeddings(base)
    return base
