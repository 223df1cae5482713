"""Where LMDeploy's language model departs from the checkpoint (GPU diagnostic).

For one InternVL2 folder it prints:

- the weights LMDeploy's PyTorch engine holds after loading, against the checkpoint's tensors
  (embedding, output head, final norm, and every tensor of the first and last decoder layer,
  with InternLM2's packed ``wqkv`` unpacked as its remote code does);
- every position's logits of one text-only prompt from LMDeploy (its prompt-scoring path) and
  from the transformers model in bf16 on the same token ids: argmax agreement, correlation and
  the largest difference, position by position (position 0 sees no attention mixing, so a
  difference there is in the weights or norms, a difference only later is in attention or RoPE).

    PYTHONPATH=src python benchmarks/lmdeploy_probe.py --model M --out probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def checkpoint_tensors(model_dir: Path, names: list[str]) -> dict:
    from safetensors import safe_open

    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            for name in names:
                if name in fh.keys():
                    out[name] = fh.get_tensor(name)
    return out


def unpack_wqkv(w, heads: int, kv_heads: int):
    """InternLM2's packed wqkv ([kv_heads, q-per-kv + 2, head_dim] rows) as q, k, v rows."""
    hidden = w.shape[1]
    head_dim = w.shape[0] // (heads + 2 * kv_heads)
    g = w.reshape(kv_heads, heads // kv_heads + 2, head_dim, hidden)
    return g[:, :-2].reshape(-1, hidden), g[:, -2].reshape(-1, hidden), g[:, -1].reshape(-1, hidden)


def rel(a, b) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def compare_weights(lm, model_dir: Path, llm_cfg: dict) -> dict:
    """Relative difference of LMDeploy's loaded tensors to the checkpoint's."""
    import torch

    last = llm_cfg["num_hidden_layers"] - 1
    p = "language_model."
    names = [p + "model.tok_embeddings.weight", p + "output.weight", p + "model.norm.weight"]
    for i in (0, last):
        for t in (
            "attention.wqkv",
            "attention.wo",
            "feed_forward.w1",
            "feed_forward.w2",
            "feed_forward.w3",
            "attention_norm",
            "ffn_norm",
        ):
            names.append(f"{p}model.layers.{i}.{t}.weight")
    ck = checkpoint_tensors(model_dir, names)
    params = dict(lm.named_parameters())
    result = {}
    result["tok_embeddings"] = rel(params["model.tok_embeddings.weight"], ck[names[0]])
    result["output"] = rel(params["output.weight"], ck[names[1]])
    result["norm"] = rel(params["model.norm.weight"], ck[names[2]])
    for i in (0, last):

        def c(t, i=i):
            return ck[f"{p}model.layers.{i}.{t}.weight"]

        q = f"model.layers.{i}."
        wqkv = torch.cat(
            unpack_wqkv(c("attention.wqkv"), llm_cfg["num_attention_heads"], llm_cfg["num_key_value_heads"])
        )
        result[f"layer{i}.wqkv"] = rel(params[q + "attention.wqkv.weight"], wqkv)
        result[f"layer{i}.wo"] = rel(params[q + "attention.wo.weight"], c("attention.wo"))
        gate_up = torch.cat([c("feed_forward.w1"), c("feed_forward.w3")])
        result[f"layer{i}.gate_up"] = rel(params[q + "feed_forward.gate_up_proj.weight"], gate_up)
        result[f"layer{i}.w2"] = rel(params[q + "feed_forward.w2.weight"], c("feed_forward.w2"))
        result[f"layer{i}.attention_norm"] = rel(params[q + "attention_norm.weight"], c("attention_norm"))
        result[f"layer{i}.ffn_norm"] = rel(params[q + "ffn_norm.weight"], c("ffn_norm"))
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)

    import torch
    from transformers import AutoModel, AutoTokenizer

    from vlmtune.lmdeploy_engine import LMDeployEngine
    from vlmtune.prompt import chat_format

    cfg = json.loads((a.model / "config.json").read_text())
    llm_cfg = cfg["llm_config"]
    tok = AutoTokenizer.from_pretrained(str(a.model), trust_remote_code=True)
    prompt = chat_format(a.model).prompt("请你根据这张图片,讲一个脑洞大开的梗。", None)
    ids = tok(prompt, add_special_tokens=True).input_ids
    result: dict = dict(prompt_tokens=len(ids))

    hf = (
        AutoModel.from_pretrained(str(a.model), trust_remote_code=True, torch_dtype=torch.bfloat16)
        .cuda()
        .eval()
    )
    with torch.inference_mode():
        hf_logits = hf.language_model(input_ids=torch.tensor([ids]).cuda()).logits[0].float().cpu()
    del hf
    torch.cuda.empty_cache()

    gen = dict(max_new_tokens=1, do_sample=False, temperature=1.0, top_p=1.0, seed=0)
    runner = LMDeployEngine(a.model, gen, 4096, 4, "pytorch")
    pipe = runner.pipe
    try:
        agent = pipe.async_engine.engine.executor.model_agent
        model = agent.patched_model
        model = model.get_model() if hasattr(model, "get_model") else model
        result["lmdeploy_dtype"] = str(next(model.parameters()).dtype)
        rotary = model.language_model.model.rotary_emb
        result["lmdeploy_rotary"] = {
            k: str(v)[:200] for k, v in vars(rotary).items() if not k.startswith("_")
        }
        result["weights_rel_diff"] = compare_weights(model.language_model, a.model, llm_cfg)
    except Exception as exc:  # keep the logits comparison
        result["weights_error"] = repr(exc)
    print(json.dumps(result, indent=1), flush=True)

    lmd = pipe._run(coro=pipe.async_engine.async_get_logits(input_ids=[ids])).result()[0]
    lmd = lmd.reshape(-1, lmd.shape[-1])[: len(ids)].float().cpu()
    per_pos = []
    for i in range(len(ids)):
        x, y = lmd[i], hf_logits[i]
        per_pos.append(
            dict(
                pos=i,
                agree=bool(x.argmax() == y.argmax()),
                corr=round(float(torch.corrcoef(torch.stack([x, y]))[0, 1]), 5),
                max_abs=round(float((x - y).abs().max()), 4),
                lmd_std=round(float(x.std()), 4),
                hf_std=round(float(y.std()), 4),
            )
        )
    result["logits_by_position"] = per_pos
    result["agree"] = sum(r["agree"] for r in per_pos)
    runner.close()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    for r in per_pos[:6] + per_pos[-3:]:
        print(r)
    print(f"[probe] argmax agrees at {result['agree']}/{len(ids)} positions")


if __name__ == "__main__":
    main()
