"""How the words of the text side learn of each other: a registered *contextualiser*.

The text side (`FusedTextTransformer`) embeds the tokens, hands them to its contextualiser
(`text.encoder`), then runs its fusion blocks. A contextualiser either leaves the mixing of the
words to the blocks' self-attention, or does it once, under the blocks:

| `text.encoder` | the words meet each other through                    | each block               |
|----------------|------------------------------------------------------|--------------------------|
| `transformer`  | learned positions, then every block's self-attention | self-attn → fusion → MLP |
| `lstm`         | one LSTM stack (Hochreiter & Schmidhuber 1997)       | fusion → MLP             |
| `gru`          | one GRU stack (Cho et al. 2014)                      | fusion → MLP             |

Either way every fusion step receives per-token states (B, T, dim) and uses them alike. The
recurrent stacks may read both ways (`text.bidirectional`), except in a caption decoder, whose
words must not see later ones. Padding is packed away (`pack_padded_sequence`), so a row's
states depend neither on its padding nor on the other rows of its batch.

The single-stream `concat` is the one strategy whose fusion step *is* self-attention (over the
image tokens and the words together). With a recurrent encoder its blocks therefore keep that
self-attention: the recurrent stack reads the words, the projected image tokens are put in
front of its states, and the merged self-attention fuses the two as it does for the Transformer
(causal in a decoder, image first). No position embeddings: the recurrent states carry order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from vtfuse.config import TextConfig
from vtfuse.registry import Registry

CONTEXTUALISERS: Registry[Contextualiser] = Registry("text encoder")

RecurrentState = Tensor | tuple[Tensor, Tensor]  # h (layers·directions, B, hidden); LSTM: (h, c)


def embedding_scale(config: TextConfig) -> float:
    """√dim: embeddings start N(0, 1/dim) and enter at unit scale (see TaskModel.init_weights)."""
    return config.dim**0.5


@dataclass
class RecurrentCache:
    """A recurrent stack's state between decoding steps, one row per caption being decoded."""

    state: RecurrentState | None = None

    def reorder(self, index: Tensor) -> None:
        """Follow beam search: row i continues old row `index[i]`."""
        if isinstance(self.state, tuple):
            self.state = tuple(s.index_select(1, index) for s in self.state)
        elif self.state is not None:
            self.state = self.state.index_select(1, index)

    def expand(self, index: Tensor) -> None:
        """Row i starts from row `index[i]` (beams from images): the state is all per row."""
        self.reorder(index)


class Contextualiser(nn.Module):
    """`forward(x, past, token_mask, cache)`: the embedded text (B, T, dim), the number of text
    positions decoded before it, the mask of real tokens (B, T) or None (all real), the
    decoding cache of `new_cache()` or None → per-token states (B, T, dim).

    `blocks_attend`: the blocks mix the words with their own self-attention (else this module
    did it, and the blocks skip self-attention unless a single stream needs it to fuse).
    """

    blocks_attend = True

    def new_cache(self) -> RecurrentCache | None:
        """What decoding carries between steps besides the blocks' keys and values."""
        return None

    def forward(
        self,
        x: Tensor,
        past: int = 0,
        token_mask: Tensor | None = None,
        cache: RecurrentCache | None = None,
    ) -> Tensor:
        raise NotImplementedError


@CONTEXTUALISERS.register("transformer")
class PositionEmbedding(Contextualiser):
    """Learned absolute positions added to the embeddings (GPT-2); every block's self-attention
    then mixes the words (Vaswani et al. 2017)."""

    def __init__(self, config: TextConfig, causal: bool):
        super().__init__()
        self.max_length = config.max_length
        self.position_embedding = nn.Embedding(config.max_length, config.dim)
        self.scale = embedding_scale(config)

    def forward(
        self,
        x: Tensor,
        past: int = 0,
        token_mask: Tensor | None = None,
        cache: RecurrentCache | None = None,
    ) -> Tensor:
        length = past + x.shape[1]
        if length > self.max_length:
            raise ValueError(
                f"sequence of {length} tokens is longer than text.max_length {self.max_length}"
            )
        positions = torch.arange(past, length, device=x.device)
        return x + self.position_embedding(positions) * self.scale


