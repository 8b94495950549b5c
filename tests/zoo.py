"""A zoo of tiny, randomly initialised real architectures, built in the test process (no downloads).

Every entry builds the model a user would train (Hugging Face GPT-2 / BERT / Llama / OPT / T5 / GPT-NeoX / Mistral /
Qwen2, timm ViT / DeiT / Swin / ConvNeXt / MobileNetV3, torchvision ResNet-18, ``nn.TransformerEncoder`` batch-first
and sequence-first, ``nn.LSTM`` / ``nn.GRU`` in both layouts, bidirectional and packed, cross-attention, a language
model whose head reuses the embedding weight functionally) at a size the CPU and the Triton interpreter handle in
well under a second.

    entry = ZOO["gpt2"]
    model = entry.build(torch.float64)
    inputs, target = entry.batch(4, generator=torch.Generator().manual_seed(0))
    logits = entry.forward(model, inputs)            # [B, C] or [B, T, V]
    loss = entry.loss(logits, target)                # summed over examples (use reduction="mean" for the mean)

A model whose package is missing raises ``pytest.skip`` from :func:`build`; the others still run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ, WIDTH, CLASSES = 61, 7, 32, 5


@dataclass(frozen=True)
class ZooEntry:
    name: str
    _build: Callable[[], nn.Module]
    _batch: Callable[[int, torch.Generator], tuple[Any, torch.Tensor]]
    _forward: Callable[[nn.Module, Any], torch.Tensor]
    sequence: bool  # logits [B, T, V] with per-token targets (else [B, C])
    has_batchnorm: bool = False

    def build(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self._build().to(dtype)

    def batch(self, batch_size: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32):
        """``(inputs, target)`` for ``batch_size`` examples; floating inputs in ``dtype``."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        inputs, target = self._batch(batch_size, g)
        if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
            inputs = inputs.to(dtype)
        return inputs, target

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        return self._forward(model, inputs)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """Cross-entropy; for sequence models summed over tokens per example, then reduced over examples."""
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        if self.sequence:
            per_example = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").sum(1)
        else:
            per_example = F.cross_entropy(logits, target, reduction="none")
        return per_example.sum() if reduction == "sum" else per_example.mean()


def _tokens(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (b, SEQ), generator=g)
    return ids, torch.randint(0, VOCAB, (b, SEQ), generator=g)


def _labels(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (b, SEQ), generator=g)
    return ids, torch.randint(0, CLASSES, (b,), generator=g)


def _images(size: int, channels: int = 3):
    def make(b: int, g: torch.Generator):
        return torch.randn(b, channels, size, size, generator=g), torch.randint(0, CLASSES, (b,), generator=g)

    return make


def _transformers():
    return pytest.importorskip("transformers")


def _gpt2() -> nn.Module:
    tf = _transformers()
    config = tf.GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=WIDTH,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return tf.GPT2LMHeadModel(config)  # lm_head ties the token embedding


def _bert() -> nn.Module:
    tf = _transformers()
    config = tf.BertConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * WIDTH,
        max_position_embeddings=16,
        num_labels=CLASSES,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return tf.BertForSequenceClassification(config)


def _llama() -> nn.Module:
    tf = _transformers()
    config = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    return tf.LlamaForCausalLM(config)


def _opt() -> nn.Module:
    tf = _transformers()
    config = tf.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=2,
        ffn_dim=2 * WIDTH,
        num_attention_heads=2,
        max_position_embeddings=16,
        word_embed_proj_dim=WIDTH,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
    )
    return tf.OPTForCausalLM(config)  # flattens hidden states to [B * T, d] around its MLP


# T5's relative position bias is an Embedding of [T, T] bucket ids with no batch dim: with T == B (4) its leading
# dim has the batch size, which a size-based reading takes for the batch.
T5_SEQ = 4


