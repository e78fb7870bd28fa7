"""Build LLaMA- and GPT-2-shaped ``hf:`` folders of random weights, shard by shard (issue 22, streaming).

A 7 B model in bf16 is about 13.5 GB on disk and 27 GB in fp32: more than this machine's memory. The
folder is therefore written one transformer block at a time: the model's skeleton is built on the
meta device (names and shapes only), each block's tensors are drawn (normal, std 0.02 as LLaMA's
init; norms at 1), written as their own safetensors shard and freed; embeddings, final norm and
head go in one more shard; ``model.safetensors.index.json`` maps every tensor to its shard, so
``AutoModelForCausalLM.from_pretrained`` and ``explorer.stream`` read it. A small byte-level BPE
tokenizer (`explorer.hf.tiny_tokenizer`, 2,000 words, pad ``<pad>``) goes beside it: the project's
text task tokenises its built-in corpus with it (ids stay below 2,000 of the model's vocabulary).

    python bench/llm_folders.py llama-7B /work/big/stream/llama-7b        # ~13.5 GB, a few minutes
    python bench/llm_folders.py gpt2-124M /work/big/stream/gpt2-124m --dtype float32

Never part of the test suite (the tests build tiny folders with `write_folder`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "llama-7B": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048)),
    "llama-1B": ("llama", dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                               num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)),
    "llama-tiny": ("llama", dict(vocab_size=2000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)),
    "gpt2-124M": ("gpt2", dict(vocab_size=50257, n_positions=1024, n_layer=12, n_embd=768, n_head=12)),
    "gpt2-tiny": ("gpt2", dict(vocab_size=2000, n_positions=1024, n_layer=3, n_embd=64, n_head=4, n_inner=128)),
}


def make_config(kind: str, shape: dict, tokenizer):
    import transformers

    ids = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if kind == "llama":
        config = transformers.LlamaConfig(**shape, **ids, tie_word_embeddings=False)
        config.architectures = ["LlamaForCausalLM"]
    elif kind == "gpt2":
        config = transformers.GPT2Config(**shape, **ids)
        config.architectures = ["GPT2LMHeadModel"]
    else:
        raise ValueError(kind)
    return config


def write_folder(folder: str | Path, config, tokenizer, *, dtype: str = "bfloat16", seed: int = 0,
                 std: float = 0.02, progress: bool = False) -> dict:
    """Write a random model of ``config`` to ``folder`` one block per shard; returns {"params", "bytes", "shards"}.

    Peak memory is about one block's tensors (plus the embeddings' shard at the end).
    """
    import torch
    import transformers
    from safetensors.torch import save_file

    from explorer import blocks

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    shapes = {name: (tuple(t.shape), name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight",
                                                  "layer_norm.weight")))
              for name, t in skeleton.state_dict().items()}
    tied = {name for name in shapes if name == "lm_head.weight"} if getattr(config, "tie_word_embeddings", False) \
        else set()
    stack, stack_blocks = blocks.find_blocks(skeleton)
    groups = [[n for n in shapes if n.startswith(f"{stack}.{i}.")] for i in range(len(stack_blocks))]
    in_blocks = {n for group in groups for n in group}
    groups.append([n for n in shapes if n not in in_blocks and n not in tied])
    generator = torch.Generator().manual_seed(seed)
    weight_map, total, params = {}, 0, 0
    count = len(groups)
    for index, names in enumerate(groups):
        tensors = {}
        for name in names:
            shape, is_norm = shapes[name]
            if is_norm or name.endswith("bias"):
                tensor = torch.ones(shape) if is_norm and not name.endswith("bias") else torch.zeros(shape)
            else:
                tensor = torch.randn(shape, generator=generator) * std
            tensors[name] = tensor.to(torch_dtype).contiguous()
        shard = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = shard
            total += tensor.numel() * tensor.element_size()
            params += tensor.numel()
        del tensors
        if progress:
            print(f"shard {index + 1}/{count} written", file=sys.stderr, flush=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.dtype = dtype
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"params": params, "bytes": total, "shards": count}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shape", choices=list(SHAPES))
    parser.add_argument("folder")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from explorer import hf

    kind, shape = SHAPES[args.shape]
    tokenizer = hf.tiny_tokenizer("gpt2", vocab_size=2000)
    start = time.time()
    info = write_folder(args.folder, make_config(kind, shape, tokenizer), tokenizer, dtype=args.dtype,
                        seed=args.seed, progress=True)
    print(json.dumps({**info, "shape": args.shape, "dtype": args.dtype, "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
