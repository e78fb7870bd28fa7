"""Pruning a model larger than memory: one transformer block at a time, from safetensors shards to shards.

A 7 B model is 13.5 GB in bf16 and 27 GB in fp32; the papers' loop never needs it whole. Its
skeleton is built with every parameter on the meta device (shapes only; buffers such as rotary
``inv_freq``, which no checkpoint holds, are computed as usual). The embeddings are read from the
memory-mapped shards (``safetensors.safe_open``) to compute block 0's inputs for every calibration
batch (`explorer.blocks.capture_block_inputs`); then each block in turn is read, run with its Linears
hooked (statistics from the real tokens only, in float32 or float64), pruned, run again for the next
block's inputs, written to the output folder in its own dtype as its own shard, and dropped back to
meta. Peak memory is one block, the embeddings and the activations.

* ``sequential`` calibration (the papers' code): each block sees the outputs of the pruned blocks
  before it, so it runs twice; ``one-pass``: the dense outputs, one run a block. The output names it.
* Magnitude needs no calibration: blocks are read, pruned and written.
* The tensors outside the blocks (embeddings, final norm, ``lm_head``) are copied unchanged, with
  config and tokenizer files, and ``model.safetensors.index.json`` maps every tensor to its shard,
  so ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)`` reloads the folder.
* `perplexity_folder` runs the same loop over the test split's batches and ends with the final
  norm and head: the same batches and terms as `explorer.tasks.perplexity`, so the numbers compare.

Example::

    calib = text.calibration(dataset, 16, 512, "windows")
    prune_folder("llama-7b", "llama-7b-wanda", StreamPlan("wanda", 0.5), calib)
    perplexity_folder("llama-7b-wanda", dataset)["perplexity"]
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from explorer import blocks, hf, lean, llm, tasks
from explorer.errors import ExplorerError

STREAM_CRITERIA = ("magnitude", "wanda", "sparsegpt")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class StreamPlan:
    """What a streamed prune does: criterion, local sparsity (or N:M), calibration variant, protected layers.

    Every Linear of every transformer block prunes ``round(sparsity * weights)`` of its weights (local
    scope, as the papers); ``protect`` names layers (``hf.model.layers.0.mlp.down_proj``) left dense.
    """

    criterion: str = "wanda"
    sparsity: float = 0.5
    nm: tuple[int, int] | None = None
    sequential: bool = False
    protect: tuple[str, ...] = ()

    def validate(self) -> StreamPlan:
        if self.criterion not in STREAM_CRITERIA:
            raise ExplorerError(f"Streaming prunes with {', '.join(STREAM_CRITERIA)}; '{self.criterion}' needs the "
                                "whole model in memory: drop --stream.")
        if not 0.0 <= self.sparsity <= 1.0:
            raise ExplorerError(f"Sparsity must be in [0, 1]; got {self.sparsity}.")
        if self.sequential and self.criterion == "magnitude":
            raise ExplorerError("Magnitude uses no calibration, so it has no sequential variant: drop --sequential.")
        return self


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered inside lands on the meta device (a shape, no memory); buffers stay real.

    A buffer computed at construction (rotary ``inv_freq``) keeps its value, which a plain
    ``torch.device("meta")`` would lose; the same trick as accelerate's ``init_empty_weights``.
    """
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _give_back_memory() -> None:
    """Return freed heap pages to the system (glibc ``malloc_trim``) after a block.

    Blocks' tensors below glibc's mmap threshold live on the heap; freed, they stay in the process's
    resident memory, which grew by ~0.1 GB a block on a 1.1 B model without this. Elsewhere a no-op.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


# --------------------------------------------------------------------------- the folder
@dataclass
class Folder:
    """A Hugging Face causal LM folder of safetensors shards: its config and where each tensor lives."""

    path: Path
    config: object
    files: dict[str, str]  # tensor name -> shard file name

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors as stored (dtype kept), read shard by shard; each shard is closed after."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        from safetensors import safe_open

        for file, group in by_file.items():
            try:
                with safe_open(str(self.path / file), framework="pt") as handle:
                    for name in group:
                        tensors[name] = handle.get_tensor(name)
            except Exception as exc:  # noqa: BLE001 - truncated shard, a name the shard lacks
                raise ExplorerError(f"Cannot read '{self.path / file}' ({type(exc).__name__}: {hf._first_line(exc)}); "
                                    f"the shard is damaged or does not match {INDEX}: copy the folder again.") from exc
        return tensors


def open_folder(path: str | Path) -> Folder:
    """Check an ``hf:`` folder for streaming and read its config and tensor map (one ExplorerError line if unfit)."""
    import transformers

    folder = Path(str(path).removeprefix("hf:")).expanduser()
    label = str(path)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ExplorerError(f"'{label}' is not a Hugging Face model folder with a config.json; streaming needs one "
                            "saved with model.save_pretrained(PATH).")
    hf._refuse_custom_code(folder, label)
    if (folder / INDEX).is_file():
        try:
            files = dict(json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ExplorerError(f"{INDEX} in '{label}' is unreadable ({type(exc).__name__}); save the model "
                                "again with model.save_pretrained(PATH).") from exc
    elif (folder / SINGLE).is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(folder / SINGLE), framework="pt") as handle:
                files = {name: SINGLE for name in handle.keys()}
        except Exception as exc:  # noqa: BLE001
            raise ExplorerError(f"'{folder / SINGLE}' is not a readable safetensors file ({hf._first_line(exc)}); "
                                "save the model again.") from exc
    else:
        raise ExplorerError(f"'{label}' has no safetensors weights ({SINGLE} or {INDEX}); streaming reads only "
                            "safetensors: save the model with model.save_pretrained(PATH, safe_serialization=True).")
    missing = sorted({file for file in files.values() if not (folder / file).is_file()})
    if missing:
        raise ExplorerError(f"'{label}' lacks the shard {missing[0]} that {INDEX} names"
                            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; copy the whole folder.")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise ExplorerError(f"Cannot read config.json in '{label}': {hf._first_line(exc)}") from exc
    architecture = hf._architecture(config, label)
    if hf.task_of(architecture) != "causal_lm":
        raise ExplorerError(f"Streaming prunes causal language models (…ForCausalLM, …LMHeadModel); '{label}' is "
                            f"{architecture or 'a base model'}: prune it in memory (drop --stream).")
    return Folder(path=folder, config=config, files=files)


def load_tokenizer(folder: Folder):
    """The folder's tokenizer, with a pad token (its end-of-text token when it has none), as `hf.load_hf` does."""
    import transformers

    label = str(folder.path)
    try:
        with hf._quiet():
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder.path, local_files_only=True,
                                                                   trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise ExplorerError(f"Cannot load the tokenizer in '{label}' ({hf._first_line(exc)}); save a working one "
                            "with tokenizer.save_pretrained(PATH).") from exc
    hf._pad_id(tokenizer, folder.config, label)
    return tokenizer


