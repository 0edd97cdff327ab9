"""An independent, dense-mask re-implementation of the reference LST forward (`neillu23/lst`).

Test oracle only: written from the reference's forward rules (the fixtures' README and the
reference's model code, read for facts), in plain PyTorch, without this package's model code.
It takes the reference's model arguments and a state dict with the reference's tensor names and
returns its logits. Every attention builds its boolean mask `[B, Sq, Sk]` explicitly; a query
with no visible key outputs 0 (as the reference's flex attention does).

`reference_tensor_shapes` lists every tensor the reference builds for the arguments, so tests can
make random reference checkpoints without going through this package's export.

Head shapes, as the reference builds them (`base_transformer.TransformerBlock` / `Attention`,
`model/blt.py`): every block has `head_dim = args.head_dim or dim // n_heads` and
`n_kv_heads or n_heads` key/value heads, so wq is `[heads * head_dim, dim]`, wk and wv
`[kv_heads * head_dim, dim]`, wo `[dim, heads * head_dim]`. `head_dim` is one field passed to all
three models (the local encoder and decoder get it explicitly, the global model keeps it in its
copy of the args); `n_kv_heads` goes to both local models, `n_kv_heads_global` replaces it for
the global one. Each model's RoPE table has `head_dim` channels (`args.head_dim or dim //
n_heads`), attention is scaled by `1/sqrt(head_dim)` (the kernels' default), and `repeat_kv`
expands key/value head i to query heads `i * rep .. i * rep + rep - 1` (repeat_interleave).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The reference's fixed token ids (its `tokenizers/constants.py`).
BOE_ID, EOS_ID = 0, 2

# Every field of the reference's data patcher (`PatcherArgs`, pydantic: its loader refuses a
# params.json with any other). Those of its model args are the import's `REFERENCE_MODEL_FIELDS`:
# a fact about the reference, not behaviour the oracle checks, so one list serves both.
REFERENCE_PATCHER_FIELDS = frozenset("""
    patching_mode patching_device entropy_model_checkpoint_dir realtime_patching threshold
    threshold_add max_patch_length patch_size patching_batch_size patcher_curr_align_steps
    patcher_curr_mixed_steps device monotonicity log_time
""".split())

# The reference's defaults (`ByteLatentTransformerArgs`) for the fields read here.
DEFAULTS = {
    "dim_global": 512, "n_layers_global": 8, "n_heads_global": 8, "n_kv_heads_global": None,
    "dim_local_encoder": 512, "dim_local_decoder": 512, "n_layers_local_encoder": 8,
    "n_layers_local_decoder": 8, "n_heads_local_encoder": 8, "n_heads_local_decoder": 8,
    "multiple_of": 256, "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 10000.0,
    "attn_impl": "sdpa", "attn_bias_type": "causal", "eos_id": 2,
    "local_attention_window_len": None, "cross_attn_k": None, "cross_attn_nheads": None,
    "cross_attn_window_encoder": None, "cross_attn_window_decoder": None,
    "cross_attn_all_layers_encoder": False, "cross_attn_all_layers_decoder": False,
    "downsampling_by_pooling": None, "dim_token": None, "use_local_encoder_transformer": False,
    "patch_size": None, "share_encoder_decoder_emb": True,
}


def _args(model_args: dict) -> dict:
    return {**DEFAULTS, "head_dim": None, "n_kv_heads": None, **model_args}


def _local_kv_heads(heads: int, a: dict) -> int:
    """The local models' key/value heads: `n_kv_heads` (shared by both), else one per query head."""
    return a["n_kv_heads"] or heads


def ffn_width(dim: int, a: dict) -> int:
    """SwiGLU hidden width: `multiple_of * ceil(int(multiplier * int(2 * 4 * dim / 3)) / multiple_of)`."""
    width = int(2 * (4 * dim) / 3)
    width = int((a["ffn_dim_multiplier"] or 1.0) * width)
    return a["multiple_of"] * math.ceil(width / a["multiple_of"])