def _t5() -> nn.Module:
    tf = _transformers()
    config = tf.T5Config(
        vocab_size=VOCAB,
        d_model=WIDTH,
        d_kv=16,
        d_ff=2 * WIDTH,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5Logits(tf.T5ForConditionalGeneration(config))


class T5Logits(nn.Module):
    """T5 on encoder and decoder ids stacked in one tensor ``[B, 2, T]`` (the loop slices examples along dim 0)."""

    def __init__(self, t5: nn.Module):
        super().__init__()
        self.t5 = t5

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.t5(input_ids=ids[:, 0], decoder_input_ids=ids[:, 1]).logits


def _t5_batch(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (b, 2, T5_SEQ), generator=g)
    return ids, torch.randint(0, VOCAB, (b, T5_SEQ), generator=g)


def _gpt_neox() -> nn.Module:
    tf = _transformers()
    config = tf.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * WIDTH,
        max_position_embeddings=16,
        rotary_pct=0.5,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    return tf.GPTNeoXForCausalLM(config)


def _mistral() -> nn.Module:
    tf = _transformers()
    config = tf.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        sliding_window=4,
    )
    return tf.MistralForCausalLM(config)


def _qwen2() -> nn.Module:
    tf = _transformers()
    config = tf.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        tie_word_embeddings=True,
    )
    return tf.Qwen2ForCausalLM(config)  # q/k/v biases, a tied head


def _hf_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def _vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, embed_dim=WIDTH, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=CLASSES
    )


def _timm():
    return pytest.importorskip("timm")


def _deit() -> nn.Module:
    _timm()
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(
        img_size=8, patch_size=4, embed_dim=WIDTH, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=CLASSES
    )  # class and distillation tokens, two heads averaged


def _swin() -> nn.Module:
    _timm()
    from timm.models.swin_transformer import SwinTransformer

    # 16 x 16 patches, 4 x 4 windows: shifted windows (roll, window partition of B into B * nW, a masked
    # relative-position bias) in both stages, then patch merging
    return SwinTransformer(
        img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2), mlp_ratio=2.0,
        num_classes=CLASSES, drop_path_rate=0.0,
    )  # fmt: skip


def _convnext() -> nn.Module:
    _timm()
    from timm.models.convnext import ConvNeXt

    # layer scale gamma (x * gamma.reshape(1, -1, 1, 1)), LayerNorm2d on permuted channels, depthwise convs
    return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), ls_init_value=0.5, num_classes=CLASSES, patch_size=2)


def _mobilenetv3() -> nn.Module:
    timm = _timm()
    # squeeze-excite, hard-swish, depthwise convs; timm's BatchNormAct2d (BatchNorm + activation in one module)
    return timm.create_model("mobilenetv3_small_050", num_classes=CLASSES)


def _resnet18() -> nn.Module:
    tv = pytest.importorskip("torchvision")
    return tv.models.resnet18(num_classes=CLASSES)


class EncoderClassifier(nn.Module):
    """``nn.TransformerEncoder`` over token embeddings, mean-pooled into a linear classifier."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, 2, 2 * WIDTH, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids if self.batch_first else ids.t())
        h = self.encoder(h)
        return self.head(h.mean(1 if self.batch_first else 0))


class TiedLM(nn.Module):
    """A language model whose output layer is ``F.linear(h, emb.weight)``: the embedding weight is used twice,
    once by its module and once functionally, as in most LM heads."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.mix(self.emb(ids))))
        return F.linear(h, self.emb.weight)