class RecurrentContext(Contextualiser):
    """A recurrent stack read once, standing where the blocks' self-attention stood, as a
    residual update of the embeddings:

        x_t ← x_t + W [→h_t ; ←h_t] + b       (←h_t only when bidirectional)

    so each word keeps its own identity beside its context (which is why the Transformer side
    scales its embeddings up; see TaskModel.init_weights), and W maps the `rnn_hidden` (× 2)
    states to `text.dim` for the fusion steps. Subclasses name the cell.
    """

    blocks_attend = False
    cell: type[nn.LSTM] | type[nn.GRU]

    def __init__(self, config: TextConfig, causal: bool):
        super().__init__()
        if causal and config.bidirectional:
            raise ValueError(
                f"a bidirectional {config.encoder} reads every word's future, which a caption "
                "decoder must not see: drop text.bidirectional (--bidirectional) for "
                "--task caption; it is for question encoders (vqa, classify) and retrieval"
            )
        if config.rnn_layers < 1 or config.rnn_hidden < 0:
            raise ValueError(
                f"text.rnn_layers must be >= 1 and text.rnn_hidden >= 0 (0: text.dim), got "
                f"{config.rnn_layers} and {config.rnn_hidden}"
            )
        hidden = config.rnn_hidden or config.dim
        self.rnn = self.cell(
            config.dim,
            hidden,
            num_layers=config.rnn_layers,
            batch_first=True,
            bidirectional=config.bidirectional,
            dropout=config.dropout if config.rnn_layers > 1 else 0.0,  # between layers
        )
        self.project = nn.Linear(hidden * (2 if config.bidirectional else 1), config.dim)

    def new_cache(self) -> RecurrentCache:
        if self.rnn.bidirectional:
            raise ValueError("a bidirectional recurrent encoder cannot decode step by step")
        return RecurrentCache()

    def forward(
        self,
        x: Tensor,
        past: int = 0,
        token_mask: Tensor | None = None,
        cache: RecurrentCache | None = None,
    ) -> Tensor:
        """Without a `token_mask` every position is read: nothing to pack (and a decoder's right
        padding cannot reach the words before it). With a `cache` the stack goes on from the
        cached state and leaves its new one there."""
        state = cache.state if cache is not None else None
        if token_mask is None:
            states, state = self.rnn(x, state)
        else:
            states, state = self.read_packed(x, token_mask, state)
        if cache is not None:
            cache.state = state
        return x + self.project(states)

    def read_packed(
        self, x: Tensor, token_mask: Tensor, state: RecurrentState | None
    ) -> tuple[Tensor, RecurrentState]:
        """The stack over each row's real tokens only (`pack_padded_sequence`): the backward
        direction starts at the row's last real word, and no row's states depend on its
        padding or on the other rows. Padded positions come out as zeros (then masked)."""
        lengths = right_padded_lengths(token_mask)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        states, state = self.rnn(packed, state)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=x.shape[1])
        return states, state


def right_padded_lengths(token_mask: Tensor) -> Tensor:
    """(B, T) mask → each row's number of real tokens, refusing a mask that is not a prefix
    (packing assumes right padding). An empty row counts 1: its one output is masked anyway."""
    mask = token_mask.bool()
    lengths = mask.sum(dim=1)
    prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(mask, prefix):
        raise ValueError(
            "a recurrent text encoder packs each row's real tokens: token_mask must be True on "
            "a prefix of every row (right padding)"
        )
    return lengths.clamp_min(1)


@CONTEXTUALISERS.register("lstm")
class LSTMContext(RecurrentContext):
    """Long short-term memory (Hochreiter & Schmidhuber 1997; the forget gate of Gers et al.
    2000), per layer and direction:

        i, f, o = σ(W_{i,f,o} x_t + U_{i,f,o} h_{t−1} + b_{i,f,o})
        g = tanh(W_g x_t + U_g h_{t−1} + b_g)
        c_t = f ⊙ c_{t−1} + i ⊙ g,        h_t = o ⊙ tanh(c_t)

    The forget gate's bias starts at 1, so the cell keeps its memory until taught to drop it
    (Gers et al. 2000; Jozefowicz et al. 2015).
    """

    cell = nn.LSTM

    def __init__(self, config: TextConfig, causal: bool):
        super().__init__(config, causal)
        hidden = self.rnn.hidden_size
        with torch.no_grad():  # PyTorch's gate order: i, f, g, o; the two biases add up
            for name, bias in self.rnn.named_parameters():
                if name.startswith("bias_"):
                    bias[hidden : 2 * hidden] = 1.0 if name.startswith("bias_ih") else 0.0


@CONTEXTUALISERS.register("gru")
class GRUContext(RecurrentContext):
    """Gated recurrent unit (Cho et al. 2014), per layer and direction:

        z = σ(W_z x_t + U_z h_{t−1} + b_z),      r = σ(W_r x_t + U_r h_{t−1} + b_r)
        ĥ = tanh(W x_t + b + r ⊙ (U h_{t−1} + b_U))
        h_t = (1 − z) ⊙ ĥ + z ⊙ h_{t−1}

    (PyTorch's form: the reset gate applies after U, as in cuDNN.)
    """

    cell = nn.GRU
