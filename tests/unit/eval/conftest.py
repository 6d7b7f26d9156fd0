"""Models whose outputs the eval tests know exactly.

* `bigram_model(W)`: a real `Transformer` whose blocks are switched off (wo = w2 = 0, so each block
  is the identity) and whose embedding / head are set so that logits[next] = W[next, current].
  Log-likelihoods can then be computed by hand from W.
* `InductionOracle`: a stand-in with the Transformer's call surface (hidden / output / args /
  tok_embeddings, and KV-cache use through `herd.generate`) that predicts the token which followed
  the longest earlier match of the current suffix, looking back at most `window` tokens: perfect
  needle retrieval inside the window and none beyond it.
"""

import math

import pytest
import torch
from torch import nn

from herd.model import ModelArgs, Transformer, build_model
from herd.tokenizer import Tokenizer

V = 512  # byte tokenizer: 256 byte tokens + 256 special tokens


@pytest.fixture(scope="session")
def byte_tok() -> Tokenizer:
    return Tokenizer({bytes([b]): b for b in range(256)}, name="bytes")


def bigram_model(W: torch.Tensor) -> Transformer:
    n = W.shape[0]
    args = ModelArgs(dim=n, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=n, multiple_of=32, max_seq_len=256)
    model = build_model(args, seed=0).eval()
    eps = args.norm_eps
    with torch.no_grad():
        block = model.layers["0"]
        block.attention.wo.weight.zero_()
        block.feed_forward.w2.weight.zero_()
        # Embedding sqrt(n) * one-hot has mean square 1, so the final RMSNorm maps it to
        # sqrt(n) / sqrt(1 + eps) * one-hot; the head undoes that scale.
        model.tok_embeddings.weight.copy_(torch.eye(n) * math.sqrt(n))
        model.output.weight.copy_(W * math.sqrt(1 + eps) / math.sqrt(n))
    return model


def bigram_logprob(W: torch.Tensor, prev: int, nxt: int) -> float:
    col = W[:, prev].double()
    return float(col[nxt] - torch.logsumexp(col, 0))


class InductionOracle(nn.Module):
    def __init__(self, *, window: int, max_match: int = 32, max_seq_len: int = 1024):
        super().__init__()
        self.args = ModelArgs(dim=16, n_layers=1, n_heads=1, vocab_size=V, multiple_of=16, max_seq_len=max_seq_len)
        self.tok_embeddings = nn.Embedding(1, 1)  # only its device / dtype are read
        self.window, self.max_match = window, max_match

    def _predict(self, seq: torch.Tensor, positions: range) -> torch.Tensor:
        """Next-token prediction at each position of `positions` in the 1-D sequence `seq`."""
        S = len(seq)
        eq = seq.view(-1, 1) == seq.view(1, -1)  # (S, S)
        match = torch.zeros(S, S, dtype=torch.long)  # suffix-match length ending at (t, j)
        match[0] = eq[0].long()
        for t in range(1, S):
            match[t, 0] = eq[t, 0].long()
            match[t, 1:] = eq[t, 1:].long() * (1 + match[t - 1, :-1]).clamp(max=self.max_match)
        out = torch.zeros(len(positions), dtype=torch.long)
        j = torch.arange(S)
        for i, t in enumerate(positions):
            ok = (j < t) & (j >= t - self.window)
            score = torch.where(ok, match[t] * S + j, torch.full_like(j, -1))
            best = int(score.argmax())
            out[i] = seq[best + 1] if score[best] >= S else 0
        return out

    def hidden(self, tokens, *, pos=None, cache=None, doc_ids=None):
        B, S = tokens.shape
        if cache is None:
            hist, start = tokens, torch.zeros(B, dtype=torch.long)
        else:
            if not hasattr(cache, "oracle_tokens"):
                cache.oracle_tokens = torch.zeros(cache.batch_size, cache.max_seq_len, dtype=torch.long)
            p = torch.arange(S).view(1, S).expand(B, S) if isinstance(pos, int) else pos.expand(B, S)
            for b in range(B):
                cache.oracle_tokens[b, p[b]] = tokens[b]
            hist, start = cache.oracle_tokens, p[:, 0]
        preds = torch.stack([
            self._predict(hist[b, : int(start[b]) + S], range(int(start[b]), int(start[b]) + S)) for b in range(B)
        ])  # (B, S)
        return nn.functional.one_hot(preds, V).float()  # (B, S, V)

    def output(self, h):
        return 20.0 * h

    def forward(self, tokens, **kwargs):
        return self.output(self.hidden(tokens, **kwargs))


# Fixtures rather than imports: with --import-mode=importlib a test cannot import conftest.
@pytest.fixture(scope="session")
def make_bigram():
    return bigram_model


@pytest.fixture(scope="session")
def bigram_lp():
    return bigram_logprob


@pytest.fixture(scope="session")
def make_oracle():
    return InductionOracle