class ReusedMLP(nn.Module):
    """One Linear applied twice per forward (weight sharing across depth)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, WIDTH)
        self.shared = nn.Linear(WIDTH, WIDTH)
        self.out = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


class RecurrentClassifier(nn.Module):
    """``nn.LSTM`` / ``nn.GRU`` (2 layers) over ``[B, T, d]`` features, the last step into a linear classifier.
    ``batch_first=False`` transposes to ``[T, B, d]`` first; ``packed`` packs variable-length sequences (the last
    feature channel marks valid steps) and reads each sequence's last valid output."""

    def __init__(self, cell: str, batch_first: bool, bidirectional: bool = False, packed: bool = False):
        super().__init__()
        self.batch_first, self.packed = batch_first, packed
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell]
        self.rnn = rnn(6, 8, num_layers=2, batch_first=batch_first, bidirectional=bidirectional)
        self.head = nn.Linear(8 * (2 if bidirectional else 1), CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            lengths = x[..., -1].sum(1).long()
            seq = x[..., :-1] if self.batch_first else x[..., :-1].transpose(0, 1)
            packed = nn.utils.rnn.pack_padded_sequence(seq, lengths, self.batch_first, enforce_sorted=False)
            out, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
            last = out[torch.arange(out.shape[0]), lengths - 1]
            return self.head(last)
        out, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        return self.head(out[:, -1] if self.batch_first else out[-1])


def _sequences(packed: bool):
    def make(b: int, g: torch.Generator):
        x = torch.randn(b, SEQ, 6 + packed, generator=g)
        if packed:  # lengths 2..SEQ; the last channel is 1 on valid steps
            lengths = torch.randint(2, SEQ + 1, (b,), generator=g)
            x[..., -1] = (torch.arange(SEQ)[None, :] < lengths[:, None]).to(x.dtype)
        return x, torch.randint(0, CLASSES, (b,), generator=g)

    return make


class CrossAttention(nn.Module):
    """Queries from token embeddings attend to a memory of a different length (``nn.MultiheadAttention`` with
    ``key is value is not query``, and ``nn.TransformerDecoderLayer``'s self- and cross-attention)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.mem = nn.Linear(3, WIDTH)
        self.cross = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.decoder = nn.TransformerDecoderLayer(WIDTH, 2, 2 * WIDTH, dropout=0.0, batch_first=True)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, SEQ + 5, 3]: ids in x[:, :SEQ, 0], memory after
        h = self.emb(x[:, :SEQ, 0].long())
        memory = torch.tanh(self.mem(x[:, SEQ:]))
        h = h + self.cross(h, memory, memory, need_weights=False)[0]
        return self.head(self.decoder(h, memory).mean(1))


def _cross_batch(b: int, g: torch.Generator):
    x = torch.randn(b, SEQ + 5, 3, generator=g)
    x[:, :SEQ, 0] = torch.randint(0, VOCAB, (b, SEQ), generator=g).to(x.dtype)
    return x, torch.randint(0, CLASSES, (b,), generator=g)


def _call(model: nn.Module, inputs: Any) -> torch.Tensor:
    return model(inputs)


ZOO: dict[str, ZooEntry] = {
    "gpt2": ZooEntry("gpt2", _gpt2, _tokens, _hf_logits, sequence=True),
    "bert": ZooEntry("bert", _bert, _labels, _hf_logits, sequence=False),
    "llama": ZooEntry("llama", _llama, _tokens, _hf_logits, sequence=True),
    "vit": ZooEntry("vit", _vit, _images(8), _call, sequence=False),
    "resnet18": ZooEntry("resnet18", _resnet18, _images(16), _call, sequence=False, has_batchnorm=True),
    "encoder": ZooEntry("encoder", lambda: EncoderClassifier(True), _labels, _call, sequence=False),
    "encoder_seq_first": ZooEntry("encoder_seq_first", lambda: EncoderClassifier(False), _labels, _call, False),
    "tied_lm": ZooEntry("tied_lm", TiedLM, _tokens, _call, sequence=True),
    "reused_mlp": ZooEntry(
        "reused_mlp",
        ReusedMLP,
        lambda b, g: (torch.randn(b, 12, generator=g), torch.randint(0, CLASSES, (b,), generator=g)),
        _call,
        sequence=False,
    ),
    "opt": ZooEntry("opt", _opt, _tokens, _hf_logits, sequence=True),
    "t5": ZooEntry("t5", _t5, _t5_batch, _call, sequence=True),
    "gpt_neox": ZooEntry("gpt_neox", _gpt_neox, _tokens, _hf_logits, sequence=True),
    "mistral": ZooEntry("mistral", _mistral, _tokens, _hf_logits, sequence=True),
    "qwen2": ZooEntry("qwen2", _qwen2, _tokens, _hf_logits, sequence=True),
    "deit": ZooEntry("deit", _deit, _images(8), _call, sequence=False),
    "swin": ZooEntry("swin", _swin, _images(32), _call, sequence=False),
    "convnext": ZooEntry("convnext", _convnext, _images(32), _call, sequence=False),
    "mobilenetv3": ZooEntry("mobilenetv3", _mobilenetv3, _images(32), _call, sequence=False, has_batchnorm=True),
    "lstm": ZooEntry("lstm", lambda: RecurrentClassifier("lstm", True), _sequences(False), _call, False),
    "lstm_seq_first": ZooEntry(
        "lstm_seq_first", lambda: RecurrentClassifier("lstm", False), _sequences(False), _call, False
    ),
    "gru": ZooEntry("gru", lambda: RecurrentClassifier("gru", True), _sequences(False), _call, False),
    "gru_seq_first": ZooEntry(
        "gru_seq_first", lambda: RecurrentClassifier("gru", False), _sequences(False), _call, False
    ),
    "lstm_bidirectional_packed": ZooEntry(
        "lstm_bidirectional_packed",
        lambda: RecurrentClassifier("lstm", True, bidirectional=True, packed=True),
        _sequences(True),
        _call,
        False,
    ),
    "gru_packed_seq_first": ZooEntry(
        "gru_packed_seq_first", lambda: RecurrentClassifier("gru", False, packed=True), _sequences(True), _call, False
    ),
    "rnn_bidirectional": ZooEntry(
        "rnn_bidirectional",
        lambda: RecurrentClassifier("rnn", False, bidirectional=True),
        _sequences(False),
        _call,
        False,
    ),
    "cross_attention": ZooEntry("cross_attention", CrossAttention, _cross_batch, _call, sequence=False),
    "regops_fused": ZooEntry(
        "regops_fused",
        lambda: FusedDropoutMLP(),  # defined below
        lambda b, g: (torch.randn(b, 12, generator=g), torch.randint(0, CLASSES, (b,), generator=g)),
        _call,
        sequence=False,
    ),
}


def per_example_loop_grads(
    entry: ZooEntry, model: nn.Module, inputs: Any, target: torch.Tensor
) -> list[dict[str, torch.Tensor]]:
    """Brute force: the gradient of each example's loss, one backward per example (the test oracle).

    Models with BatchNorm must be in eval mode (a batch of one has no batch statistics in train mode)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = []
    for i in range(target.shape[0]):
        xi = inputs[i : i + 1]
        loss = entry.loss(entry.forward(model, xi), target[i : i + 1])
        gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads.append(
            {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(params.items(), gs, strict=True)}
        )
    return grads


class FusedDropoutMLP(nn.Module):
    """An MLP block written with regops' fused dropout ops (``bias_dropout_add``, ``dropout_add_layer_norm``).

    ``fused = False`` computes the same function with torch ops (``F.dropout``, ``nn.LayerNorm``): the twice
    differentiable reference, equal to the fused model in eval mode (masks differ in train mode)."""

    def __init__(self, p: float = 0.1):
        super().__init__()
        self.p, self.fused = p, True
        self.inp = nn.Linear(12, WIDTH)
        self.fc = nn.Linear(WIDTH, WIDTH, bias=False)
        self.fc_bias = nn.Parameter(0.1 * torch.randn(WIDTH))
        self.norm = nn.LayerNorm(WIDTH)
        self.out = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import regops

        h = torch.tanh(self.inp(x))
        if self.fused:
            r = regops.bias_dropout_add(self.fc(h), self.fc_bias, h, self.p, training=self.training)
            w, b = self.norm.weight, self.norm.bias
            h = regops.dropout_add_layer_norm(torch.tanh(r), r, w, b, self.p, self.norm.eps, training=self.training)
        else:
            r = h + F.dropout(self.fc(h) + self.fc_bias, self.p, self.training)
            h = self.norm(r + F.dropout(torch.tanh(r), self.p, self.training))
        return self.out(h)