def decoder_token_width(a: dict) -> int:
    """The local decoder's token width, by the reference's rule (`get_decoder_dim_token_emb`):
    with `share_encoder_decoder_emb` the encoder's (`dim_token`, else `dim_local_encoder` with
    `use_local_encoder_transformer`, else `dim_global // patch_size`), else `dim_token`, else
    `dim_local_decoder`. Its decoder patch projection makes `cross_attn_k` slots of this width,
    which its forward reshapes to `dim_local_decoder`-wide ones."""
    if a["dim_token"] is not None:
        return a["dim_token"]
    if not a["share_encoder_decoder_emb"]:
        return a["dim_local_decoder"]
    if a["use_local_encoder_transformer"]:
        return a["dim_local_encoder"]
    return int(a["dim_global"] // a["patch_size"])


def _block_shapes(prefix: str, dim: int, heads: int, kv_heads: int, a: dict) -> dict:
    head_dim, hidden = a["head_dim"] or dim // heads, ffn_width(dim, a)
    return {
        f"{prefix}attention.wq.weight": (heads * head_dim, dim),
        f"{prefix}attention.wk.weight": (kv_heads * head_dim, dim),
        f"{prefix}attention.wv.weight": (kv_heads * head_dim, dim),
        f"{prefix}attention.wo.weight": (dim, heads * head_dim),
        f"{prefix}feed_forward.w1.weight": (hidden, dim),
        f"{prefix}feed_forward.w3.weight": (hidden, dim),
        f"{prefix}feed_forward.w2.weight": (dim, hidden),
        f"{prefix}attention_norm.weight": (dim,),
        f"{prefix}ffn_norm.weight": (dim,),
    }


def _cross_shapes(prefix: str, dim: int) -> dict:
    names = ("wq", "wk", "wv", "wo")
    return {**{f"{prefix}cross_attn_norm_{n}.weight": (dim,) for n in ("q", "kv")},
            **{f"{prefix}{w}.weight": (dim, dim) for w in names}}


def reference_tensor_shapes(model_args: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the reference model (cross-attention encoder and decoder,
    slots initialised by pooling, no hash embeddings), in the reference's names."""
    a = _args(model_args)
    de, dd, dg, k = a["dim_local_encoder"], a["dim_local_decoder"], a["dim_global"], a["cross_attn_k"]
    shapes = {"local_encoder.tok_embeddings.weight": (a["vocab_size"], de),
              "local_encoder.patch_embedding_projection.weight": (de * k, de)}
    for i in range(a["n_layers_local_encoder"]):
        heads = a["n_heads_local_encoder"]
        shapes |= _block_shapes(f"local_encoder.layers.{i}.", de, heads, _local_kv_heads(heads, a), a)
    for i in range(a["n_layers_local_encoder"] if a["cross_attn_all_layers_encoder"] else 1):
        shapes |= _cross_shapes(f"local_encoder.cross_attn_layers.{i}.", de)
    if de * k != dg:
        shapes["global_transformer.token_embedding_projection.weight"] = (dg, de * k)
    for i in range(a["n_layers_global"]):
        heads = a["n_heads_global"]
        shapes |= _block_shapes(f"global_transformer.layers.{i}.", dg, heads,
                                a["n_kv_heads_global"] or heads, a)
    for i in range(a["n_layers_local_decoder"]):
        heads = a["n_heads_local_decoder"]
        shapes |= _block_shapes(f"local_decoder.layers.{i}.", dd, heads, _local_kv_heads(heads, a), a)
    for i in range(a["n_layers_local_decoder"] if a["cross_attn_all_layers_decoder"] else 1):
        shapes |= _cross_shapes(f"local_decoder.cross_attn_layers.{i}.", dd)
    # the reference builds this projection only when the global and decoder widths differ
    if dg != dd:
        shapes["local_decoder.patch_embedding_projection.weight"] = (decoder_token_width(a) * k, dg)
    else:
        assert k == 1, "the reference runs without a decoder projection only with one slot"
    shapes["local_decoder.norm.weight"] = (dd,)
    shapes["local_decoder.output.weight"] = (a["vocab_size"], dd)
    return shapes


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE on `x [B, S, H, D]` at positions 0..S-1, rotating interleaved pairs (x[2i], x[2i+1])."""
    seq, dim = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)  # [D/2]
    angles = torch.outer(torch.arange(seq).float(), inv_freq)  # [S, D/2]
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]  # [1, S, 1, D/2]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`q [B, Sq, H, D]`, `k, v [B, Sk, H, D]`, `mask [B, Sq, Sk]` -> `[B, Sq, H*D]`; a query that
    sees no key gets 0."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)  # an all-masked row: NaN -> 0
    return torch.einsum("bhqk,bkhd->bqhd", probs, v).flatten(2)


def transformer_block(x, sd, prefix, heads, kv_heads, mask, a):
    """Pre-norm self-attention (RoPE, GQA repeating each kv head for consecutive query heads)
    and SwiGLU. `x [B, S, D]`, `mask [B, S, S]`."""
    b, s, _ = x.shape
    h = rms_norm(x, sd[prefix + "attention_norm.weight"], a["norm_eps"])
    q = (h @ sd[prefix + "attention.wq.weight"].T).view(b, s, heads, -1)
    k = (h @ sd[prefix + "attention.wk.weight"].T).view(b, s, kv_heads, -1)
    v = (h @ sd[prefix + "attention.wv.weight"].T).view(b, s, kv_heads, -1)
    q, k = rotate(q, a["rope_theta"]), rotate(k, a["rope_theta"])
    k, v = (t.repeat_interleave(heads // kv_heads, dim=2) for t in (k, v))
    x = x + attend(q, k, v, mask) @ sd[prefix + "attention.wo.weight"].T
    h = rms_norm(x, sd[prefix + "ffn_norm.weight"], a["norm_eps"])
    gate, up = h @ sd[prefix + "feed_forward.w1.weight"].T, h @ sd[prefix + "feed_forward.w3.weight"].T
    return x + (F.silu(gate) * up) @ sd[prefix + "feed_forward.w2.weight"].T


def cross_attention_update(x, kv, sd, prefix, heads, mask, a):
    """The reference's cross-attention returns `x + out` and its caller adds `x` once more:
    `2 * x + Wo(attn(norm_q(x), norm_kv(kv)))`, no RoPE. `x [B, Sq, D]`, `kv [B, Sk, D]`."""
    b = x.shape[0]
    qn = rms_norm(x, sd[prefix + "cross_attn_norm_q.weight"], a["norm_eps"])
    kvn = rms_norm(kv, sd[prefix + "cross_attn_norm_kv.weight"], a["norm_eps"])
    q = (qn @ sd[prefix + "wq.weight"].T).view(b, x.shape[1], heads, -1)
    k = (kvn @ sd[prefix + "wk.weight"].T).view(b, kv.shape[1], heads, -1)
    v = (kvn @ sd[prefix + "wv.weight"].T).view(b, kv.shape[1], heads, -1)
    return 2 * x + attend(q, k, v, mask) @ sd[prefix + "wo.weight"].T


# ----------------------------------------------------------------------------- masks


def patch_ids(patch_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """`[B, seq_len]`: the last patch whose exclusive cumulative start is <= the position."""
    starts = F.pad(patch_lengths.cumsum(-1), (1, 0))  # [B, P + 1]
    return (starts[:, :, None] <= torch.arange(seq_len)).sum(1) - 1


def document_ids(is_eos: torch.Tensor) -> torch.Tensor:
    """`[B, S]`: how many EOS come strictly before each position (a document ends at its EOS)."""
    return is_eos.long().cumsum(-1) - is_eos.long()


def self_attention_mask(doc: torch.Tensor, window: int | None) -> torch.Tensor:
    """`[B, S, S]` causal, within the same document (`doc [B, S]`: document ids, all equal for
    rows that are one sequence), and over the last `window` positions (itself included) when a
    window is given."""
    seq = doc.shape[1]
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    mask = (j <= i)[None].expand(doc.shape[0], -1, -1)
    if window is not None:
        mask = mask & (i - j < window)
    return mask & (doc[:, :, None] == doc[:, None, :])


def patch_window_mask(query_patch, key_patch, window):
    """`query_patch [B, Sq]`, `key_patch [B, Sk]` -> `[B, Sq, Sk]`: a query of patch q sees a key
    of patch p iff `p <= q < p + window` (`p == q` without a window). Encoder: queries are slots,
    keys tokens (encoder patch ids); decoder: queries are tokens (decoder patch ids), keys slots."""
    q, k = query_patch[:, :, None], key_patch[:, None, :]
    return q == k if window is None else (k <= q) & (q < k + window)


def pool(h: torch.Tensor, patch: torch.Tensor, num_patches: int, mode: str) -> torch.Tensor:
    """`h [B, N, D]` pooled per patch -> `[B, P, D * kinds]`; 0 for an empty patch. As the
    reference, by each kind named inside the string `mode`, in this order: mean ("avg" or
    "mean" in it), min ("min"), max ("max"), concatenated (so "max_pool" is max pooling, and
    "minmax" two pools, which its patch projection then refuses)."""
    kinds = [reduce for names, reduce in ((("avg", "mean"), "mean"), (("min",), "amin"),
                                          (("max",), "amax"))
             if any(name in mode for name in names)]
    assert kinds, f"the reference pools by none of {mode!r}"
    index = patch[:, :, None].expand_as(h)
    out = torch.zeros(h.shape[0], num_patches, h.shape[2], dtype=h.dtype)
    return torch.cat([out.scatter_reduce(1, index, h, reduce=reduce, include_self=False)
                      for reduce in kinds], dim=-1)


def global_documents(tokens, enc_patch, num_patches, a) -> torch.Tensor:
    """`[B, P]` document of each patch for the global mask. With "xformers" and "block_causal" the
    reference gives each patch a global token: its fixed EOS id 2 where the patch holds token 2,
    else its BOE id 0; a global token equal to `eos_id` ends its document. Otherwise one
    document per row."""
    b = tokens.shape[0]
    if a["attn_impl"] != "xformers" or a["attn_bias_type"] != "block_causal":
        return torch.zeros(b, num_patches, dtype=torch.long)
    global_tokens = torch.full((b, num_patches), BOE_ID)
    rows, cols = torch.where(tokens == EOS_ID)
    global_tokens[rows, enc_patch[rows, cols]] = EOS_ID
    return document_ids(global_tokens == a["eos_id"])


# ----------------------------------------------------------------------------- the model


def reference_logits(model_args: dict, sd: dict[str, torch.Tensor], tokens: torch.Tensor,
                     patch_lengths: torch.Tensor) -> torch.Tensor:
    """Logits `[B, N, V]` (fp32) of `tokens [B, N]` with `patch_lengths [B, P]`."""
    a = _args(model_args)
    sd = {name: t.float() for name, t in sd.items()}
    b, n = tokens.shape
    longest = a.get("max_encoder_seq_length")
    if longest is not None and n > longest:
        # its local RoPE tables hold max_encoder_seq_length positions: its shape assert fails
        raise ValueError(f"rows of {n} tokens: the reference runs rows of at most "
                         f"max_encoder_seq_length {longest} tokens")
    num_patches, k = patch_lengths.shape[1], a["cross_attn_k"]
    de, dd = a["dim_local_encoder"], a["dim_local_decoder"]
    xformers = a["attn_impl"] == "xformers"
    is_eos = tokens == a["eos_id"]
    # Local self-attention: "xformers" stops at EOS and slides a window; the others are causal.
    local_doc = document_ids(is_eos) if xformers else torch.zeros_like(tokens)
    local_mask = self_attention_mask(local_doc, a["local_attention_window_len"] if xformers else None)
    enc_patch = patch_ids(patch_lengths, n)  # [B, N]
    dec_patch = patch_ids(patch_lengths[:, 1:], n)  # [B, N]
    slot_patch = torch.arange(num_patches * k).div(k, rounding_mode="floor").expand(b, -1)  # [B, P*k]

    # Local encoder: token states, and patch slots updated after each (or the last) layer.
    h = sd["local_encoder.tok_embeddings.weight"][tokens]  # [B, N, De]
    slots = None
    enc_cross = patch_window_mask(slot_patch, enc_patch, a["cross_attn_window_encoder"])  # [B, P*k, N]
    layers = a["n_layers_local_encoder"]
    for i in range(layers):
        heads = a["n_heads_local_encoder"]
        h = transformer_block(h, sd, f"local_encoder.layers.{i}.", heads,
                              _local_kv_heads(heads, a), local_mask, a)
        if i == layers - 1 or a["cross_attn_all_layers_encoder"]:
            if slots is None:
                pooled = pool(h, enc_patch, num_patches, a["downsampling_by_pooling"])  # [B, P, De]
                slots = (pooled @ sd["local_encoder.patch_embedding_projection.weight"].T).reshape(b, -1, de)
            index = i if a["cross_attn_all_layers_encoder"] else 0
            slots = cross_attention_update(slots, h, sd, f"local_encoder.cross_attn_layers.{index}.",
                                           a["cross_attn_nheads"], enc_cross, a)

    # Global transformer over patches: k slots concatenated, projected when k*De != Dg.
    g = slots.reshape(b, num_patches, k * de)  # [B, P, k*De]
    if "global_transformer.token_embedding_projection.weight" in sd:
        g = g @ sd["global_transformer.token_embedding_projection.weight"].T  # [B, P, Dg]
    global_mask = self_attention_mask(global_documents(tokens, enc_patch, num_patches, a), None)
    heads = a["n_heads_global"]
    for i in range(a["n_layers_global"]):
        g = transformer_block(g, sd, f"global_transformer.layers.{i}.", heads,
                              a["n_kv_heads_global"] or heads, global_mask, a)

    # Local decoder: encoder states cross-attend the projected global slots, then self-attend.
    kv = g  # [B, P, Dg]: read as it is when Dg == Dd (then k == 1)
    if "local_decoder.patch_embedding_projection.weight" in sd:
        kv = g @ sd["local_decoder.patch_embedding_projection.weight"].T  # [B, P, k*width]
        kv = kv.reshape(b, num_patches * k, dd)  # as the reference: fails unless width == Dd
    dec_cross = patch_window_mask(dec_patch, slot_patch, a["cross_attn_window_decoder"])  # [B, N, P*k]
    for i in range(a["n_layers_local_decoder"]):
        if i == 0 or a["cross_attn_all_layers_decoder"]:
            h = cross_attention_update(h, kv, sd, f"local_decoder.cross_attn_layers.{i}.",
                                       a["cross_attn_nheads"], dec_cross, a)
        heads = a["n_heads_local_decoder"]
        h = transformer_block(h, sd, f"local_decoder.layers.{i}.", heads,
                              _local_kv_heads(heads, a), local_mask, a)
    h = rms_norm(h, sd["local_decoder.norm.weight"], a["norm_eps"])
    return (h @ sd["local_decoder.output.weight"].T).float()
