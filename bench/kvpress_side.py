"""kvpress's side of bench/kv_compression.py: runs with bench/.venvs/kvpress's python (kvpress and the
transformers it pins), never imported by actlab.

    python kvpress_side.py REQUEST.json RESULT.json

REQUEST: {"model_dir": an HF directory (actlab's cache of the model), "presses": [[name, ratio], ...],
"items": [{"context": [ids], "split": k, "continuation": [ids]}, ...] (scored as kvpress's pipeline reads a
context and a question: the document compressed by the press during its prefill, the question and the answer after
it at their true positions), "kept_prompt": [ids] (optional: each press's kept positions on it, per layer and KV
head, recovered by matching the compressed cache's keys to the full cache's)}.
RESULT: {"scores": {"name@ratio": [[loglikelihood, greedy], ...]}, "kept": {"name@ratio": [[[positions]]]},
"versions": {...}}.
"""

from __future__ import annotations

import json
import sys

import torch


def make_press(name: str, ratio: float):
    import kvpress

    presses = {"streaming-llm": kvpress.StreamingLLMPress, "snapkv": kvpress.SnapKVPress, "knorm": kvpress.KnormPress,
               "tova": kvpress.TOVAPress, "expected-attention": kvpress.ExpectedAttentionPress,
               "pyramidkv": kvpress.PyramidKVPress, "observed-attention": kvpress.ObservedAttentionPress}
    return presses[name](compression_ratio=ratio)


@torch.no_grad()
def score(model, press, item) -> tuple[float, bool]:
    from transformers import DynamicCache

    ids = torch.tensor([item["context"]])
    split, cont = item["split"], item["continuation"]
    cache = DynamicCache()
    with press(model):
        model(input_ids=ids[:, :split], past_key_values=cache, use_cache=True)
    rest = torch.tensor([item["context"][split:] + cont[:-1]])
    positions = torch.arange(split, split + rest.shape[1])[None]
    logits = model(input_ids=rest, past_key_values=cache, position_ids=positions, use_cache=True).logits[0].float()
    logp = torch.log_softmax(logits[-len(cont):], -1)
    targets = torch.tensor(cont)
    return float(logp[torch.arange(len(cont)), targets].sum()), bool((logp.argmax(-1) == targets).all())


@torch.no_grad()
def kept_positions(model, press, prompt: list[int]) -> list[list[list[int]]]:
    from transformers import DynamicCache

    ids = torch.tensor([prompt])
    full = DynamicCache()
    model(input_ids=ids, past_key_values=full, use_cache=True)
    squeezed = DynamicCache()
    with press(model):
        model(input_ids=ids, past_key_values=squeezed, use_cache=True)
    out = []
    for layer_full, layer_kept in zip(full.layers, squeezed.layers):
        heads = []
        for h in range(layer_full.keys.shape[1]):
            keys, kept = layer_full.keys[0, h].float(), layer_kept.keys[0, h].float()
            distance = torch.cdist(kept, keys)
            heads.append(sorted(distance.argmin(-1).tolist()))
        out.append(heads)
    return out


def main() -> None:
    import importlib.metadata as md

    from transformers import AutoModelForCausalLM

    request = json.loads(open(sys.argv[1]).read())
    torch.set_num_threads(int(request.get("threads", torch.get_num_threads())))
    model = AutoModelForCausalLM.from_pretrained(request["model_dir"], torch_dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    result = {"scores": {}, "kept": {}, "errors": {},
              "versions": {p: md.version(p) for p in ("kvpress", "transformers", "torch")}}
    for name, ratio in request["presses"]:
        key = f"{name}@{ratio:g}"
        try:
            press = make_press(name, ratio)
            if request.get("kept_prompt"):
                result["kept"][key] = kept_positions(model, press, request["kept_prompt"])
            result["scores"][key] = [score(model, press, item) for item in request.get("items", [])]
        except Exception as exc:  # a press kvpress cannot run on this model: reported, the others go on
            result["errors"][key] = f"{type(exc).__name__}: {exc}"
        print(f"kvpress {key}: done", file=sys.stderr, flush=True)
    open(sys.argv[2], "w").write(json.dumps(result))


if __name__ == "__main__":
    main()
