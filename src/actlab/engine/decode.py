"""A batch-1 greedy decode engine for any supported architecture, dense or under a recipe the plan lowers.

Prefill runs the unmodified HF model once over the prompt (with the recipe attached, so it is exactly the
masked reference) and copies its key/value cache into a preallocated one. Under a KV recipe that evicts tokens
the cache is ragged (`RaggedCache`): each KV head holds only the tokens it keeps, in rows of its own, so the
memory and the attention a step reads shrink with the budget (a dense HF cache must hold every head's longest).
Each decoded token then goes through a hand-written loop over the adapter's parts: the model's own norms,
activation and rotary tables,
our GEMV kernels for every projection (float32, or a quant recipe's codes), attention over the preallocated
cache, and the exact-argmax LM head. Per token this is a few dozen small tensor operations per layer and no HF
module machinery.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field

import torch

from actlab.engine.kernels import load_kernels
from actlab.engine.linear import ActSparseMLP, EngineLinear
from actlab.engine.lm_head import ExactArgmaxHead
from actlab.engine.plan import EnginePlan
from actlab.engine.quantized import DequantizedView, QuantLinear, quant_kernels, warn_without_kernels
from actlab.errors import ConfigError
from actlab.models.adapter import LinearView
from actlab.models.compat import output_cache
from actlab.models.keys import MLP_ROLES, layer_key, projection_key
from actlab.models.loader import LoadedModel
from actlab.probe.edit import ForwardContext
from actlab.transforms.compose import attach
from actlab.transforms.kv.h2o import H2O, heavy_hitter_victims
from actlab.transforms.quant.recipe import HEAD, effective_weight
from actlab.transforms.sparsity.budget import effective_sparsity, projection_params

NO_ROPE = torch.empty(0)


def direct(module):
    """A module's forward without nn.Module's call machinery (hooks are not used in the decode loop)."""
    return module.forward if isinstance(module, torch.nn.Module) else module


def identity(x):
    return x


def _repair_fn(repair):
    """A removed part's repair as a function of one token's vector, or None."""
    if repair is None:
        return None
    from actlab.transforms.layers.repair import PreparedRepair

    return PreparedRepair(repair)


def rotate_part(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of the leading cos.shape[-1] channels of each head of x [heads, head_dim] (HF's
    rotate_half convention); the other channels pass through."""
    r = cos.shape[-1]
    turned, rest = x[..., :r], x[..., r:]
    half = torch.cat([-turned[..., r // 2 :], turned[..., : r // 2]], dim=-1)
    return torch.cat([turned * cos + half * sin, rest], dim=-1)


def fused_norm(norm, width: int, kernels):
    """The model's norm as one kernel call when it is an RMSNorm - x * rsqrt(mean(x^2) + eps) * w, or
    * (1 + w) as in Gemma - which is checked numerically on random inputs; otherwise the module itself
    (LayerNorm, or anything unusual); no norm at all (None) is the identity. Per-op dispatch, not arithmetic,
    is what a norm costs at batch 1."""
    if norm is None:
        return identity
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    weight = getattr(norm, "weight", None)
    if norm is None or eps is None or weight is None or tuple(weight.shape) != (width,):
        return direct(norm)
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        reference = norm(x).float()
        for w in (weight.detach().float().contiguous(), (1.0 + weight.detach().float()).contiguous()):
            fn = (lambda h, w=w, e=float(eps): kernels.rms_norm(h, w, e))
            if torch.allclose(fn(x), reference, rtol=1e-5, atol=1e-5):
                return fn
    return direct(norm)


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature >= 0:
        raise ConfigError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"top_k must be a non-negative integer (0: no limit), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")


def sample(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """One token from softmax(logits / temperature), limited to the top_k most likely tokens and then to the
    smallest set whose probability reaches top_p (the nucleus; the most likely token is always kept)."""
    scaled = logits.double() / temperature
    if top_k:
        kth = torch.topk(scaled, min(top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1:
        order = torch.argsort(scaled, descending=True)
        probs = torch.softmax(scaled[order], 0)
        before = torch.cumsum(probs, 0) - probs  # mass of the tokens ranked above each one
        scaled[order[before >= top_p]] = float("-inf")
    return int(torch.multinomial(torch.softmax(scaled, 0), 1, generator=generator))


def eos_ids(lm) -> set[int]:
    """The model's end-of-sequence token ids (generation config and tokenizer)."""
    ids: set[int] = set()
    for source in (getattr(lm.model, "generation_config", None), lm.model.config, lm.tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    return ids


@dataclass
class EngineLayer:
    index: int
    attn_norm: object
    mlp_norm: object
    projections: dict[str, EngineLinear]
    mlp: object  # callable x -> mlp output
    scaling: float
    window: int | None
    q_norm: object = None
    k_norm: object = None
    attn_post_norm: object = None
    mlp_post_norm: object = None
    softcap: float | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [positions, head_dim]
    slot: int = -1  # this layer's place in the engine's KV cache (-1: its attention was removed)
    attention: bool = True  # False: the attention sublayer was removed (no projections, no KV cache)
    feed_forward: bool = True  # False: the MLP sublayer was removed
    # repairs of removed parts (transforms/layers/repair.py): x -> what the part's output is replaced by
    attn_repair: object = None  # of the normed attention input
    mlp_repair: object = None  # of the normed MLP input
    block_repair: object = None  # of the block's input (the whole block removed: h + g(h))


@dataclass
class RaggedCache:
    """One layer's KV cache when heads keep different tokens: head h holds lens[h] tokens in rows
    [offsets[h], offsets[h] + lens[h]) of k / v (at most caps[h]), their absolute positions in `positions`."""

    k: torch.Tensor  # [rows, head_dim]
    v: torch.Tensor
    positions: torch.Tensor  # [rows] int64
    offsets: torch.Tensor  # [kv] int64
    lens: torch.Tensor  # [kv] int64
    caps: torch.Tensor  # [kv] int64
    state: object = None  # the session's LayerCache (which positions each head holds), for eviction while decoding
    acc: torch.Tensor | None = None  # [rows]: H2O's running score of each row's token, for eviction in row space

    @classmethod
    def holding(cls, k: torch.Tensor, v: torch.Tensor, first: int, held: torch.Tensor, caps: list[int]) -> RaggedCache:
        """The cache of the tokens `held` [kv, t] marks among k, v [kv, t, d] (positions first..first+t-1)."""
        kv, _, d = k.shape
        offsets = torch.tensor([0, *caps[:-1]], dtype=torch.long).cumsum(0)
        rows = sum(caps)
        out = cls(torch.zeros(rows, d), torch.zeros(rows, d), torch.full((rows,), -1, dtype=torch.long), offsets,
                  torch.zeros(kv, dtype=torch.long), torch.tensor(caps, dtype=torch.long))
        for h in range(kv):
            index = held[h].nonzero().flatten()
            n, o = len(index), int(offsets[h])
            out.k[o:o + n], out.v[o:o + n] = k[h, index].float(), v[h, index].float()
            out.positions[o:o + n] = index + first
            out.lens[h] = n
        return out

    def drop(self, alive: torch.Tensor, lo: int) -> None:
        """Remove every row whose position (at or after `lo`) `alive` [kv, positions] no longer holds."""
        for h in range(len(self.lens)):
            o, n = int(self.offsets[h]), int(self.lens[h])
            pos = self.positions[o:o + n]
            keep = ((pos < lo) | alive[h, pos.clamp(min=0)]).nonzero().flatten()
            if len(keep) < n:
                self._keep_rows(h, keep)

    def remove(self, h: int, rows: torch.Tensor) -> None:
        """Remove head h's rows `rows` (distinct indices among its own): the head's last rows move into the holes,
        so a step that evicts one token moves one row (attention does not depend on the rows' order)."""
        o, n, k = int(self.offsets[h]), int(self.lens[h]), len(rows)
        if k == 1:  # the usual step: one row, moved without index tensors
            hole, last = o + int(rows[0]), o + n - 1
            for t in (self.k, self.v, self.positions, self.acc):
                if t is not None and hole != last:
                    t[hole] = t[last]
            self.lens[h] = n - 1
            return
        gone = torch.zeros(n, dtype=torch.bool)
        gone[rows] = True
        tail = torch.arange(n - k, n)
        holes, fillers = o + rows[rows < n - k], o + tail[~gone[n - k:]]
        for t in (self.k, self.v, self.positions, self.acc):
            if t is not None:
                t[holes] = t[fillers]
        self.lens[h] = n - k

    def _keep_rows(self, h: int, keep: torch.Tensor) -> None:
        """Head h keeps only its rows `keep` (indices among its own, ascending), moved to the front in order."""
        o, m = int(self.offsets[h]), len(keep)
        for rows in (self.k, self.v, self.positions, self.acc):
            if rows is not None:
                rows[o:o + m] = rows[o + keep]  # a gather copies first: the rows may overlap their sources
        self.lens[h] = m

    def held(self) -> int:
        return int(self.lens.sum())

    def position_space(self, lo: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [1, kv, end - lo, d] by position (zeros where a head holds nothing)."""
        kv, d = len(self.lens), self.k.shape[1]
        keys, values = torch.zeros(1, kv, end - lo, d), torch.zeros(1, kv, end - lo, d)
        for h in range(kv):
            o, n = int(self.offsets[h]), int(self.lens[h])
            pos = self.positions[o:o + n]
            inside = ((pos >= lo) & (pos < end)).nonzero().flatten()
            keys[0, h, pos[inside] - lo] = self.k[o + inside]
            values[0, h, pos[inside] - lo] = self.v[o + inside]
        return keys, values


@dataclass
class GenerationStats:
    tokens: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tok_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 and len(self.tokens) > 1 else float("nan")


class DecodeEngine:
    """Greedy batch-1 decoding of `lm`, dense or under `recipe` (any recipe the engine plan can lower: sparsity
    rules, removed blocks and sublayers, and compositions of them)."""

    def __init__(self, lm: LoadedModel, recipe=None, max_len: int = 2048, native: bool = True):
        if lm.device.type != "cpu":
            raise ConfigError("the decode engine's kernels are CPU kernels; load the model on the CPU")
        lm.adapter.refuse_moe("the decode engine")
        self.plan = EnginePlan.lower(lm, recipe)
        self.lm, self.recipe = lm, recipe
        ad = lm.adapter
        self.kernels = load_kernels(native)
        self.qkernels = quant_kernels() if native and self.plan.quant else None
        self._warned = False
        self.max_len = min(max_len, ad.max_context or max_len)
        self.num_heads, self.num_kv, self.head_dim = ad.num_heads, ad.num_kv_heads, ad.head_dim
        self.q_prescaled = ad.spec.q_prescaled
        self.qk_norm_per_head = ad.spec.qk_norm_per_head
        self.qkv_by_head = ad.spec.qkv_layout == "heads"
        self.parallel_residual = ad.parallel_residual
        # the kernel turns whole heads; a partial rotary embedding (GPT-NeoX, some Phi-3) is applied here
        self.partial_rope = ad.rotary is not None and ad.rotary_dim < ad.head_dim
        rules, _bias, plan = self.plan.rules, self.plan.bias, self.plan
        rope = self._rope_tables()
        self.layers: list[EngineLayer] = []
        with torch.no_grad():
            for layer in ad.layers:
                i = layer.index
                if i in plan.skip_blocks:
                    if layer_key(i) in plan.repairs:
                        self.layers.append(EngineLayer(index=i, attn_norm=identity, mlp_norm=identity, projections={},
                                                       mlp=None, scaling=1.0, window=None, attention=False,
                                                       feed_forward=False,
                                                       block_repair=_repair_fn(plan.repairs[layer_key(i)])))
                    continue
                attention, feed_forward = i not in plan.skip_attn, i not in plan.skip_mlp
                act_rule = rules.get(projection_key(i, "down"))
                act_sparse = act_rule is not None and act_rule.source == "act"
                kept = {role for role in layer.linears if (feed_forward if role in MLP_ROLES else attention)}
                proj = {role: self._projection(view, projection_key(i, role))
                        for role, view in layer.linears.items()
                        if role in kept and not (act_sparse and role in ("up", "down"))}
                if not feed_forward:
                    mlp = None
                elif act_sparse:
                    up = layer.linears.get("up")
                    mlp = ActSparseMLP(proj["gate"], up and self._dequantized(up, projection_key(i, "up")),
                                       self._dequantized(layer.linears["down"], projection_key(i, "down")),
                                       layer.act_fn, act_rule, self.kernels)
                elif layer.gated_mlp:
                    mlp = (lambda x, p=proj, act=direct(layer.act_fn): p["down"](act(p["gate"](x)) * p["up"](x)))
                else:
                    mlp = (lambda x, p=proj, act=direct(layer.act_fn): p["down"](act(p["gate"](x))))
                d, hd = ad.hidden_size, self.head_dim
                per_head = ad.spec.qk_norm_per_head
                q_width, k_width = (hd, hd) if per_head else (self.num_heads * hd, self.num_kv * hd)
                self.layers.append(EngineLayer(
                    index=i, attn_norm=fused_norm(layer.attn_norm, d, self.kernels),
                    mlp_norm=fused_norm(layer.mlp_norm, d, self.kernels), projections=proj, mlp=mlp,
                    scaling=float(getattr(layer.attn, "scaling", self.head_dim**-0.5)),
                    window=ad.sliding_window(layer),
                    q_norm=None if layer.q_norm is None else fused_norm(layer.q_norm, q_width, self.kernels),
                    k_norm=None if layer.k_norm is None else fused_norm(layer.k_norm, k_width, self.kernels),
                    attn_post_norm=fused_norm(layer.attn_post_norm, d, self.kernels),
                    mlp_post_norm=fused_norm(layer.mlp_post_norm, d, self.kernels),
                    softcap=getattr(layer.attn, "attn_logit_softcapping", None), rope=rope[i] if rope else None,
                    slot=sum(x.attention for x in self.layers) if attention else -1, attention=attention,
                    feed_forward=feed_forward, attn_repair=_repair_fn(plan.repairs.get(f"{layer_key(i)}.attn")),
                    mlp_repair=_repair_fn(plan.repairs.get(f"{layer_key(i)}.mlp"))))
            self.final_norm = fused_norm(ad.final_norm, ad.hidden_size, self.kernels)
            head = self._dequantized(LinearView(HEAD, ad.lm_head), HEAD).weight()
            self.head = ExactArgmaxHead(head, getattr(ad.lm_head, "bias", None), self.kernels)
            self.pos_table = None if ad.pos_embed is None else ad.pos_embed.weight.detach().float()
        self.kv = self.plan.kv
        self.ragged: list[RaggedCache] = []
        self.kv_session = None
        if self.kv is not None:  # a standalone session: the masked reference's eviction rule, run while decoding
            from actlab.transforms.kv.session import KVSession

            self.kv_session = KVSession(lm, "sdpa").add(self.kv)
            self.k_cache = self.v_cache = torch.zeros(0)
        else:
            shape = (sum(x.attention for x in self.layers), self.num_kv, self.max_len, self.head_dim)
            self.k_cache = torch.zeros(shape)
            self.v_cache = torch.zeros(shape)

    # -- setup ---------------------------------------------------------------------------------
    def _projection(self, view: LinearView, key: str) -> EngineLinear:
        rule, bias = self.plan.rules.get(key), self.plan.bias.get(key)
        if key not in self.plan.quant:
            return EngineLinear(view, rule, self.kernels, bias)
        if self.qkernels is None and not self._warned:
            warn_without_kernels()
            self._warned = True
        return QuantLinear(view, rule, self.kernels, self.plan.quant[key], self.qkernels, bias)

    def _dequantized(self, view: LinearView, key: str):
        """`view`, or under a quant recipe a view of its dequantized weights (the float32 paths: act rules, head)."""
        return view if key not in self.plan.quant else DequantizedView(view, effective_weight(self.plan.quant[key]))

    def _rope_tables(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        ad = self.lm.adapter
        if ad.rotary is None:
            return None
        positions = torch.arange(self.max_len)[None]
        probe = torch.zeros(1, 1, self.head_dim)
        takes_type = "layer_type" in inspect.signature(ad.rotary.forward).parameters
        types = getattr(ad.config, "layer_types", None) or ["full_attention"] * ad.num_layers
        tables = {}
        with torch.no_grad():
            for kind in set(types):
                cos, sin = ad.rotary(probe, positions, kind) if takes_type else ad.rotary(probe, positions)
                tables[kind] = (cos[0].float().contiguous(), sin[0].float().contiguous())
        return [tables[types[i]] for i in range(ad.num_layers)]

    # -- prefill -------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: list[int]) -> int:
        if len(ids) >= self.max_len:
            raise ConfigError(f"prompt of {len(ids)} tokens does not fit the engine's {self.max_len} positions")
        ctx = attach(self.lm, self.recipe) if self.recipe is not None else contextlib.nullcontext()
        with ctx:
            out = self.lm.model(input_ids=torch.tensor([ids]), use_cache=True)
            states = self._kv_states() if self.kv is not None else None
        self.last_logits = out.logits[0, -1].float()  # for sampling the first new token
        cache = output_cache(out)
        if states is not None:
            self._fill_ragged(cache, states, len(ids))
            return int(out.logits[0, -1].argmax())
        for layer in self.layers:
            if not layer.attention:
                continue
            entry = cache.layers[layer.index]
            k, v = entry.keys[0], entry.values[0]  # [kv, t, d] (t may be a window)
            t = k.shape[1]
            self.k_cache[layer.slot, :, len(ids) - t : len(ids)] = k.float()
            self.v_cache[layer.slot, :, len(ids) - t : len(ids)] = v.float()
        return int(out.logits[0, -1].argmax())

    def _kv_states(self) -> dict:
        from actlab.transforms.kv.session import SESSION

        return self.lm.adapter.layers[0].attn.__dict__[SESSION].layers

    def _fill_ragged(self, cache, states: dict, end: int) -> None:
        """The ragged cache of what the prefill kept: each head's tokens, room for the tokens still to come (at
        most a sliding window's worth; under decode-phase eviction at most its budget at the last position)."""
        from actlab.transforms.kv.budgets import keep_counts

        room = self.max_len - end
        self.ragged = []
        for layer in self.layers:
            if not layer.attention:
                continue
            entry, state = cache.layers[layer.index], states[layer.index]
            k, v = entry.keys[0], entry.values[0]  # [kv, t, d]: the last t positions
            t = k.shape[1]
            held = state.alive[0, :, end - t:end]
            caps = [int(n) + room for n in held.sum(-1)]
            if self.kv.phase == "decode":
                budget = keep_counts(self.kv_session.ratios[layer.index], self.max_len)
                caps = [min(c, int(b) + 1) for c, b in zip(caps, budget)]
            if layer.window is not None:
                caps = [min(c, max(layer.window, int(n))) for c, n in zip(caps, held.sum(-1))]
            ragged = RaggedCache.holding(k, v, end - t, held, caps)
            if self.kv.phase == "decode" and isinstance(self.kv_session.press, H2O):
                ragged.acc = torch.zeros(ragged.k.shape[0])  # H2O's running scores move into the rows
                for h in range(len(ragged.lens)):
                    o, n = int(ragged.offsets[h]), int(ragged.lens[h])
                    ragged.acc[o:o + n] = state.accumulated[0, h, ragged.positions[o:o + n]]
            elif self.kv.phase == "decode":
                state.alive, state.fresh = state.alive[:1].clone(), False
                ragged.state = state
                self.kv_session.layers[layer.index] = state
            self.ragged.append(ragged)

    # -- one token -----------------------------------------------------------------------------
    def _embed(self, token: int, pos: int) -> torch.Tensor:
        h = self.lm.adapter.embed(torch.tensor([token]))[0].float()
        if self.pos_table is not None:
            h = h + self.pos_table[pos + self.lm.adapter.spec.pos_offset]
        return h

    def _attention(self, layer: EngineLayer, x: torch.Tensor, pos: int) -> torch.Tensor:
        p = layer.projections
        if "qkv" in p and self.qkv_by_head:  # [q_h; k_h; v_h] head after head
            q, k, v = (t.reshape(-1) for t in p["qkv"](x).view(self.num_heads, 3, self.head_dim).unbind(1))
        elif "qkv" in p:
            q, k, v = p["qkv"](x).split([self.num_heads * self.head_dim, self.num_kv * self.head_dim,
                                         self.num_kv * self.head_dim])
        else:
            q, k, v = p["q"](x), p["k"](x), p["v"](x)
        if layer.q_norm is not None and not self.qk_norm_per_head:  # OLMo-2: over the whole projection
            q, k = layer.q_norm(q), layer.k_norm(k)
        q = q.view(self.num_heads, self.head_dim)
        k = k.view(self.num_kv, self.head_dim)
        if self.q_prescaled:
            q = q * layer.scaling
        if layer.q_norm is not None and self.qk_norm_per_head:
            q, k = layer.q_norm(q), layer.k_norm(k)
        cos, sin = (layer.rope[0][pos], layer.rope[1][pos]) if layer.rope is not None else (NO_ROPE, NO_ROPE)
        if self.partial_rope:
            q, k, cos, sin = rotate_part(q, cos, sin), rotate_part(k, cos, sin), NO_ROPE, NO_ROPE
        scaling = 1.0 if self.q_prescaled else layer.scaling
        if self.kv is not None:
            r = self.ragged[layer.slot]
            out = self.kernels.ragged_attention(q, k, v.view(self.num_kv, self.head_dim), r.k, r.v, r.positions,
                                                r.offsets, r.lens, r.caps, pos, layer.window or 0, cos, sin, scaling,
                                                layer.softcap or 0.0)
            if r.acc is not None:
                self._evict_heavy_hitters(layer, r, q, cos, sin, scaling, pos)
            elif r.state is not None:
                self._evict(layer, r, q, cos, sin, scaling, pos)
        else:
            start = 0 if layer.window is None else max(0, pos + 1 - layer.window)
            out = self.kernels.decode_attention(q, k, v.view(self.num_kv, self.head_dim), self.k_cache[layer.slot],
                                                self.v_cache[layer.slot], pos, start, cos, sin, scaling,
                                                layer.softcap or 0.0)
        o = p["o"](out)
        return o if layer.attn_post_norm is None else layer.attn_post_norm(o)

    def _evict(self, layer: EngineLayer, r: RaggedCache, q: torch.Tensor, cos, sin, scaling: float, pos: int) -> None:
        """Decode-phase eviction: the session's rule (what the masked reference does after this forward), on this
        layer's cache laid out by position; the rows of evicted tokens are freed."""
        from actlab.engine.kernels import rotate_half

        if cos.numel():
            q = q * cos + rotate_half(q) * sin
        end = pos + 1
        span = end if layer.window is None else min(end, layer.window)  # what this query could see
        keys, values = r.position_space(end - span, end)
        session = self.kv_session
        state = session._advance(layer.index, 1, 1, span, torch.tensor([[pos]]))
        session.compress_layer(layer.index, state, q.view(1, self.num_heads, 1, self.head_dim), keys, values,
                               scaling, layer.softcap)
        r.drop(state.alive[0], end - span)

    def _evict_heavy_hitters(self, layer: EngineLayer, r: RaggedCache, q: torch.Tensor, cos, sin, scaling: float,
                             pos: int) -> None:
        """H2O's decode-phase eviction on the rows themselves: what `_evict` decides through the position layout,
        without rebuilding that layout every step (a step's cost then follows the budget, not the context). Each
        head adds the attention its query heads paid this step to its tokens' running scores, then evicts down to
        its budget for the tokens the next query sees."""
        from actlab.engine.kernels import rotate_half
        from actlab.transforms.kv.budgets import keep_counts, visible_tokens

        if cos.numel():
            q = q * cos + rotate_half(q) * sin
        end = pos + 1
        seen_from = 0 if layer.window is None else end - layer.window  # what this step's query saw
        lo = end - visible_tokens(end, layer.window)  # what the next one will see
        keep = keep_counts(self.kv_session.ratios[layer.index], end - lo)
        recent = self.kv_session.press.recent
        queries = q.view(self.num_kv, self.num_heads // self.num_kv, self.head_dim)
        for h in range(self.num_kv):
            o, n = int(r.offsets[h]), int(r.lens[h])
            positions, acc = r.positions[o:o + n], r.acc[o:o + n]
            acc[positions == pos] = 0.0  # the new token's row (perhaps one a sliding window no longer sees)
            logits = (r.k[o:o + n] @ queries[h].T) * scaling  # [n, query heads of this KV head]
            if layer.softcap:
                logits = layer.softcap * torch.tanh(logits / layer.softcap)
            if seen_from > 0:
                logits = logits.masked_fill((positions < seen_from)[:, None], float("-inf"))
            acc += logits.softmax(0).mean(1)
            if lo == 0:  # every row is visible
                victims = heavy_hitter_victims(acc, positions, int(keep[h]), recent)
            else:
                visible = (positions >= lo).nonzero().flatten()
                victims = visible[heavy_hitter_victims(acc[visible], positions[visible], int(keep[h]), recent)]
            if len(victims):
                r.remove(h, victims)

    @torch.no_grad()
    def step(self, token: int, pos: int) -> int:
        """The greedy next token after `token` at position `pos` (exact argmax through the int8 head)."""
        return self.head.argmax(self.final_norm(self._hidden(token, pos)))

    @torch.no_grad()
    def step_logits(self, token: int, pos: int) -> torch.Tensor:
        """The full float32 next-token logits after `token` at `pos` (as the HF model computes them)."""
        h = self.final_norm(self._hidden(token, pos))
        logits = self.head.weight.mv(h)
        if self.head.bias is not None:
            logits = logits + self.head.bias
        cap = getattr(self.lm.model.config, "final_logit_softcapping", None)
        return logits if not cap else torch.tanh(logits / cap) * cap

    def _residual_edits(self, h: torch.Tensor, layer: int, kind: str, pos: int) -> torch.Tensor:
        """The intervention recipe's edits of the residual stream (one token: a call of 1 token at `pos`)."""
        edits = self.plan.resid_edits.get((layer, kind))
        if not edits:
            return h
        x, ctx = h.view(1, 1, -1), ForwardContext(batch=1, tokens=1, offset=pos)
        for edit, site in edits:
            x = edit.apply(x, site, ctx)
        return x.reshape(-1).float()

    def _hidden(self, token: int, pos: int) -> torch.Tensor:
        h = self._embed(token, pos)
        for layer in self.layers:
            h = self._residual_edits(h, layer.index, "resid_in", pos)
            h = self._block(layer, h, pos)
            h = self._residual_edits(h, layer.index, "resid_out", pos)
        return h

    def _block(self, layer: EngineLayer, h: torch.Tensor, pos: int) -> torch.Tensor:
        if layer.block_repair is not None:
            return h + layer.block_repair(h)
        x = h  # a parallel residual feeds both sublayers the block's input
        if layer.attention:
            h = h + self._attention(layer, layer.attn_norm(h), pos)
        elif layer.attn_repair is not None:
            a = layer.attn_repair(layer.attn_norm(h))
            h = h + (a if layer.attn_post_norm is None else layer.attn_post_norm(a))
        if layer.feed_forward or layer.mlp_repair is not None:
            u = layer.mlp_norm(x if self.parallel_residual else h)
            m = layer.mlp(u) if layer.feed_forward else layer.mlp_repair(u)
            h = h + (m if layer.mlp_post_norm is None else layer.mlp_post_norm(m))
        return h

    def generate(self, ids: list[int], max_new_tokens: int) -> GenerationStats:
        """Greedy decoding; stats.tokens are the new tokens."""
        if len(ids) + max_new_tokens > self.max_len:
            raise ConfigError(f"prompt + new tokens exceed the engine's {self.max_len} positions")
        stats = GenerationStats()
        t0 = time.perf_counter()
        token = self.prefill(ids)
        stats.prefill_s = time.perf_counter() - t0
        stats.tokens.append(token)
        t1 = time.perf_counter()
        pos = len(ids)
        for _ in range(max_new_tokens - 1):
            token = self.step(token, pos)
            stats.tokens.append(token)
            pos += 1
        stats.decode_s = time.perf_counter() - t1
        return stats

    def generate_tokens(self, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                        top_p: float = 1.0, seed: int | None = None, stop: set[int] | None = None) -> list[int]:
        """New tokens after `ids`: greedy at temperature 0, else sampled from softmax(logits / temperature)
        restricted to the top_k tokens and the top_p nucleus; decoding stops after a token of `stop` (it is
        included) or `max_new_tokens`."""
        check_sampling(temperature, top_k, top_p)
        if len(ids) + max_new_tokens > self.max_len:
            raise ConfigError(f"prompt + new tokens exceed the engine's {self.max_len} positions")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        greedy = temperature == 0
        stop = stop or set()
        first = self.prefill(ids)
        token = first if greedy else sample(self.last_logits, temperature, top_k, top_p, generator)
        out = [token]
        pos = len(ids)
        while len(out) < max_new_tokens and token not in stop:
            token = self.step(token, pos) if greedy else sample(self.step_logits(token, pos), temperature, top_k,
                                                                top_p, generator)
            out.append(token)
            pos += 1
        return out

    def generate_text(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                      top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True) -> str:
        """Text in, text out: the prompt tokenized as the model's tokenizer does, the continuation decoded
        without special tokens; stops at the model's EOS token(s) unless `stop_at_eos` is False."""
        tok = self.lm.tokenizer
        ids = tok(prompt, verbose=False)["input_ids"]
        if not ids:
            raise ConfigError("the prompt is empty")
        stop = eos_ids(self.lm) if stop_at_eos else set()
        new = self.generate_tokens(ids, max_new_tokens, temperature, top_k, top_p, seed, stop)
        return tok.decode(new, skip_special_tokens=True)

    # -- accounting ----------------------------------------------------------------------------
    def reset_counters(self) -> None:
        for layer in self.layers:
            for lin in list(layer.projections.values()) + [layer.mlp]:
                if hasattr(lin, "kept"):
                    lin.kept = lin.seen = 0

    def achieved_sparsity(self) -> float:
        """Effective sparsity of the decoded tokens (same budget formula as the sparsity methods)."""
        dropped = {}
        for layer in self.layers:
            for role, lin in layer.projections.items():
                if lin.seen:
                    dropped[projection_key(layer.index, role)] = 1 - lin.kept / lin.seen
            if isinstance(layer.mlp, ActSparseMLP) and layer.mlp.seen:
                frac = 1 - layer.mlp.kept / layer.mlp.seen
                dropped[projection_key(layer.index, "down")] = frac
                if layer.mlp.w_up is not None:
                    dropped[projection_key(layer.index, "up")] = frac
        return effective_sparsity(dropped, projection_params(self.lm.adapter))

    def memory_bytes(self) -> int:
        """Bytes the engine holds: its weight layouts (shared with the model where they alias it), the LM head's
        copies and the KV cache."""
        seen: set[int] = set()

        def size(t) -> int:
            if not torch.is_tensor(t) or t.data_ptr() in seen:
                return 0
            seen.add(t.data_ptr())
            return t.numel() * t.element_size()

        total = size(self.k_cache) + size(self.v_cache) + (self.kv_cache_bytes() if self.kv is not None else 0)
        for layer in self.layers:
            for part in [*layer.projections.values(), layer.mlp]:
                total += sum(size(v) for v in vars(part).values()) if hasattr(part, "__dict__") else 0
        return total + sum(size(v) for v in vars(self.head).values())

    def kv_cache_bytes(self, held: bool = False) -> int:
        """Bytes of the KV cache: allocated (the dense cache's max_len positions, or the ragged rows), or, with
        `held`, only the tokens it holds now."""
        if self.kv is None:  # every position of every head, whatever it holds
            return self.k_cache.numel() * self.k_cache.element_size() * 2
        rows = sum(r.held() if held else r.k.shape[0] for r in self.ragged)
        return rows * self.head_dim * 4 * 2

    def weight_bytes_per_token(self, sparsity: float = 0.0) -> float:
        """Bytes of weights a decode step reads: projections at the given effective sparsity + the head."""
        linear = sum(lin.bytes_read() for layer in self.layers for lin in layer.projections.values())
        return linear * (1 - sparsity) + self.head.bytes_read()