# --------------------------------------------------------------------------- the skeleton
class Skeleton:
    """The model with its parameters on meta, wrapped as a `explorer.hf.TokenModel`; tensors come and go.

    ``peak_params`` is the most parameters ever materialised at once (the memory bound's witness).
    """

    def __init__(self, folder: Folder, pad_id: int, dtype: torch.dtype):
        import transformers

        self.folder, self.dtype = folder, dtype
        with _parameters_on_meta(), hf._quiet():
            model = transformers.AutoModelForCausalLM.from_config(folder.config)
            limit = hf.max_positions(folder.config)
            self.wrapper = hf.TokenModel(model.eval(), "causal_lm", pad_id,
                                         min(hf.DEFAULT_SEQ_LEN, limit) if limit else hf.DEFAULT_SEQ_LEN)
        self.wrapper.eval()
        self.hf = model
        self.transposed = set(self.wrapper.conv1d_layers)  # GPT-2 Conv1D, held here as Linear (weights transposed)
        found = blocks.find_blocks(model)
        if found is None:
            raise ExplorerError(f"'{folder.path}' has no stack of transformer blocks to stream.")
        self.stack, stack_blocks = found
        self.blocks = stack_blocks
        self.block_names = [[name for name in folder.files if name.startswith(f"{self.stack}.{index}.")]
                            for index in range(len(stack_blocks))]
        inside = {name for names in self.block_names for name in names}
        self.outside = [name for name in folder.files if name not in inside]
        unknown = set(folder.files) - set(model.state_dict())
        if unknown:
            raise ExplorerError(f"'{folder.path}' holds tensors its config.json does not describe (e.g. "
                                f"{sorted(unknown)[0]}); save the model again with model.save_pretrained(PATH).")
        if not all(self.block_names):
            raise ExplorerError(f"'{folder.path}' lacks the tensors of some transformer blocks ({self.stack}.*); "
                                "copy the whole folder.")
        self.loaded: set[str] = set()
        self.peak_params = 0

    def _module(self, name: str) -> tuple[nn.Module, str, str]:
        module_name, _, leaf = name.rpartition(".")
        return self.hf.get_submodule(module_name), module_name, leaf

    def load(self, names: Iterable[str]) -> None:
        """Read ``names`` from the shards into the skeleton, in the compute dtype (floating tensors only)."""
        for name, tensor in self.folder.read(names).items():
            module, module_name, leaf = self._module(name)
            if module_name in self.transposed and leaf == "weight":
                tensor = tensor.t()
            if tensor.is_floating_point():
                tensor = tensor.to(self.dtype)
            tensor = tensor.contiguous()
            if leaf in module._parameters:
                module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
            else:
                module._buffers[leaf] = tensor
            self.loaded.add(name)
        self._tie()
        live = sum(p.numel() for p in self.hf.parameters() if p.device.type != "meta")
        self.peak_params = max(self.peak_params, live)

    def _tie(self) -> None:
        """A tied head (GPT-2, OPT) has no tensor of its own in the folder: it shares the input embeddings'."""
        if not getattr(self.hf.config, "tie_word_embeddings", False):
            return
        head, embeddings = self.hf.get_output_embeddings(), self.hf.get_input_embeddings()
        if head is not None and embeddings is not None and head.weight is not embeddings.weight:
            head.weight = embeddings.weight

    def release(self, names: Iterable[str]) -> None:
        """Back to meta: the memory of ``names`` is freed."""
        for name in names:
            module, _, leaf = self._module(name)
            if leaf in module._parameters:
                module._parameters[leaf] = nn.Parameter(module._parameters[leaf].to("meta"), requires_grad=False)
            elif leaf in module._buffers:
                module._buffers[leaf] = module._buffers[leaf].to("meta")
            self.loaded.discard(name)
        self._tie()

    def stored(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors as they now are (pruned), shaped and typed as in the source folder."""
        out = {}
        for name in names:
            module, module_name, leaf = self._module(name)
            tensor = getattr(module, leaf).detach()
            if module_name in self.transposed and leaf == "weight":
                tensor = tensor.t()
            out[name] = tensor
        return out

    def head_names(self) -> list[str]:
        """The output head's tensors in the folder (none when tied to the embeddings)."""
        head = self.hf.get_output_embeddings()
        for module_name, module in self.hf.named_modules():
            if module is head:
                return [name for name in self.outside if name.startswith(f"{module_name}.")]
        return []  # pragma: no cover - every causal LM has a head

    def layers(self, index: int) -> dict[str, nn.Module]:
        """Block ``index``'s prunable layers by their `TokenModel` name (``hf.model.layers.0.mlp.up_proj``)."""
        block = self.blocks[index]
        prefix = f"hf.{self.stack}.{index}."
        return {prefix + name: module for name, module in llm.llm_layers(block).items()}


def _compute_dtype(folder: Folder, dtype: str | torch.dtype | None) -> torch.dtype:
    """float32, or bfloat16 for a bf16 folder when ``dtype`` is auto (exact on its weights, and ~2x faster here)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, *DTYPES):
        raise ExplorerError(f"Compute dtype '{dtype}' is not one of {', '.join(DTYPES)}.")
    if DTYPES.get(dtype) is not None:
        return DTYPES[dtype]
    stored = getattr(folder.config, "dtype", None) or getattr(folder.config, "torch_dtype", None)
    return torch.bfloat16 if str(stored).removeprefix("torch.") == "bfloat16" else torch.float32


def _capture(skeleton: Skeleton, batches: list) -> list[dict]:
    """Block 0's calls for ``batches``: embeddings (and positions, masks, rotary tables) computed, the rest meta."""
    names = [name for name in skeleton.outside if name not in skeleton.head_names()]
    skeleton.load(names)
    try:
        return blocks.capture_block_inputs(skeleton.wrapper, batches)
    finally:
        skeleton.release(names)


def _keep_mask(module: nn.Module, criterion: str, statistics: dict, name: str, pruned: int,
               nm: tuple[int, int] | None) -> torch.Tensor | None:
    """Keep-mask of one Linear: Wanda's lowest within-row ``|W|·‖X‖``, or the lowest ``|W|`` of the layer."""
    if criterion == "wanda":
        if name not in statistics:
            return None
        if nm is not None:
            return blocks._wanda_mask(module, statistics[name], pruned, nm)
        raw = module.weight.detach().float().abs() * statistics[name].sqrt().float()
        return ~llm.lowest_by_row_rank(raw, pruned)
    return lean.magnitude_mask(module, pruned, nm)


def _prune_block(skeleton: Skeleton, index: int, plan: StreamPlan, calls: list[dict]) -> tuple[list[dict], list[dict]]:
    """Prune block ``index`` (loaded) in place; returns its layers' rows and the next block's calls."""
    block = skeleton.blocks[index]
    layers = {name: module for name, module in skeleton.layers(index).items() if name not in plan.protect}
    counts = {name: (module.weight.numel() * (plan.nm[1] - plan.nm[0]) // plan.nm[1]) if plan.nm
              else round(plan.sparsity * module.weight.numel()) for name, module in layers.items()}
    layers = {name: module for name, module in layers.items() if counts[name]}
    outputs: list | None = None
    statistics: dict = {}
    if plan.criterion != "magnitude" and layers:
        outputs = None if plan.sequential else []
        statistics = blocks._statistics(block, layers, calls, plan.criterion, outputs=outputs)
    if plan.criterion == "sparsegpt":
        prefix = f"hf.{skeleton.stack}.{index}."
        relative = {name.removeprefix(prefix): h for name, h in statistics.items()}
        llm.sparsegpt_prune(block, relative, {name.removeprefix(prefix): counts[name] / layers[name].weight.numel()
                                              for name in statistics}, nm=plan.nm)
        for module in layers.values():
            if hasattr(module, "weight_mask"):
                torch.nn.utils.prune.remove(module, "weight")
    else:
        with torch.no_grad():
            for name, module in layers.items():
                keep = _keep_mask(module, plan.criterion, statistics, name, counts[name], plan.nm)
                if keep is not None:
                    module.weight.mul_(keep.to(module.weight.dtype))
    rows = [{"name": name, "total": module.weight.numel(), "pruned": int((module.weight == 0).sum())}
            for name, module in skeleton.layers(index).items()]
    if plan.criterion == "magnitude":
        return rows, calls
    if outputs is None or not layers:
        outputs = [blocks._run_block(block, call) for call in calls]
    return rows, [blocks._with_hidden(call, output) for call, output in zip(calls, outputs)]


def _check_out(source: Folder, out: str | Path) -> Path:
    target = Path(out).expanduser()
    if target.resolve() == source.path.resolve():
        raise ExplorerError("--out is the model's own folder; give a new folder for the pruned model.")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExplorerError(f"--out '{out}' already exists and is not an empty folder; give a new folder for the "
                            "pruned model.")
    target.mkdir(parents=True, exist_ok=True)
    return target


def _save_shard(target: Path, shard: str, tensors: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]) -> int:
    from safetensors.torch import save_file

    stored = {name: tensor.to(dtypes[name]).contiguous() for name, tensor in tensors.items()}
    try:
        save_file(stored, str(target / shard), metadata={"format": "pt"})
    except OSError as exc:
        raise ExplorerError(f"Cannot write '{target / shard}' ({exc.strerror or exc}); free some disk space or "
                            "choose another --out.") from exc
    return sum(t.numel() * t.element_size() for t in stored.values())


def _dtypes(folder: Folder, names: Iterable[str]) -> dict[str, torch.dtype]:
    """The stored dtype of each tensor, read from the shards' headers (no tensor is loaded)."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(folder.files[name], []).append(name)
    dtypes = {}
    for file, group in by_file.items():
        with safe_open(str(folder.path / file), framework="pt") as handle:
            for name in group:
                dtypes[name] = handle.get_slice(name).get_dtype()
    codes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
    return {name: codes.get(code, torch.float32) for name, code in dtypes.items()}


def prune_folder(source: str | Path, out: str | Path, plan: StreamPlan, calib: list | None = None, *,
                 dtype: str | torch.dtype | None = None, progress: Progress | None = None) -> dict:
    """Prune the causal LM in folder ``source`` block by block into folder ``out``; the whole model is never in memory.

    ``calib`` is ``[(ids, None), ...]`` token batches (`explorer.text.calibration`), needed by Wanda and
    SparseGPT. ``dtype`` is the compute dtype (auto: bfloat16 for a bf16 folder, else float32); statistics
    are float32 or wider, and every tensor is written back in its stored dtype. Returns the layers'
    ``total`` / ``pruned`` counts, ``calibration`` ("sequential", "one-pass" or None), the folder's
    shards and bytes, ``peak_params`` (most parameters in memory at once) and ``seconds``.
    """
    plan.validate()
    started = time.perf_counter()
    folder = open_folder(source)
    needs_calib = plan.criterion != "magnitude"
    if needs_calib and not calib:
        raise ExplorerError(f"{plan.criterion} needs calibration batches; give calibration text.")
    tokenizer = load_tokenizer(folder)
    skeleton = Skeleton(folder, int(tokenizer.pad_token_id), _compute_dtype(folder, dtype))
    known = {name for index in range(len(skeleton.blocks)) for name in skeleton.layers(index)}
    unknown = [name for name in plan.protect if name not in known]
    if unknown:
        raise ExplorerError(f"--protect {unknown[0]}: no such layer in the transformer blocks (names look like "
                            f"{next(iter(sorted(known)))}).")
    target = _check_out(folder, out)
    dtypes = _dtypes(folder, folder.files)
    calls = _capture(skeleton, calib) if needs_calib else []
    count = len(skeleton.blocks) + 1
    weight_map, total_bytes, rows = {}, 0, []
    label = f"{plan.criterion} stream{'' if not needs_calib else ' sequential' if plan.sequential else ' one-pass'}"
    with torch.no_grad():
        for index, names in enumerate(skeleton.block_names):
            skeleton.load(names)
            block_rows, calls = _prune_block(skeleton, index, plan, calls)
            rows += block_rows
            shard = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            total_bytes += _save_shard(target, shard, skeleton.stored(names), dtypes)
            weight_map.update(dict.fromkeys(names, shard))
            skeleton.release(names)
            _give_back_memory()
            if progress is not None:
                progress((index + 1) / count, f"{label}: block {index + 1} of {len(skeleton.blocks)} written")
    shard = f"model-{count:05d}-of-{count:05d}.safetensors"
    total_bytes += _save_shard(target, shard, folder.read(skeleton.outside), dtypes)
    weight_map.update(dict.fromkeys(skeleton.outside, shard))
    (target / INDEX).write_text(json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map},
                                           indent=2))
    for item in folder.path.iterdir():  # config, tokenizer, generation config: copied as they are
        if item.is_file() and not item.name.endswith((".safetensors", ".bin")) and item.name != INDEX:
            shutil.copy2(item, target / item.name)
    if progress is not None:
        progress(1.0, f"{label}: embeddings and head copied, index written")
    pruned, total = sum(r["pruned"] for r in rows), sum(r["total"] for r in rows)
    return {"layers": rows, "pruned": pruned, "total": total, "sparsity_actual": pruned / total if total else 0.0,
            "calibration": ("sequential" if plan.sequential else "one-pass") if needs_calib else None,
            "compute_dtype": str(skeleton.dtype).removeprefix("torch."), "shards": count, "bytes": total_bytes,
            "peak_params": skeleton.peak_params, "seconds": time.perf_counter() - started, "out": str(target)}


def _hidden_of(call: dict) -> torch.Tensor:
    return call["args"][0] if call["args"] else call["kwargs"]["hidden_states"]


class _Replay(nn.Module):
    """Stands in for the whole stack of blocks: hands back the last block's stored output, batch after batch."""

    def __init__(self, outputs: list[torch.Tensor], as_tuple: bool):
        super().__init__()
        self.outputs, self.as_tuple = list(outputs), as_tuple

    def forward(self, *args, **kwargs):
        hidden = self.outputs.pop(0)
        return (hidden,) if self.as_tuple else hidden


def perplexity_folder(source: str | Path, dataset, split: str = "test", *, dtype: str | torch.dtype | None = None,
                      max_tokens: int | None = None, progress: Progress | None = None) -> dict:
    """exp(mean NLL) of the folder's model on ``split``, streamed block by block; ``{"perplexity", "tokens", ...}``.

    The batches are `explorer.tasks.perplexity`'s (length-sorted, trailing padding cut, padding never a
    target), so on a model that fits in memory the two agree. ``max_tokens`` scores the split's first sequences
    holding at most that many tokens, as `explorer.tasks.perplexity` does (a 7 B model costs ~13 GFLOP a token).
    """
    started = time.perf_counter()
    folder = open_folder(source)
    tokenizer = load_tokenizer(folder)
    skeleton = Skeleton(folder, int(tokenizer.pad_token_id), _compute_dtype(folder, dtype))
    pad_id = dataset.info.get("pad_id")
    vocab = int(folder.config.get_text_config().vocab_size)
    batches = list(tasks._trimmed_batches(dataset, split, 32, pad_id, max_tokens=max(1, tasks.LOGIT_BUDGET // vocab),
                                          token_budget=max_tokens))
    if not batches:
        raise ExplorerError(f"The {split} split of '{dataset.name}' has no tokens to predict.")
    calls = _capture(skeleton, [(x, None) for x in batches])
    as_tuple = False
    with torch.no_grad():
        for index, names in enumerate(skeleton.block_names):
            skeleton.load(names)
            outputs = []
            for call in calls:
                raw = skeleton.blocks[index](*call["args"], **call["kwargs"])
                as_tuple = isinstance(raw, (tuple, list))
                outputs.append(raw[0] if as_tuple else raw)
            calls = [blocks._with_hidden(call, output) for call, output in zip(calls, outputs)]
            skeleton.release(names)
            _give_back_memory()
            if progress is not None:
                progress((index + 1) / (len(skeleton.blocks) + 1),
                         f"perplexity stream: block {index + 1} of {len(skeleton.blocks)}")
        total, count = _head_nll(skeleton, batches, [_hidden_of(call) for call in calls], as_tuple,
                                 pad_id)
    if count == 0:
        raise ExplorerError(f"The {split} split of '{dataset.name}' has no tokens to predict.")
    return {"perplexity": math.exp(total / count), "tokens": count, "batches": len(batches),
            "compute_dtype": str(skeleton.dtype).removeprefix("torch."), "peak_params": skeleton.peak_params,
            "seconds": time.perf_counter() - started}


def _head_nll(skeleton: Skeleton, batches: list, hidden: list, as_tuple: bool, pad_id) -> tuple[float, int]:
    """Sum of next-token NLL over the real targets, and their count: the model run with `_Replay` for its blocks."""
    stack = skeleton.hf.get_submodule(skeleton.stack)
    replay = _Replay(hidden, as_tuple)
    hf._set_submodule(skeleton.hf, skeleton.stack, nn.ModuleList([replay]))
    skeleton.load(skeleton.outside)
    total, count = 0.0, 0
    try:
        for x in batches:
            logits = skeleton.wrapper(x)
            batch_total, batch_count = tasks.next_token_nll_sum(logits, x, pad_id)
            total += batch_total
            count += batch_count
    finally:
        hf._set_submodule(skeleton.hf, skeleton.stack, stack)
        skeleton.release(skeleton.outside)
    return total, count


# --------------------------------------------------------------------------- the command line
EVAL_CHOICES = ("none", "pruned", "both")
_REFUSED = {  # prune flags streaming cannot honour: each refused in one line
    "scope": ("global", "global scope ranks every layer of the model at once; streaming sees one block: "
                        "use --scope local"),
    "include_head": (True, "--include-head: streaming prunes the transformer blocks only; the head is copied as it is"),
    "plan_only": (True, "--plan-only: a streamed prune plans and applies block by block; drop --plan-only"),
    "measure": (True, "--measure: latency needs the whole model in memory; drop --measure"),
    "save": (str, "--save writes a model file; a streamed prune writes a folder: use --out DIR"),
}


def _refuse(args) -> None:
    for flag, (value, reason) in _REFUSED.items():
        given = getattr(args, flag, None)
        if (isinstance(given, str) and value is str) or (value is not str and given == value):
            raise ExplorerError(f"Streaming cannot do this: {reason}.")
    if args.structure not in ("unstructured", "nm"):
        raise ExplorerError(f"Streaming prunes weights (--structure unstructured or nm); --structure {args.structure} "
                            "removes channels across blocks, which needs the model in memory: drop --stream.")
    if not args.model.startswith("hf:"):
        raise ExplorerError(f"--stream reads a Hugging Face folder of safetensors shards (hf:FOLDER); '{args.model}' "
                            "is not one.")
    if args.data not in (None, "text"):
        raise ExplorerError(f"A streamed language model is calibrated and evaluated on text: use --data text, not "
                            f"'{args.data}'.")
    if len(args.sparsity) != 1:
        raise ExplorerError("--stream writes one folder: give one --sparsity.")
    if not args.out:
        raise ExplorerError("--stream writes the pruned model to a folder: give --out DIR.")


def _calibration(args, dataset, limit: int | None) -> list:
    from explorer import text
    from explorer.specs import ScoringSpec

    seq_len = args.calib_seqlen or int(dataset.info["seq_len"])
    if limit and seq_len > limit:
        raise ExplorerError(f"Calibration sequences of {seq_len:,} tokens are longer than the model's {limit:,} "
                            "positions; lower --calib-seqlen.")
    samples = args.calib_samples or args.calib_batches * ScoringSpec.calib_batch_size
    return text.calibration(dataset, samples, seq_len, args.calib_mode, seed=args.seed)


def command(args, progress: Progress | None = None) -> list[dict]:
    """``prune --stream``: prune an ``hf:`` folder block by block into ``--out`` and report its perplexity."""
    from explorer import text

    _refuse(args)
    nm = llm.parse_nm(args.nm) if args.structure == "nm" else None
    plan = StreamPlan(args.criterion, args.sparsity[0], nm, args.sequential, tuple(args.protect)).validate()
    folder = open_folder(args.model[3:])
    tokenizer = load_tokenizer(folder)
    limit = hf.max_positions(folder.config)
    dataset = text.text_dataset(tokenizer, path=args.data_file, seq_len=min(hf.DEFAULT_SEQ_LEN, limit or 10 ** 9),
                                seed=args.seed)
    calib = _calibration(args, dataset, limit) if plan.criterion != "magnitude" else None
    result = {"model": args.model, "data": dataset.name, "stream": True, "structure": args.structure,
              "criterion": args.criterion, "scope": "local", "sparsity": plan.sparsity}
    if nm is not None:
        result["nm"] = {"n": nm[0], "m": nm[1]}
    evaluate = getattr(args, "eval", "pruned")
    if evaluate == "both":
        base = perplexity_folder(folder.path, dataset, dtype=args.stream_dtype, max_tokens=args.eval_tokens or None,
                                 progress=progress)
        result["perplexity"] = {"base": base["perplexity"], "tokens": base["tokens"]}
    summary = prune_folder(folder.path, args.out, plan, calib, dtype=args.stream_dtype, progress=progress)
    result.update({key: summary[key] for key in ("sparsity_actual", "calibration", "compute_dtype", "out", "shards",
                                                 "bytes", "peak_params", "layers")})
    result["prune_seconds"] = summary["seconds"]
    if evaluate != "none":
        pruned = perplexity_folder(summary["out"], dataset, dtype=args.stream_dtype,
                                   max_tokens=args.eval_tokens or None,
                                   progress=progress)
        result.setdefault("perplexity", {}).update(pruned=pruned["perplexity"], tokens=pruned["tokens"],
                                                   split="test")
    if "perplexity" in result:  # {scored, total} in the budget's count (tokens up to each sequence's last real one)
        result["perplexity"]["eval_tokens"] = dict(zip(("scored", "total"),
                                                       tasks.eval_tokens(dataset, "test", args.eval_tokens or None)))
    if result.get("calibration") is None:
        result.pop("calibration")
    return [result]


def format_human(result: dict) -> str:
    """A streamed prune's result as a few lines of text."""
    calibrated = f", {result['calibration']} calibration" if result.get("calibration") else ""
    lines = [f"streamed {result['criterion']} {result['structure']} {result['sparsity']:.0%} (local{calibrated}, "
             f"{result['compute_dtype']} compute): {result['sparsity_actual']:.1%} of the blocks' "
             f"{sum(r['total'] for r in result['layers']):,} Linear weights pruned",
             f"  wrote {result['out']}: {result['shards']} shards, {result['bytes']:,} bytes; at most "
             f"{result['peak_params']:,} parameters in memory at once; {result['prune_seconds']:.0f} s"]
    ppl = result.get("perplexity") or {}
    if ppl:
        base = f"{ppl['base']:.4g} -> " if "base" in ppl else ""
        pruned = f"{ppl['pruned']:.4g}" if "pruned" in ppl else "(pruned not evaluated)"
        scored = (f", {tasks.tokens_phrase(ppl['eval_tokens'], hint='--eval-tokens 0 for all')}"
                  if "eval_tokens" in ppl else "")
        lines.append(f"  test perplexity {base}{pruned} on {ppl['tokens']:,} predicted tokens (streamed){scored}")
    return "\n".join(lines)
